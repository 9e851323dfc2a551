"""``federation audit …``: verify the thermal memory chain, follow a request's trail."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import grpc

from federation.backup.report import describe_restore
from federation.cli.arguments import INT64_MAX, integer
from federation.cli.support import all_pages, fail, print_json, proto_json
from federation.config import Settings
from federation.launch.endpoints import admin_channel
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = subparsers.add_parser("audit", help="the tamper-evident audit log (thermal memory)")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    verify = sub.add_parser(
        "verify", help="recompute the hash chain, check it against the guardian's signed "
                       "checkpoints; non-zero if either fails")
    verify.add_argument("--from", dest="from_sequence", type=integer(0, INT64_MAX), default=0)
    verify.add_argument("--to", dest="to_sequence", type=integer(0, INT64_MAX), default=0)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=verify_chain)

    trail = sub.add_parser("trail", help="every record written for one request id")
    trail.add_argument("request_id", metavar="REQUEST_ID")
    trail.add_argument("--tenant", default="", help="only this tenant's records")
    trail.add_argument("--json", action="store_true")
    trail.set_defaults(handler=request_trail)


def _stub(channel: grpc.aio.Channel) -> pb_grpc.ThermalMemoryServiceAsyncStub:
    return pb_grpc.ThermalMemoryServiceStub(channel)


async def verify_chain(settings: Settings, args: argparse.Namespace) -> int:
    async with admin_channel(settings, "memory") as channel:
        report = await _stub(channel).VerifyChain(
            pb.VerifyChainRequest(from_sequence=args.from_sequence, to_sequence=args.to_sequence),
            timeout=max(settings.grpc.call_timeout_seconds, 300.0))
    if args.json:
        print_json(proto_json(report))
        return 0 if report.intact else 1
    checkpoint = (
        f"last guardian checkpoint: record {report.last_checkpoint_sequence}, signatures "
        + ("checked" if report.checkpoint_signatures_checked else
           "NOT checked: no copy of the guardian's public keys on the memory host")
        if report.HasField("last_checkpoint_sequence") else "no guardian checkpoint"
    )
    if not report.intact:
        fail(f"audit chain broken at record {report.first_bad_sequence}: {report.problem} "
             f"({report.records_checked} records verified; {checkpoint})")
    print(f"audit chain intact: {report.records_checked} records verified ({checkpoint})")
    for restore in report.restores:
        print(describe_restore(restore))
    return 0


async def request_trail(settings: Settings, args: argparse.Namespace) -> int:
    if not args.request_id.strip():  # an empty filter would list every record there is
        fail("a request id is needed (the x-request-id of the answer)")
    async with admin_channel(settings, "memory") as channel:
        async def fetch(token: str) -> tuple[Sequence[pb.MemoryRecord], str]:
            page = await _stub(channel).SearchMemory(pb.SearchMemoryRequest(
                tenant_id=args.tenant, request_id=args.request_id, page_size=1000,
                page_token=token), timeout=settings.grpc.call_timeout_seconds)
            return page.records, page.next_page_token

        records = await all_pages(fetch)
    records.reverse()  # oldest first reads as a story
    if args.json:
        print_json([proto_json(r) for r in records])
        return 0
    if not records:
        fail(f"no audit records for request {args.request_id}")
    for record in records:
        attributes = " ".join(f"{k}={v}" for k, v in sorted(record.payload.attributes.items()))
        print(f"#{record.sequence} {record.create_time.ToJsonString()} {record.action} "
              f"{record.subject} by {record.actor} tenant={record.tenant_id or '-'} "
              f"{attributes}".rstrip())
    return 0
