#!/usr/bin/env bash
# Generate Python code, gRPC stubs and mypy type stubs from protos/.
#
# Usage: scripts/gen_protos.sh OUTDIR
#
# With OUTDIR=. the output lands in ./federation/v1/ (*_pb2.py, *_pb2.pyi,
# *_pb2_grpc.py, *_pb2_grpc.pyi, plus an empty __init__.py). Output is
# deterministic so CI can regenerate into a temp dir and diff against the
# committed files.
#
# Requires on PATH: `python` with grpcio-tools installed, and the
# protoc-gen-mypy / protoc-gen-mypy_grpc plugins from mypy-protobuf.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi

export LC_ALL=C

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
outdir="$(cd "$1" && pwd)"

for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
  if ! command -v "$plugin" >/dev/null 2>&1; then
    echo "error: $plugin not found on PATH (pip install mypy-protobuf)" >&2
    exit 1
  fi
done

grpc_tools_proto="$(python -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"

cd "$repo_root"
# Sorted (LC_ALL=C) glob so the protoc invocation is stable.
protos=(protos/federation/v1/*.proto)

mkdir -p "$outdir/federation/v1"
python -m grpc_tools.protoc \
  -I protos \
  -I "$grpc_tools_proto" \
  --python_out="$outdir" \
  --grpc_python_out="$outdir" \
  --mypy_out="$outdir" \
  --mypy_grpc_out="$outdir" \
  --mypy_opt=quiet \
  --mypy_grpc_opt=quiet \
  "${protos[@]}"

# The generated package; intentionally empty.
: > "$outdir/federation/v1/__init__.py"
