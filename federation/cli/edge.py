"""``federation edge …``: enroll and run devices, upload, and operate the job queue.

Operator commands (``token``, ``revoke``) write to the broker's PostgreSQL
directly (``FEDERATION_DATABASE_URL`` or the running federation's
endpoints.json); ``jobs`` talks to the broker as the local operator (admin).
Device commands (``enroll``, ``agent``, ``upload``) use only the device's own
credentials directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from cryptography import x509

from federation.cli.arguments import INT32_MAX, integer, seconds
from federation.cli.support import print_json, print_json_line
from federation.config import Settings
from federation.db import DatabaseUnavailable, create_pool
from federation.edge.convert import STATE_FROM_PB
from federation.edge.device.agent import AgentOptions, EdgeAgent
from federation.edge.device.client import (
    DeviceChannels,
    ProgressBar,
    Stub,
    device_channel,
    device_files,
    enroll,
    upload_file,
)
from federation.edge.devices import DeviceRegistry
from federation.edge.enrollment import create_token
from federation.errors import CommandError
from federation.launch.endpoints import admin_channel, database_url, operator_actor
from federation.paging import MAX_PAGE_SIZE
from federation.prototime import timestamp, to_datetime
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc

_STATE_NAMES = {state.value: number for number, state in STATE_FROM_PB.items()}


def register(commands: Any) -> None:
    edge = commands.add_parser("edge", help="edge devices: enrollment, agent, uploads, jobs")
    sub = edge.add_subparsers(dest="edge_command", required=True, metavar="ACTION")
    _add_operator_commands(sub)
    _add_device_commands(sub)
    _add_jobs(sub)


def _add_operator_commands(sub: Any) -> None:
    token = sub.add_parser("token", help="print a one-time enrollment token for a device")
    token.add_argument("--name", required=True, help="device name (its identity)")
    token.add_argument("--ttl", type=seconds, default=None,
                       help="lifetime, e.g. 10m, 1h (default 10m)")
    token.add_argument("--json", action="store_true")
    token.set_defaults(handler=_token)
    revoke = sub.add_parser("revoke", help="revoke a device: every later call fails")
    revoke.add_argument("name")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=_revoke)


def _add_device_commands(sub: Any) -> None:
    enroll_cmd = sub.add_parser("enroll", help="enroll this device with a token")
    enroll_cmd.add_argument("--broker", required=True, help="HOST:PORT of the enrollment port")
    enroll_cmd.add_argument("--ca", required=True, type=Path, help="federation CA certificate")
    enroll_cmd.add_argument("--token", required=True)
    enroll_cmd.add_argument("--out", required=True, type=Path, help="credentials directory")
    enroll_cmd.add_argument("--device-name", default="", help="human-readable name")
    enroll_cmd.add_argument("--json", action="store_true")
    enroll_cmd.set_defaults(handler=_enroll)
    agent = sub.add_parser("agent", help="run the reference edge agent")
    _device_arguments(agent)
    agent.add_argument("--simulate-latency-ms", type=float, default=0.0)
    agent.add_argument("--max-jobs", type=int, default=3)
    agent.add_argument("--sensor", action="append", default=[], help="advertise a sensor")
    agent.set_defaults(handler=_agent)
    upload = sub.add_parser("upload", help="upload a file (resumable); prints its digest")
    upload.add_argument("file", type=Path)
    _device_arguments(upload)
    # Under gRPC's 4 MiB message limit; the broker takes its own range (64 KiB to 1 MiB).
    upload.add_argument("--chunk-size", type=integer(1, (4 << 20) - (64 << 10)),
                        default=1 << 20)
    upload.add_argument("--json", action="store_true")
    upload.set_defaults(handler=_upload)


def _device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cert-dir", required=True, type=Path, help="from `edge enroll --out`")
    parser.add_argument("--broker", required=True, help="HOST:PORT of the broker (mTLS port)")


def _add_jobs(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="submit, watch and list edge jobs (operator)")
    actions = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    submit = actions.add_parser("submit", help="queue a job")
    submit.add_argument("--tenant", required=True)
    submit.add_argument("--kind", required=True, help="echo, sha256, sleep, generate, …")
    submit.add_argument("--type", choices=("batch", "realtime"), default="batch")
    payload = submit.add_mutually_exclusive_group()
    payload.add_argument("--payload", default="", help="inline payload text")
    payload.add_argument("--blob", help="payload blob digest (sha256:…)")
    submit.add_argument("--priority", type=integer(-INT32_MAX - 1, INT32_MAX), default=0)
    submit.add_argument("--deadline", type=seconds, help="time from now, e.g. 30s, 5m")
    submit.add_argument("--max-attempts", type=integer(0, INT32_MAX), default=0)
    submit.add_argument("--sensor", action="append", default=[], help="required sensor")
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(handler=_jobs_submit)
    watch = actions.add_parser("watch", help="stream a job's state until it finishes")
    watch.add_argument("job_id")
    watch.add_argument("--json", action="store_true")
    watch.set_defaults(handler=_jobs_watch)
    listing = actions.add_parser("list", help="list a tenant's jobs, newest first")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--state", choices=sorted(_STATE_NAMES))
    listing.add_argument("--limit", type=integer(1, INT32_MAX), default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_jobs_list)


# -- operator ---------------------------------------------------------------------


async def _with_pool(settings: Settings) -> asyncpg.Pool:
    try:
        return await create_pool(database_url(settings), settings.database,
                                 min_size=1, max_size=2)
    except DatabaseUnavailable as exc:
        raise CommandError(str(exc)) from exc


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    ttl = dt.timedelta(seconds=args.ttl if args.ttl is not None
                       else settings.edge.token_ttl_seconds)
    pool = await _with_pool(settings)
    try:
        token = await create_token(pool, args.name, ttl, actor=operator_actor(settings))
    finally:
        await pool.close()
    expires = dt.datetime.now(dt.UTC) + ttl
    if args.json:
        print_json({"token": token, "name": args.name, "expires_at": expires.isoformat()})
    else:
        print(token)
        print(f"one-time token for device {args.name}, valid until {expires:%Y-%m-%d %H:%M:%S} "
              "UTC", file=sys.stderr)
    return 0


async def _revoke(settings: Settings, args: argparse.Namespace) -> int:
    pool = await _with_pool(settings)
    try:
        enrolled = await DeviceRegistry(pool, settings.edge).revoke(
            args.name, actor=operator_actor(settings))
    finally:
        await pool.close()
    if args.json:
        print_json({"device": args.name, "state": "revoked", "had_enrolled": enrolled})
    elif enrolled:
        print(f"revoked device {args.name}; its leases were returned to the queue")
    else:
        print(f"no device has enrolled as {args.name}; the name is revoked, so no token "
              "can enroll it (check the spelling if you meant an enrolled device)")
    return 0


# -- device -----------------------------------------------------------------------


async def _enroll(settings: Settings, args: argparse.Namespace) -> int:
    try:
        ca_pem = args.ca.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{args.ca} does not exist") from None
    try:  # checked here: gRPC would only say it could not make a TLS handshaker
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise CommandError(f"{args.ca} is not a PEM certificate (the federation's CA, "
                           "pki/ca.pem on the CA host)") from None
    args.out.mkdir(parents=True, exist_ok=True)
    reply = await enroll(args.broker, ca_pem, args.token, args.device_name, args.out)
    files = device_files(args.out)
    not_after = to_datetime(reply.not_after)
    if args.json:
        print_json({"device_id": reply.device_id, "identity": files.identity.spiffe_id,
                    "cert_dir": str(args.out.resolve()), "not_after": not_after.isoformat()})
    else:
        print(f"enrolled {files.identity.spiffe_id}; credentials in {args.out} "
              f"(key never left this device), certificate valid until {not_after:%Y-%m-%d %H:%M}")
    return 0


@contextlib.asynccontextmanager
async def _device_stub(settings: Settings, args: argparse.Namespace) -> AsyncIterator[Stub]:
    # The channel object must outlive the calls: a collected channel closes itself.
    async with device_channel(args.broker, args.cert_dir, settings.grpc) as channel:
        yield edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)


async def _agent(settings: Settings, args: argparse.Namespace) -> int:
    options = AgentOptions(
        max_jobs=args.max_jobs,
        simulate_latency_ms=args.simulate_latency_ms,
        capabilities=pb.DeviceCapabilities(sensors=args.sensor),
    )
    channels = DeviceChannels(args.broker, args.cert_dir, settings.grpc)
    agent = EdgeAgent(channels.stub(), options, cert_dir=args.cert_dir,
                      rebuild_stub=channels.rebuild)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    identity = device_files(args.cert_dir).identity
    print(f"agent {identity.spiffe_id} working for {args.broker}; Ctrl-C to stop",
          file=sys.stderr)
    try:
        await agent.run(stop)
    finally:
        await channels.close()
    print(f"stopped after {len(agent.completed)} jobs; held leases returned", file=sys.stderr)
    return 0


async def _upload(settings: Settings, args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise CommandError(f"{args.file} is not a file")
    bar = ProgressBar()
    try:
        async with _device_stub(settings, args) as stub:
            digest = await upload_file(stub, args.file, chunk_size=args.chunk_size, progress=bar)
    finally:
        bar.close()
    if args.json:
        print_json({"file": str(args.file), "blob_digest": digest})
    else:
        print(digest)
    return 0


# -- operator jobs ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _admin_stub(settings: Settings) -> AsyncIterator[Stub]:
    async with admin_channel(settings, "broker") as channel:
        yield edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)


def _job_summary(job: pb.Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "tenant_id": job.tenant_id,
        "kind": job.kind,
        "type": pb.JobType.Name(job.type).removeprefix("JOB_TYPE_").lower(),
        "state": pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
        "attempts": job.attempts,
        "last_error": job.last_error,
        "leased_by": job.leased_by_device,
        "result": _result_text(job),
    }


def _result_text(job: pb.Job) -> str:
    if job.WhichOneof("result") == "result_blob_digest":
        return job.result_blob_digest
    return job.inline_result.decode(errors="replace")[:200]


async def _jobs_submit(settings: Settings, args: argparse.Namespace) -> int:
    request = pb.SubmitJobRequest(
        tenant_id=args.tenant,
        kind=args.kind,
        type=pb.JOB_TYPE_REALTIME if args.type == "realtime" else pb.JOB_TYPE_BATCH,
        priority=args.priority,
        max_attempts=args.max_attempts,
        requirements=pb.JobRequirements(sensors=args.sensor),
    )
    if args.blob:
        request.payload_blob_digest = args.blob
    else:
        request.inline_payload = args.payload.encode()
    if args.deadline:
        request.deadline.CopyFrom(
            timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=args.deadline))
        )
    async with _admin_stub(settings) as stub:
        job = (await stub.SubmitJob(request)).job
    if args.json:
        print_json(_job_summary(job))
    else:
        print(job.job_id)
    return 0


async def _jobs_watch(settings: Settings, args: argparse.Namespace) -> int:
    final: pb.Job | None = None
    async with _admin_stub(settings) as stub:
        async for update in stub.WatchJob(pb.WatchJobRequest(job_id=args.job_id)):
            final = update.job
            summary = _job_summary(update.job)
            if args.json:
                print_json_line(summary)  # one object per update, as it happens
            else:
                print(f"{summary['state']:<12} attempts={summary['attempts']} "
                      f"{summary['leased_by'] or ''} {summary['last_error'] or summary['result']}",
                      flush=True)
    return 0 if final is not None and final.state == pb.JOB_STATE_SUCCEEDED else 1


async def list_jobs(stub: Stub, request: pb.ListJobsRequest, limit: int) -> list[pb.Job]:
    """Up to ``limit`` jobs, newest first, page after page: the broker answers at most
    ``MAX_PAGE_SIZE`` a page, and ``--limit`` is the operator's number, not the page's."""
    jobs: list[pb.Job] = []
    while len(jobs) < limit:
        request.page_size = min(limit - len(jobs), MAX_PAGE_SIZE)
        reply = await stub.ListJobs(request)
        jobs.extend(reply.jobs)
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    return jobs


async def _jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    request = pb.ListJobsRequest(
        tenant_id=args.tenant,
        state=_STATE_NAMES[args.state] if args.state else pb.JOB_STATE_UNSPECIFIED,  # type: ignore[arg-type]
    )
    async with _admin_stub(settings) as stub:
        jobs = await list_jobs(stub, request, args.limit)
    rows = [_job_summary(job) for job in jobs]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        print(f"{row['job_id']}  {row['state']:<11} {row['type']:<8} {row['kind']:<10} "
              f"attempts={row['attempts']}")
    if not rows:
        print("no jobs", file=sys.stderr)
    return 0
