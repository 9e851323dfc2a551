"""Runbook drill: a key or a certificate compromised
(docs/runbooks/key-or-certificate-compromised.md), on a running ``federation up``.

* A revoked API key is refused by the gateway (401) within its verification cache's
  time to live.
* A certificate put on the deny list (``federation certs deny``) is refused by every
  node, health checks included, within the reload interval, with no restart; the
  operator's own certificate keeps working; a replacement issued for the same
  identity is accepted while the old certificate stays refused; denying the identity
  refuses the replacement too, until it is allowed again.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.config import ROLES_WITH_SERVICES, GatewayConfig, GrpcConfig
from tests.up_support import TEST_MODEL, RunningUp, federation_up

DENIED_WITHIN = GrpcConfig().deny_list_reload_seconds + 4.0
REVOKED_WITHIN = GatewayConfig().auth_cache_ttl_seconds + 5.0


async def _check(up: RunningUp, role: str, cert: Path, key: Path) -> str:
    """``SERVING``, or the status code and message a node answers ``cert`` with."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(up.endpoints["pki"]["ca_cert"]).read_bytes(),
        private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    async with grpc.aio.secure_channel(up.endpoints["nodes"][role]["grpc"], creds) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def _everywhere(up: RunningUp, cert: Path, key: Path) -> dict[str, str]:
    answers = await asyncio.gather(*(_check(up, role, cert, key)
                                     for role in ROLES_WITH_SERVICES))
    return dict(zip(ROLES_WITH_SERVICES, answers, strict=True))


async def _eventually(up: RunningUp, cert: Path, key: Path, expect: str) -> dict[str, str]:
    deadline = time.monotonic() + DENIED_WITHIN
    while True:
        answers = await _everywhere(up, cert, key)
        if all(a.startswith(expect) for a in answers.values()):
            return answers
        assert time.monotonic() < deadline, answers
        await asyncio.sleep(0.2)


async def _chat(up: RunningUp, key: str) -> int:
    async with aiohttp.ClientSession() as session, session.post(
            up.gateway + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": TEST_MODEL, "max_tokens": 2,
                  "messages": [{"role": "user", "content": "hi"}]}) as response:
        return response.status


async def test_a_revoked_key_is_refused_by_the_gateway(tmp_path: Path) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log") as up:
        key = await up.issue_key()
        assert await _chat(up, key) == 200
        key_id = key.split("_")[1]
        code, out, err = await up.cli("keys", "revoke", key_id, "--reason", "leaked")
        assert code == 0, out + err
        revoked_at = time.monotonic()
        statuses: list[int] = []

        async def refused() -> bool:
            statuses.append(await _chat(up, key))
            return statuses[-1] == 401

        while not await refused():
            assert time.monotonic() - revoked_at < REVOKED_WITHIN, statuses
            await asyncio.sleep(0.2)
        assert set(statuses) <= {200, 401}, statuses


async def test_a_denied_certificate_is_refused_everywhere_until_replaced(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with federation_up(home, tmp_path / "up.log") as up:
        pids = {role: up.pid(role) for role in ROLES_WITH_SERVICES}
        code, out, err = await up.cli("pki", "issue", "--role", "admin", "--name", "laptop")
        assert code == 0, out + err
        issued = home / "pki" / "issued"
        stolen_cert, stolen_key = tmp_path / "stolen.pem", tmp_path / "stolen.key"
        shutil.copy(issued / "admin-laptop.pem", stolen_cert)
        shutil.copy(issued / "admin-laptop.key", stolen_key)
        assert set((await _everywhere(up, stolen_cert, stolen_key)).values()) == {"SERVING"}

        code, out, err = await up.cli("certs", "deny", "--cert", str(stolen_cert),
                                      "--reason", "laptop stolen")
        assert code == 0, out + err
        refused = await _eventually(up, stolen_cert, stolen_key, "UNAUTHENTICATED")
        assert all("is denied (laptop stolen)" in a for a in refused.values()), refused
        operator = Path(up.endpoints["pki"]["admin_cert"]), Path(up.endpoints["pki"]["admin_key"])
        assert set((await _everywhere(up, *operator)).values()) == {"SERVING"}

        code, out, err = await up.cli("pki", "issue", "--role", "admin", "--name", "laptop")
        assert code == 0, out + err
        replacement = issued / "admin-laptop.pem", issued / "admin-laptop.key"
        assert set((await _everywhere(up, *replacement)).values()) == {"SERVING"}
        assert all(a.startswith("UNAUTHENTICATED")
                   for a in (await _everywhere(up, stolen_cert, stolen_key)).values())

        identity = "spiffe://federation.local/node/laptop/admin"
        code, out, err = await up.cli("certs", "deny", "--identity", identity,
                                      "--reason", "the whole laptop")
        assert code == 0, out + err
        await _eventually(up, *replacement, "UNAUTHENTICATED")
        code, out, err = await up.cli("certs", "allow", identity)
        assert code == 0, out + err
        await _eventually(up, *replacement, "SERVING")

        code, out, err = await up.cli("certs", "denied")
        assert code == 0 and "laptop stolen" in out and "1 denied" in out, out + err
        assert {role: up.pid(role) for role in ROLES_WITH_SERVICES} == pids  # no restart
