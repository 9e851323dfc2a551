# The README's set-up is two commands: `make run` and `make test`.
# Everything else here is what those two are made of.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
# The whole dependency set is re-installed when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK = 1

# llama.cpp is built for x86-64-v3 (AVX2, FMA, F16C), not with -march=native: these
# VMs report AMX in cpuid but fault on AMX tile instructions (SIGILL in decode), and a
# wheel built natively on one machine crashes on another. pip's own cache ignores
# CMAKE_ARGS, so the wheel is built once per flag set into a wheelhouse of its own.
ARCH := $(shell uname -m)
ifeq ($(ARCH),x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON \
	-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
LLAMA_VERSION := 0.3.36
WHEELHOUSE := $(HOME)/.cache/federation/wheels/llama-$(LLAMA_VERSION)-$(ARCH)-$(shell echo '$(LLAMA_CMAKE_ARGS)' | cksum | cut -d' ' -f1)

.PHONY: run test install bytecode protos check-protos lint-protos lint typecheck pytest promtool bench clean

run: $(STAMP) bytecode
	$(BIN)/federation up

test: $(STAMP) check-protos lint-protos lint typecheck pytest

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing the project (the first build of llama-cpp-python takes several minutes)..."
	ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(BIN)/python -m pip wheel --quiet --no-deps --no-cache-dir -w $(WHEELHOUSE) \
		'llama-cpp-python==$(LLAMA_VERSION)'
	$(BIN)/python -m pip install --quiet $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/python -m pip install --quiet -e '.[llm,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Where PYTHONDONTWRITEBYTECODE is set (it is on our CI machines) Python writes no .pyc, so
# every process `make run` or a test starts compiled all of our modules again: 0.45 s of CPU
# per process start, of 1.15 s. compileall writes them here, and later only what changed
# (0.5 s when nothing did); Python still checks each .pyc against its source.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q federation nodes gateway_http tests

# Regenerate the committed Python code from protos/ (grpcio-tools + mypy-protobuf).
protos: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/gen_protos.sh .

# Fail when the committed generated code differs from what protos/ produces.
check-protos: $(STAMP)
	@rm -rf .tools/gen-check && mkdir -p .tools/gen-check
	@PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/gen_protos.sh .tools/gen-check
	@diff -r -x __pycache__ federation/v1 .tools/gen-check/federation/v1 \
		|| { echo "generated code in federation/v1 is stale: run 'make protos' and commit"; exit 1; }
	@echo "generated code is up to date"

$(BUF):
	npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)

lint-protos: $(BUF)
	$(BUF) lint

lint: $(STAMP)
	$(BIN)/ruff check federation nodes gateway_http tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers (pytest-xdist): most tests wait on processes, sockets and PostgreSQL more
# than they compute, so two at once halve the suite on two cores (10 min 18 s serial,
# 5 min 50 s with -n 2, same machine). PYTEST_WORKERS=0 runs it serially.
PYTEST_WORKERS ?= 2
pytest: $(STAMP) promtool bytecode
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# promtool (Debian's prometheus package) checks and unit-tests deploy/prometheus in the
# test suite; installed once where apt-get can (root on Debian), else those tests skip.
promtool:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install \
		-y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
		|| echo "promtool could not be installed: the alert-rule tests will skip"

# Benchmarks print figures (recorded in bench/README.md); they assert nothing.
bench: $(STAMP)
	$(BIN)/python -m bench.keys
	$(BIN)/python bench/gateway.py
	$(BIN)/python -m bench.vault
	$(BIN)/python -m bench.edge
	$(BIN)/python bench/path.py
	$(BIN)/python bench/wakeup.py --postgres

clean:
	rm -rf $(VENV) .tools build *.egg-info
