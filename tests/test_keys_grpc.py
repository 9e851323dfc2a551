"""Key authority and thermal memory nodes through real grpc.aio servers with mTLS."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from federation.cli import build_parser
from federation.config import PeersConfig, Settings
from federation.db import Database
from federation.errors import ErrorCode, from_rpc_error
from federation.keys.keyformat import format_key, new_secret
from federation.keys.models import MAX_SOURCE_CHARS, MAX_TOKEN_QUOTA
from federation.pki import ADMIN_NAME
from federation.server import NodeServer
from federation.v1 import key_authority_pb2 as kpb
from federation.v1 import key_authority_pb2_grpc as kgrpc
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from nodes import keys as keys_node
from nodes import memory as memory_node
from tests.nodes_support import node
from tests.support import TestPKI


@dataclass
class Federation:
    pki: TestPKI
    keys: NodeServer
    memory: NodeServer
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, port: int, role: str) -> grpc.aio.Channel:
        # Stubs do not keep their channel alive: hold it here until teardown.
        self.channels.append(self.pki.channel(f"127.0.0.1:{port}", role))
        return self.channels[-1]

    def keys_stub(self, role: str) -> kgrpc.KeyAuthorityServiceAsyncStub:
        return kgrpc.KeyAuthorityServiceStub(self._channel(self.keys.port, role))

    def memory_stub(self, role: str) -> mgrpc.ThermalMemoryServiceAsyncStub:
        return mgrpc.ThermalMemoryServiceStub(self._channel(self.memory.port, role))


@pytest.fixture
async def federation(tmp_path: Path, database: Database) -> AsyncIterator[Federation]:
    pki = TestPKI(tmp_path / "home")
    async with node(pki, "memory", Settings(), database, memory_node) as memory:
        settings = Settings(peers=PeersConfig(memory=f"127.0.0.1:{memory.port}"))
        async with node(pki, "keys", settings, database, keys_node) as keys:
            fed = Federation(pki, keys, memory)
            try:
                yield fed
            finally:
                for channel in fed.channels:
                    await channel.close()


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call  # type: ignore[misc]
    return failed.value


async def test_issue_verify_and_quota_over_mtls(federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    issued = await admin.IssueKey(
        kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"], requests_per_minute=2),
        metadata=(("x-request-id", "req_issue_1"),),
    )
    assert issued.secret.startswith("fed_") and issued.key.state == kpb.KEY_STATE_ACTIVE
    assert issued.key.requests_per_minute == 2

    gateway = federation.keys_stub("gateway")
    verified = await gateway.VerifyKey(
        kpb.VerifyKeyRequest(key=issued.secret, source="203.0.113.9:4000", required_scope="chat"))
    assert verified.key.tenant_id == "acme" and 0 < verified.strength <= 1
    for _ in range(2):
        await gateway.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=issued.key.key_id,
                                                           is_request=True))
    refused = from_rpc_error(await rpc_error(gateway.ConsumeQuota(
        kpb.ConsumeQuotaRequest(key_id=issued.key.key_id, is_request=True))))
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    assert refused.retry_after_seconds is not None and 0 < refused.retry_after_seconds <= 60

    memory = federation.memory_stub("admin")
    trail = await memory.SearchMemory(mpb.SearchMemoryRequest(request_id="req_issue_1"))
    assert [(r.action, r.tenant_id) for r in trail.records] == [("key.issue", "acme")]
    assert trail.records[0].actor.endswith("/admin")
    chain = await memory.VerifyChain(mpb.VerifyChainRequest())
    assert chain.intact and chain.records_checked == 2  # key.issue, key.quota_exhausted


async def test_verify_chain_ranges_past_the_head_or_inverted(federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    for tenant in ("a", "b", "c"):
        await admin.IssueKey(kpb.IssueKeyRequest(tenant_id=tenant, scopes=["chat"]))
    memory = federation.memory_stub("admin")
    # Past the head is not "record 4 is missing": the walk stops at the head.
    past = await memory.VerifyChain(mpb.VerifyChainRequest(from_sequence=2, to_sequence=99))
    assert (past.intact, past.records_checked, past.problem) == (True, 2, "")
    for bad in (mpb.VerifyChainRequest(from_sequence=3, to_sequence=2),
                mpb.VerifyChainRequest(from_sequence=-1),
                mpb.VerifyChainRequest(to_sequence=-5)):
        refused = await rpc_error(memory.VerifyChain(bad))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()


@pytest.mark.parametrize(("request_fields", "param"), [
    ({"ttl": Duration(seconds=3_000_000 * 86400)}, "ttl"),
    ({"token_quota": 5, "quota_period": Duration(seconds=3_000_000 * 86400)}, "quota_period"),
    ({"requests_per_minute": 2**32 - 1}, "requests_per_minute"),
    ({"token_quota": 2**64 - 1, "quota_period": Duration(seconds=60)}, "token_quota"),
    ({"token_quota": 5, "quota_period": Duration(seconds=1, nanos=500_000_000)},
     "quota_period"),
    ({"tenant_id": "a\nb"}, "tenant_id"),
    ({"tenant_id": "x" * 201}, "tenant_id"),
    ({"tenant_id": " acme"}, "tenant_id"),
])
async def test_out_of_range_issues_are_invalid_not_internal(
        federation: Federation, request_fields: dict[str, object], param: str) -> None:
    admin = federation.keys_stub("admin")
    fields: dict[str, object] = {"tenant_id": "acme", "scopes": ["chat"], **request_fields}
    refused = await rpc_error(admin.IssueKey(kpb.IssueKeyRequest(**fields)))  # type: ignore[arg-type]
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert param in (refused.details() or "")


async def test_a_scope_given_twice_is_kept_once(federation: Federation) -> None:
    issued = await federation.keys_stub("admin").IssueKey(
        kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat", "embeddings", "chat"]))
    assert list(issued.key.scopes) == ["chat", "embeddings"]


async def test_a_grace_period_past_a_century_is_invalid(federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    issued = await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
    refused = await rpc_error(admin.RotateKey(kpb.RotateKeyRequest(
        key_id=issued.key.key_id, grace_period=Duration(seconds=3_000_000 * 86400))))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()


async def test_bad_keys_and_roles_are_refused(federation: Federation) -> None:
    gateway = federation.keys_stub("gateway")
    malformed = await rpc_error(gateway.VerifyKey(kpb.VerifyKeyRequest(key="fed_nope")))
    assert malformed.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "malformed" in (malformed.details() or "")
    denied = await rpc_error(gateway.IssueKey(kpb.IssueKeyRequest(tenant_id="a", scopes=["chat"])))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    search = await rpc_error(federation.memory_stub("gateway").SearchMemory(
        mpb.SearchMemoryRequest()))
    assert search.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rotate_revoke_list_history(federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    issued = await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
    key_id = issued.key.key_id
    rotated = await admin.RotateKey(kpb.RotateKeyRequest(key_id=key_id,
                                                         grace_period=Duration(seconds=60)))
    assert rotated.secret != issued.secret and rotated.HasField("old_secret_expires_at")
    revoked = await admin.RevokeKey(kpb.RevokeKeyRequest(key_id=key_id, reason="test"))
    assert revoked.key.state == kpb.KEY_STATE_REVOKED
    listed = await admin.ListKeys(kpb.ListKeysRequest(tenant_id="acme", include_revoked=True))
    assert [k.key_id for k in listed.keys] == [key_id]
    assert (await admin.ListKeys(kpb.ListKeysRequest(tenant_id="acme"))).keys == []
    history = await admin.GetKeyStrengthHistory(kpb.GetKeyStrengthHistoryRequest(key_id=key_id))
    assert [s.kind for s in history.samples] == [
        kpb.STRENGTH_EVENT_KIND_REVOCATION, kpb.STRENGTH_EVENT_KIND_ROTATION,
        kpb.STRENGTH_EVENT_KIND_ISSUED,
    ]


_BAD_SEQUENCE_TOKENS = ("\u00b2", "12\u00b3", "9" * 19, "9" * 5000, "-1", " 1")
"""Digits ``int`` refuses, numbers past a bigint or past int's digit limit, signs, spaces."""


async def test_garbage_page_tokens_are_invalid_not_internal(federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    issued = await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
    memory = federation.memory_stub("admin")
    calls: list[Any] = [
        admin.ListKeys(kpb.ListKeysRequest(tenant_id="acme", page_token=token))
        for token in ("inf|x", "1e300|x", "1.5|x\x00", "1.5|not a key id", "nan|x")]
    calls += [admin.GetKeyStrengthHistory(kpb.GetKeyStrengthHistoryRequest(
        key_id=issued.key.key_id, page_token=token)) for token in _BAD_SEQUENCE_TOKENS]
    calls += [memory.SearchMemory(mpb.SearchMemoryRequest(page_token=token))
              for token in _BAD_SEQUENCE_TOKENS]
    for call in calls:
        refused = from_rpc_error(await rpc_error(call))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "page_token"), \
            refused.message


async def test_a_nul_in_any_text_field_is_invalid_not_internal(
        federation: Federation) -> None:
    """PostgreSQL text cannot hold U+0000: refused naming the field, nothing changed."""
    admin, gateway = federation.keys_stub("admin"), federation.keys_stub("gateway")
    issued = await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
    key_id = issued.key.key_id
    wrong_secret = format_key(key_id, new_secret())
    memory = federation.memory_stub("admin")
    calls = {
        "tenant_id": admin.ListKeys(kpb.ListKeysRequest(tenant_id="ac\x00me")),
        "description": admin.IssueKey(kpb.IssueKeyRequest(
            tenant_id="acme", scopes=["chat"], description="a\x00")),
        "reason": admin.RevokeKey(kpb.RevokeKeyRequest(key_id=key_id, reason="r\x00")),
        "source": gateway.VerifyKey(kpb.VerifyKeyRequest(key=wrong_secret, source="s\x00")),
        "reservation_id": gateway.SettleQuota(kpb.SettleQuotaRequest(
            key_id=key_id, reservation_id="rsv_\x00", used_tokens=1)),
        "lease_id": gateway.SettleQuotaLease(kpb.SettleQuotaLeaseRequest(
            key_id=key_id, lease_id="lse_\x00", used_tokens=1)),
    }
    reads = {
        "tenant_id": memory.ReadMemory(mpb.ReadMemoryRequest(tenant_id="\x00", sequence=1)),
        "actor": memory.SearchMemory(mpb.SearchMemoryRequest(actor="\x00")),
        "action_prefix": memory.SearchMemory(mpb.SearchMemoryRequest(action_prefix="k\x00")),
        "request_id": memory.SearchMemory(mpb.SearchMemoryRequest(request_id="\x00")),
    }
    for param, call in [*calls.items(), *reads.items()]:
        refused = from_rpc_error(await rpc_error(call))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, param), \
            refused.message
    blank = from_rpc_error(await rpc_error(admin.ListKeys(kpb.ListKeysRequest(tenant_id=" "))))
    assert (blank.code, blank.param) == (ErrorCode.INVALID_ARGUMENT, "tenant_id")
    listed = await admin.ListKeys(kpb.ListKeysRequest(tenant_id="acme"))
    assert [k.state for k in listed.keys] == [kpb.KEY_STATE_ACTIVE]


async def test_token_figures_past_the_counters_are_invalid_not_internal(
        federation: Federation) -> None:
    admin, gateway = federation.keys_stub("admin"), federation.keys_stub("gateway")
    key_id = (await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
              ).key.key_id
    for tokens in (2**64 - 1, 2**63 - 1):
        for call in (gateway.CheckQuota(kpb.CheckQuotaRequest(key_id=key_id, tokens=tokens)),
                     gateway.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=key_id, tokens=tokens))):
            refused = from_rpc_error(await rpc_error(call))
            assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "tokens")
    settle = from_rpc_error(await rpc_error(gateway.SettleQuota(kpb.SettleQuotaRequest(
        key_id=key_id, reservation_id="rsv_1", used_tokens=2**64 - 1))))
    assert (settle.code, settle.param) == (ErrorCode.INVALID_ARGUMENT, "used_tokens")
    # Nothing was charged, and the key's counter still takes charges.
    charged = await gateway.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=key_id, tokens=5))
    assert charged.status.tokens_used == 5


async def test_search_times_out_of_range_and_unknown_tiers_are_invalid(
        federation: Federation) -> None:
    memory = federation.memory_stub("admin")
    await memory.RecordMemory(mpb.RecordMemoryRequest(action="a.b", temperature=10))
    bad = {
        "start_time": mpb.SearchMemoryRequest(start_time=Timestamp(seconds=2**62)),
        "end_time": mpb.SearchMemoryRequest(end_time=Timestamp(seconds=-2**40)),
        "tier": mpb.SearchMemoryRequest(tier=99),  # type: ignore[arg-type]
    }
    bad_nanos = mpb.SearchMemoryRequest()
    bad_nanos.end_time.nanos = -5
    for param, request in [*bad.items(), ("end_time", bad_nanos)]:
        refused = from_rpc_error(await rpc_error(memory.SearchMemory(request)))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, param), \
            refused.message
    hot = await memory.SearchMemory(mpb.SearchMemoryRequest(tier=mpb.TEMPERATURE_TIER_HOT))
    assert list(hot.records) == []  # the record is cold: a defined tier still filters


async def test_thousands_of_unknown_scopes_get_a_short_invalid_argument(
        federation: Federation) -> None:
    scopes = [f"scope-{n:05d}-" + "x" * 60 for n in range(3000)]
    refused = await rpc_error(federation.keys_stub("admin").IssueKey(
        kpb.IssueKeyRequest(tenant_id="acme", scopes=scopes)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert "and 2995 more" in (refused.details() or "")
    assert len(refused.details() or "") < 1000


async def test_an_undecodable_request_is_invalid_argument_not_unknown(
        federation: Federation) -> None:
    """Bytes a stub of another language could send: a string field (actor, tenant_id)
    that is not UTF-8, or a corrupt encoding. Authorization still comes first."""
    def raw(port: int, role: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        channel = federation._channel(port, role)
        return channel.unary_unary(method, request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)

    search = raw(federation.memory.port, "admin", "/federation.v1.ThermalMemoryService/"
                                                  "SearchMemory")
    list_keys = raw(federation.keys.port, "admin", "/federation.v1.KeyAuthorityService/ListKeys")
    for call, body in ((search, b"\x22\x02\xff\xfe"), (search, b"\xff\xff\xff"),
                       (list_keys, b"\x0a\x02\xff\xfe")):
        refused = await rpc_error(call(body))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
        assert "DecodeError" not in (refused.details() or "")
    denied = await rpc_error(raw(federation.keys.port, "inference",
                                 "/federation.v1.KeyAuthorityService/ListKeys")(b"\xff"))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_key_id_with_a_trailing_newline_is_not_a_key_id(
        federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    key_id = (await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
              ).key.key_id
    for call in (admin.RevokeKey(kpb.RevokeKeyRequest(key_id=key_id + "\n")),
                 admin.GetKeyStrengthHistory(kpb.GetKeyStrengthHistoryRequest(
                     key_id=key_id + "\n"))):
        refused = from_rpc_error(await rpc_error(call))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "key_id")


async def test_reading_a_sequence_below_one_is_invalid(federation: Federation) -> None:
    memory = federation.memory_stub("admin")
    for sequence in (0, -1, -(2**63)):
        refused = from_rpc_error(await rpc_error(memory.ReadMemory(
            mpb.ReadMemoryRequest(sequence=sequence))))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "sequence")
    missing = from_rpc_error(await rpc_error(memory.ReadMemory(
        mpb.ReadMemoryRequest(sequence=2**63 - 1))))
    assert missing.code is ErrorCode.NOT_FOUND


async def test_counters_of_a_key_without_limits_saturate_rather_than_overflow(
        federation: Federation) -> None:
    """Such a key never starts a new period: its counters only grow. Charges of the most
    each call accepts used to overflow them, and every later charge failed (INTERNAL)."""
    admin, gateway = federation.keys_stub("admin"), federation.keys_stub("gateway")
    key_id = (await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
              ).key.key_id
    for _ in range(2):
        await gateway.GrantQuotaLease(kpb.GrantQuotaLeaseRequest(
            key_id=key_id, requests=2**31 - 1, need_tokens=2**62))
        await gateway.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=key_id, tokens=2**62,
                                                           is_request=True))
        await gateway.ReserveQuota(kpb.ReserveQuotaRequest(key_id=key_id, tokens=2**62))
    charged = await gateway.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=key_id, tokens=1,
                                                                 is_request=True))
    assert charged.status.tokens_used == 2**62 - 1
    checked = await gateway.CheckQuota(kpb.CheckQuotaRequest(key_id=key_id, tokens=2**62))
    assert checked.allowed


async def test_a_search_over_large_records_pages_within_the_message_limit(
        federation: Federation) -> None:
    memory = federation.memory_stub("admin")
    for n in range(3):  # each within a request; together past gRPC's 4 MiB
        await memory.RecordMemory(mpb.RecordMemoryRequest(
            action="big.record", subject=str(n),
            payload=mpb.AuditPayload(body=bytes([n]) * 1_500_000)))
    await memory.RecordMemory(mpb.RecordMemoryRequest(action="big.small"))
    subjects, token = [], ""
    while True:
        page = await memory.SearchMemory(mpb.SearchMemoryRequest(
            action_prefix="big.", page_token=token))
        subjects += [r.subject or r.action for r in page.records]
        if not (token := page.next_page_token):
            break
    assert subjects == ["big.small", "2", "1", "0"]


async def test_a_revocation_reason_past_the_limit_is_invalid(federation: Federation) -> None:
    admin = federation.keys_stub("admin")
    key_id = (await admin.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
              ).key.key_id
    refused = from_rpc_error(await rpc_error(admin.RevokeKey(kpb.RevokeKeyRequest(
        key_id=key_id, reason="r" * 1001))))
    assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "reason")
    revoked = await admin.RevokeKey(kpb.RevokeKeyRequest(key_id=key_id, reason="r" * 1000))
    assert revoked.key.state == kpb.KEY_STATE_REVOKED


async def test_an_unknown_required_scope_is_the_callers_mistake_not_the_keys(
        federation: Federation) -> None:
    issued = await federation.keys_stub("admin").IssueKey(
        kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]))
    gateway = federation.keys_stub("gateway")
    for scope in ("bogus", "chat\x00", "x" * 10_000):
        refused = from_rpc_error(await rpc_error(gateway.VerifyKey(kpb.VerifyKeyRequest(
            key=issued.secret, source="10.0.0.1", required_scope=scope))))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "required_scope")
        assert len(refused.message) < 200
    history = await federation.keys_stub("admin").GetKeyStrengthHistory(
        kpb.GetKeyStrengthHistoryRequest(key_id=issued.key.key_id))
    assert [s.kind for s in history.samples] == [kpb.STRENGTH_EVENT_KIND_ISSUED]


async def test_keys_fail_closed_when_memory_is_down(
    federation: Federation, database: Database
) -> None:
    await federation.memory.stop(0)
    admin = federation.keys_stub("admin")
    failed = await rpc_error(admin.IssueKey(kpb.IssueKeyRequest(tenant_id="a", scopes=["chat"])))
    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert "nothing was changed" in (failed.details() or "")
    assert await database.pool.fetchval("SELECT count(*) FROM api_keys") == 0


def cli_settings(federation: Federation) -> Settings:
    federation.pki.identity("admin", ADMIN_NAME)
    return Settings(home=federation.pki.home, peers=PeersConfig(
        keys=f"127.0.0.1:{federation.keys.port}", memory=f"127.0.0.1:{federation.memory.port}"))


async def run_cli(settings: Settings, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(await args.handler(settings, args))


async def test_cli_keys_and_audit_verify(
    federation: Federation, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    settings = cli_settings(federation)
    assert await run_cli(settings, "keys", "issue", "--tenant", "acme", "--scope", "chat",
                         "--rpm", "5") == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("fed_") and "\n" not in key
    key_id = key.split("_")[1]
    assert await run_cli(settings, "keys", "list", "--tenant", "acme", "--json") == 0
    assert key_id in capsys.readouterr().out
    assert await run_cli(settings, "keys", "rotate", key_id, "--grace", "1h") == 0
    assert capsys.readouterr().out.strip() != key
    assert await run_cli(settings, "keys", "strength", key_id) == 0
    assert "rotation" in capsys.readouterr().out
    assert await run_cli(settings, "keys", "quota", key_id) == 0
    tokens, requests = capsys.readouterr().out.splitlines()
    assert tokens == "tokens: 0 used, no token quota"
    assert requests.startswith("requests: 5 left this minute (resets in ")
    assert await run_cli(settings, "keys", "revoke", key_id, "--reason", "done") == 0
    assert await run_cli(settings, "audit", "verify") == 0
    assert "3 records verified" in capsys.readouterr().out

    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE memory_records SET actor = 'someone else' WHERE sequence = 2")
    finally:
        await conn.close()
    with pytest.raises(SystemExit) as exited:
        await run_cli(settings, "audit", "verify")
    assert exited.value.code != 0
    assert "broken at record 2" in capsys.readouterr().err
    assert await run_cli(settings, "audit", "verify", "--json") == 1


async def test_a_source_past_the_limit_is_invalid(federation: Federation) -> None:
    """The source is the key of a failed attempt's row: one past the index's 2704 bytes
    failed the attempt (INTERNAL), and a verified one failed every later flush of key
    uses. Refused naming the field; the longest allowed fits with the longest tenant."""
    admin, gateway = federation.keys_stub("admin"), federation.keys_stub("gateway")
    tenant = "\U0001F600" * 200  # 4 bytes a character, as the longest source below
    issued = await admin.IssueKey(kpb.IssueKeyRequest(tenant_id=tenant, scopes=["chat"]))
    wrong_secret = format_key(issued.key.key_id, new_secret())
    incompressible = base64.b64encode(os.urandom(3000)).decode()
    for key in (wrong_secret, issued.secret):
        for source in ("x" * (MAX_SOURCE_CHARS + 1), incompressible, "x" * 100_000):
            refused = from_rpc_error(await rpc_error(gateway.VerifyKey(kpb.VerifyKeyRequest(
                key=key, source=source, required_scope="chat"))))
            assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "source")
            assert len(refused.message) < 200
    history = await admin.GetKeyStrengthHistory(
        kpb.GetKeyStrengthHistoryRequest(key_id=issued.key.key_id))
    assert [s.kind for s in history.samples] == [kpb.STRENGTH_EVENT_KIND_ISSUED]
    longest = "".join(chr(0x10000 + (n * 7919) % 0xFFFF) for n in range(MAX_SOURCE_CHARS))
    refused = from_rpc_error(await rpc_error(gateway.VerifyKey(kpb.VerifyKeyRequest(
        key=wrong_secret, source=longest, required_scope="chat"))))
    assert refused.code is ErrorCode.UNAUTHENTICATED
    history = await admin.GetKeyStrengthHistory(
        kpb.GetKeyStrengthHistoryRequest(key_id=issued.key.key_id))
    assert history.samples[0].source == longest  # newest first
    verified = await gateway.VerifyKey(kpb.VerifyKeyRequest(
        key=issued.secret, source=longest, required_scope="chat"))
    assert verified.key.key_id == issued.key.key_id


async def test_the_largest_token_quota_is_the_most_a_counter_holds(
        federation: Federation) -> None:
    """Token counters saturate at MAX_TOKEN_QUOTA so that a counter plus a charge fits a
    bigint. A quota above it was accepted and never reached: a key of 2**62 tokens took
    a token, then another, for ever, its counter stuck one below the quota."""
    admin, gateway = federation.keys_stub("admin"), federation.keys_stub("gateway")
    day = Duration(seconds=86400)
    for too_many in (MAX_TOKEN_QUOTA + 1, 2**63 - 1):
        refused = from_rpc_error(await rpc_error(admin.IssueKey(kpb.IssueKeyRequest(
            tenant_id="acme", scopes=["chat"], token_quota=too_many, quota_period=day))))
        assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, "token_quota")
    issued = await admin.IssueKey(kpb.IssueKeyRequest(
        tenant_id="acme", scopes=["chat"], token_quota=MAX_TOKEN_QUOTA, quota_period=day))
    key_id = issued.key.key_id
    assert issued.key.token_quota == MAX_TOKEN_QUOTA

    def consume(tokens: int) -> Any:
        return gateway.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=key_id, tokens=tokens))

    over = from_rpc_error(await rpc_error(consume(MAX_TOKEN_QUOTA + 1)))
    assert over.code is ErrorCode.RESOURCE_EXHAUSTED
    assert (await consume(MAX_TOKEN_QUOTA - 1)).status.tokens_used == MAX_TOKEN_QUOTA - 1
    full = (await consume(1)).status
    assert (full.tokens_used, full.tokens_remaining) == (MAX_TOKEN_QUOTA, 0)
    for _ in range(2):
        spent = from_rpc_error(await rpc_error(consume(1)))
        assert spent.code is ErrorCode.RESOURCE_EXHAUSTED
    checked = await gateway.CheckQuota(kpb.CheckQuotaRequest(key_id=key_id, tokens=1))
    assert not checked.allowed and checked.status.tokens_used == MAX_TOKEN_QUOTA
    for call in (gateway.ReserveQuota(kpb.ReserveQuotaRequest(key_id=key_id, tokens=1,
                                                              min_tokens=1)),
                 gateway.GrantQuotaLease(kpb.GrantQuotaLeaseRequest(
                     key_id=key_id, requests=1, tokens=1, need_tokens=1, min_tokens=1))):
        assert from_rpc_error(await rpc_error(call)).code is ErrorCode.INSUFFICIENT_QUOTA
