"""``federation keys …``: issue, list, revoke, rotate and inspect API keys (as admin)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import grpc

from federation.cli.arguments import INT32_MAX, integer, seconds
from federation.cli.support import all_pages, print_json, proto_json
from federation.config import Settings
from federation.errors import CommandError
from federation.keys.models import MAX_REQUESTS_PER_MINUTE, MAX_TOKEN_QUOTA, SCOPES
from federation.launch.endpoints import admin_channel
from federation.prototime import duration, to_seconds
from federation.v1 import key_authority_pb2 as pb
from federation.v1 import key_authority_pb2_grpc as pb_grpc


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = subparsers.add_parser(
        "keys", help="API keys: issue, list, revoke, rotate, quota, strength")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    issue = sub.add_parser("issue", help="issue a key; prints only the key unless --json")
    issue.add_argument("--tenant", required=True, help="the tenant the key acts for")
    issue.add_argument("--scope", action="append", required=True,
                       help="what the key may do; repeatable, one of: "
                            + ", ".join(sorted(SCOPES)))
    issue.add_argument("--rpm", type=integer(1, MAX_REQUESTS_PER_MINUTE),
                       help="requests per minute (default: unlimited)")
    issue.add_argument("--token-quota", type=integer(1, MAX_TOKEN_QUOTA),
                       help="tokens per quota period")
    issue.add_argument("--quota-period", type=seconds,
                       help="length of the token quota period (default 1d; needs "
                            "--token-quota)")
    issue.add_argument("--description", default="", help="a note for operators")
    issue.add_argument("--ttl", type=seconds,
                       help="lifetime, e.g. 90d or 12h (default: no expiry)")
    issue.add_argument("--json", action="store_true",
                       help="print the key and its metadata as JSON")
    issue.set_defaults(handler=issue_key)

    listing = sub.add_parser("list", help="a tenant's keys (never secrets)")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--include-revoked", action="store_true")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=list_keys)

    revoke = sub.add_parser("revoke", help="permanently revoke a key")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.add_argument("--reason", default="")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=revoke_key)

    rotate = sub.add_parser("rotate", help="new secret; the old one works for --grace")
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument("--grace", type=seconds,
                        help="how long the old secret keeps working (default: keys setting)")
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(handler=rotate_key)

    quota = sub.add_parser("quota", help="a key's quota usage in the current windows")
    quota.add_argument("key_id", metavar="KEY_ID")
    quota.add_argument("--json", action="store_true")
    quota.set_defaults(handler=key_quota)

    strength = sub.add_parser("strength", help="a key's current strength and its history")
    strength.add_argument("key_id", metavar="KEY_ID")
    strength.add_argument("--limit", type=integer(1, INT32_MAX), default=20)
    strength.add_argument("--json", action="store_true")
    strength.set_defaults(handler=key_strength)


def _stub(channel: grpc.aio.Channel) -> pb_grpc.KeyAuthorityServiceAsyncStub:
    return pb_grpc.KeyAuthorityServiceStub(channel)


async def issue_key(settings: Settings, args: argparse.Namespace) -> int:
    request = pb.IssueKeyRequest(tenant_id=args.tenant, scopes=args.scope,
                                 description=args.description)
    if args.rpm is not None:
        request.requests_per_minute = args.rpm
    if args.quota_period is not None and args.token_quota is None:
        raise CommandError("--quota-period is the period of --token-quota: give both")
    if args.token_quota is not None:
        request.token_quota = args.token_quota
        request.quota_period.CopyFrom(duration(args.quota_period or 86400.0))
    if args.ttl is not None:
        request.ttl.CopyFrom(duration(args.ttl))
    async with admin_channel(settings, "keys") as channel:
        response = await _stub(channel).IssueKey(
            request, timeout=settings.grpc.call_timeout_seconds)
    if args.json:
        print_json({"key": response.secret, "metadata": proto_json(response.key)})
    else:
        print(response.secret)
    return 0


async def list_keys(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_channel(settings, "keys") as channel:
        async def fetch(token: str) -> tuple[Sequence[pb.ApiKey], str]:
            page = await _stub(channel).ListKeys(pb.ListKeysRequest(
                tenant_id=args.tenant, include_revoked=args.include_revoked, page_size=1000,
                page_token=token), timeout=settings.grpc.call_timeout_seconds)
            return page.keys, page.next_page_token

        keys = await all_pages(fetch)
    if args.json:
        print_json([proto_json(k) for k in keys])
        return 0
    for key in keys:
        state = pb.KeyState.Name(key.state).removeprefix("KEY_STATE_").lower()
        print(f"{key.key_id}  {state:<9}  strength {key.strength:.2f}  "
              f"scopes {','.join(key.scopes)}  {key.description}".rstrip())
    return 0


async def revoke_key(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_channel(settings, "keys") as channel:
        response = await _stub(channel).RevokeKey(
            pb.RevokeKeyRequest(key_id=args.key_id, reason=args.reason),
            timeout=settings.grpc.call_timeout_seconds)
    if args.json:
        print_json(proto_json(response.key))
    else:
        print(f"revoked {response.key.key_id}")
    return 0


async def rotate_key(settings: Settings, args: argparse.Namespace) -> int:
    grace = settings.keys.rotation_grace_seconds if args.grace is None else args.grace
    async with admin_channel(settings, "keys") as channel:
        response = await _stub(channel).RotateKey(
            pb.RotateKeyRequest(key_id=args.key_id, grace_period=duration(grace)),
            timeout=settings.grpc.call_timeout_seconds)
    if args.json:
        print_json({"key": response.secret, "metadata": proto_json(response.key),
                    "old_secret_expires_at": (response.old_secret_expires_at.ToJsonString()
                                              if response.HasField("old_secret_expires_at")
                                              else None)})
    else:
        print(response.secret)
    return 0


async def key_strength(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_channel(settings, "keys") as channel:
        response = await _stub(channel).GetKeyStrengthHistory(
            pb.GetKeyStrengthHistoryRequest(key_id=args.key_id, page_size=args.limit),
            timeout=settings.grpc.call_timeout_seconds)
    samples = list(response.samples)
    if args.json:
        print_json({"key_id": args.key_id,
                    "strength": samples[0].strength if samples else None,
                    "history": [proto_json(s) for s in samples]})
        return 0
    if samples:
        print(f"{args.key_id}: strength {samples[0].strength:.3f} (1.0 = ceiling)")
    for sample in samples:
        kind = pb.StrengthEventKind.Name(sample.kind).removeprefix("STRENGTH_EVENT_KIND_").lower()
        source = f"  from {sample.source}" if sample.source else ""
        print(f"  {sample.time.ToJsonString()}  {sample.strength:.3f}  {kind}{source}")
    return 0


async def key_quota(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_channel(settings, "keys") as channel:
        response = await _stub(channel).CheckQuota(
            pb.CheckQuotaRequest(key_id=args.key_id),
            timeout=settings.grpc.call_timeout_seconds)
    status = response.status
    if args.json:
        print_json({"key_id": args.key_id, **proto_json(status)})
        return 0
    if status.HasField("tokens_remaining"):
        total = status.tokens_used + status.tokens_remaining
        print(f"tokens: {status.tokens_used} of {total} used, {status.tokens_remaining} left "
              f"(in-flight reservations count as used); period ends "
              f"{status.period_end_time.ToJsonString()}")
    else:
        print(f"tokens: {status.tokens_used} used, no token quota")
    if status.HasField("requests_remaining"):
        reset = to_seconds(status.requests_reset_in)
        print(f"requests: {status.requests_remaining} left this minute (resets in {reset:.0f}s)")
    else:
        print("requests: no rate limit")
    return 0
