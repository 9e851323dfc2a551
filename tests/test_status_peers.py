"""``federation status`` across hosts: one line per node of the peers configuration with
its health, version, certificate expiry and address; non-zero unless all serve."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from federation.inference.test_backend import TestBackend
from federation.interceptor import VERSION
from federation.pki import ADMIN_NAME, leaf_certificate
from tests.gateway_support import inference_nodes
from tests.nodes_support import free_port
from tests.support import TestPKI


async def _status(pki: TestPKI, peers: str, *extra: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= {"FEDERATION_HOME": str(pki.home), "FEDERATION_PEERS_INFERENCE": peers}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "status", *extra, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_every_peer_on_one_line(pki: TestPKI) -> None:
    pki.identity("admin", ADMIN_NAME)
    async with inference_nodes(pki, [TestBackend(), TestBackend()]) as nodes:
        addresses = [n.address for n in nodes]
        code, out, err = await _status(pki, ",".join(addresses))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["ROLE", "ADDRESS", "HEALTH", "VERSION", "CERTIFICATE",
                                    "EXPIRES", "IDENTITY"]
        expiry = leaf_certificate(pki.identity("inference", "inf0").cert).not_valid_after_utc
        first = lines[1].split()
        assert first[:4] == ["inference", addresses[0], "serving", VERSION]
        assert f"{expiry:%Y-%m-%d}" in lines[1]
        assert first[-1] == "spiffe://federation.local/node/inf0/inference"
        assert lines[-1] == "all 2 nodes serving"

        dead = f"127.0.0.1:{free_port()}"
        code, out, _ = await _status(pki, ",".join([*addresses, dead]), "--json")
        assert code == 1
        report = json.loads(out)
        assert [n["health"] for n in report["nodes"]] == ["serving", "serving", "unreachable"]
        assert report["nodes"][2]["address"] == dead and not report["healthy"]
