"""What the edge broker sustains: uploads, leases and heartbeats.

Runs, in one go, against an embedded PostgreSQL in a temporary home:

* upload MB/s over mTLS loopback at 64 KiB and 1 MiB chunks through the broker
  (CRC32C per chunk, write, fsync-and-commit every 4 MiB, SHA-256 verification
  and content-addressed store at the end), next to a raw gRPC baseline measured
  in the same run: a client-streaming method that discards the bytes, over
  plaintext and over mTLS;
* lease throughput in jobs/s with PostgreSQL: devices leasing (up to 3) and
  completing jobs concurrently through the job queue, across two pools;
* heartbeats/s from 1,000 simulated devices in one process, each with its own
  certificate and channel, against the broker over mTLS: unary ``Heartbeat``
  calls and ``HeartbeatStream`` (one stream per device, one heartbeat answered
  at a time), next to raw gRPC baselines over the same number of mTLS channels:
  a unary method and a bidirectional stream that echo their messages (the
  ceilings a unary call and a streamed message reach on this machine). The
  simulated devices' channels carry no client interceptor, as a device has no
  request id to forward; every row uses the same kind of channel.

The servers run in a child process on the event loop a federation node uses
(uvloop where installed, see ``federation.cli``), the clients in this one.

Usage: python bench/edge.py [--upload-mib N] [--rounds N] [--jobs N] [--devices N]
                            [--seconds S] [--only uploads|leases|heartbeats]
                            [--compare TREE] [--profile-broker FILE]

Uploads run ``--rounds`` times per chunk size, every target once per round in
turn, and print min – max (median). ``--compare TREE`` starts a second broker
process whose code comes from another checkout (e.g. ``git archive HEAD``
unpacked somewhere) and uploads to it in the same rounds: an A/B under the same
machine load.

``--profile-broker FILE`` runs the broker process under cProfile and writes its
statistics to FILE (read with ``python -m pstats FILE``); figures are then lower.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
TREE_ENV = "EDGE_BENCH_TREE"
"""Set for a ``--compare`` child: its federation code is imported from that tree."""
sys.path.insert(0, os.environ.get(TREE_ENV) or str(ROOT))

from federation.channels import secure_channel  # noqa: E402
from federation.config import DatabaseConfig, EdgeConfig, GrpcConfig  # noqa: E402
from federation.credentials import ReloadingServerCredentials  # noqa: E402
from federation.db import Database, ensure_database  # noqa: E402
from federation.db.embedded import EmbeddedPostgres  # noqa: E402
from federation.edge.checksum import crc32c  # noqa: E402
from federation.edge.devices import DeviceRegistry  # noqa: E402
from federation.edge.jobs import JobQueue  # noqa: E402
from federation.edge.model import Capabilities  # noqa: E402
from federation.pki import CertificateAuthority, CertificateFiles, load_ca  # noqa: E402
from federation.v1 import edge_broker_pb2 as pb  # noqa: E402
from federation.v1 import edge_broker_pb2_grpc  # noqa: E402

MIB = 1 << 20
SINK = "/bench.Sink/Write"
TRUST_DOMAIN = "federation.local"


# -- the child process: broker + raw sink ---------------------------------------------


async def serve(home: Path, dsn: str) -> None:
    from federation.edge.broker import EdgeBroker
    from federation.server import NodeServer
    from nodes.edge import registration

    ca = load_ca(home, TRUST_DOMAIN)
    files = ca.issue("broker", f"bench-{os.getpid()}")  # one per child: they start together
    database = Database(dsn, DatabaseConfig(pool_min_size=4, pool_max_size=20), migrate=False)
    await database.start()
    broker = EdgeBroker.create(database.pool, EdgeConfig(), home, ca.edge_signer(), None)
    server = NodeServer(
        [registration(broker)], trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(),
        listen="127.0.0.1:0", credentials=files, metrics_port=None,
    )
    await server.start()
    sink = grpc.aio.server()
    sink.add_generic_rpc_handlers([_sink_handler()])
    plain_port = sink.add_insecure_port("127.0.0.1:0")
    tls_port = sink.add_secure_port(
        "127.0.0.1:0", ReloadingServerCredentials(files).credentials)
    await sink.start()
    print(json.dumps({"broker": server.port, "plain": plain_port, "tls": tls_port}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    await sink.stop(0)
    await server.stop(0)
    await database.stop()


def run_child(home: Path, dsn: str, profile: str | None) -> None:
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    with contextlib.suppress(ImportError):  # as every federation process: uvloop if installed
        import uvloop

        run = uvloop.run
    if profile is None:
        run(serve(home, dsn))
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run(serve(home, dsn))
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


def _sink_handler() -> grpc.GenericRpcHandler:
    async def write(requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = 0
        async for data in requests:
            total += len(data)
        return str(total).encode()

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def echo_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Write": grpc.stream_unary_rpc_method_handler(write),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
    }
    return grpc.method_handlers_generic_handler("bench.Sink", handlers)


# -- uploads ---------------------------------------------------------------------------


async def raw_upload(channel: grpc.aio.Channel, data: bytes, chunk: int) -> float:
    write: Any = channel.stream_unary(SINK)

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(data), chunk):
            yield data[offset : offset + chunk]

    started = time.perf_counter()
    await write(chunks())
    return len(data) / MIB / (time.perf_counter() - started)


async def broker_upload(stub: Any, data: bytes, chunk: int) -> float:
    digest = hashlib.sha256(data).digest()

    async def messages() -> AsyncIterator[pb.UploadRequest]:
        yield pb.UploadRequest(start=pb.UploadStart(
            upload_id=f"bench-{chunk}-{digest.hex()[:16]}", total_size=len(data), sha256=digest
        ))
        for offset in range(0, len(data), chunk):
            piece = data[offset : offset + chunk]
            yield pb.UploadRequest(
                chunk=pb.UploadChunk(offset=offset, data=piece, crc32c=crc32c(piece))
            )
        yield pb.UploadRequest(finish=True)

    started = time.perf_counter()
    reply = await stub.Upload(messages())
    assert reply.complete, reply
    return len(data) / MIB / (time.perf_counter() - started)


async def bench_uploads(
    ports: dict[str, int], files: CertificateFiles, mib: int, rounds: int,
    compare: dict[str, int] | None,
) -> list[str]:
    """Each round uploads once to every target in turn, so all see the same load
    (the two brokers swap places every other round)."""
    config = GrpcConfig()
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}")
    tls = secure_channel(f"localhost:{ports['tls']}", files, config)
    channels = [plain, tls, secure_channel(f"localhost:{ports['broker']}", files, config)]
    if compare is not None:
        channels.append(secure_channel(f"localhost:{compare['broker']}", files, config))
    stubs = [edge_broker_pb2_grpc.EdgeBrokerServiceStub(c) for c in channels[2:]]
    names = ["broker Upload, mTLS", "broker Upload, mTLS, --compare tree"]
    rows = []
    for chunk in (64 * 1024, MIB):
        base = os.urandom(mib * MIB)
        await raw_upload(plain, base[: 8 * MIB], chunk)  # warm-up (connection, TLS)
        rates: dict[str, list[float]] = {}
        for n in range(rounds):
            rates.setdefault("raw gRPC, plaintext", []).append(
                await raw_upload(plain, base, chunk))
            rates.setdefault("raw gRPC, mTLS", []).append(await raw_upload(tls, base, chunk))
            brokers = list(zip(names, stubs, strict=False))
            for name, stub in brokers[:: -1 if n % 2 else 1]:  # alternate who goes first
                fresh = f"{chunk}-{n}-{name}".encode().ljust(64) + base[64:]  # a new blob
                rates.setdefault(name, []).append(await broker_upload(stub, fresh, chunk))
        rows += [f"| upload {chunk // 1024:>5} KiB chunks, {rounds} rounds | {name:<36} | "
                 f"{_spread(values)} MB/s |" for name, values in rates.items()]
    for channel in channels:
        await channel.close()
    return rows


def _spread(values: list[float]) -> str:
    """min–max (median) of a run's rounds."""
    ordered = sorted(values)
    return f"{ordered[0]:6.0f} – {ordered[-1]:6.0f} ({ordered[len(ordered) // 2]:.0f})"


# -- leases ----------------------------------------------------------------------------


async def bench_leases(dsn: str, jobs: int, devices: int) -> list[str]:
    config = EdgeConfig()
    pools = [Database(dsn, DatabaseConfig(pool_min_size=4, pool_max_size=16), migrate=False)
             for _ in range(2)]
    for db in pools:
        await db.start()
    try:
        pool = pools[0].pool
        await pool.execute(
            """
            INSERT INTO edge_jobs (tenant_id, job_id, kind, job_type, max_attempts, inline_payload)
            SELECT 'bench', gen_random_uuid(), 'echo', 2, 3, '\\x00' FROM generate_series(1, $1)
            """,
            jobs,
        )
        registry = DeviceRegistry(pool, config)
        for n in range(devices):
            await registry.register(f"lease-{n}", Capabilities(cpu_cores=4))
        queues = [JobQueue(db.pool, config) for db in pools]
        leased = 0

        async def device(n: int) -> None:
            nonlocal leased
            queue = queues[n % 2]
            while leases := await queue.lease(f"lease-{n}", 3):
                leased += len(leases)
                for lease in leases:
                    await queue.complete(f"lease-{n}", lease.job.job_id, lease.fencing_token,
                                         inline_result=b"ok")

        started = time.perf_counter()
        await asyncio.gather(*(device(n) for n in range(devices)))
        elapsed = time.perf_counter() - started
        assert leased == jobs, (leased, jobs)
        lease_only = await _lease_only_rate(queues[0], registry, pool, devices)
    finally:
        for db in pools:
            await db.stop()
    return [
        f"| lease + complete, {devices} devices, 2 pools | {jobs} jobs "
        f"| {jobs / elapsed:8.0f} jobs/s |",
        f"| LeaseJobs calls alone, {devices} devices | 3 per call | {lease_only:8.0f} leases/s |",
    ]


async def _lease_only_rate(
    queue: JobQueue, registry: DeviceRegistry, pool: Any, devices: int
) -> float:
    total = 3000
    await pool.execute(
        "INSERT INTO edge_jobs (tenant_id, job_id, kind, job_type, max_attempts, inline_payload) "
        "SELECT 'bench', gen_random_uuid(), 'echo', 2, 3, '\\x00' FROM generate_series(1, $1)",
        total,
    )
    count = 0

    async def device(n: int) -> None:
        nonlocal count
        name = f"only-{n}"
        await registry.register(name, Capabilities())
        await pool.execute(  # leases are released as if completed, to keep leasing
            "UPDATE edge_devices SET smoothed_latency_ms = 0 WHERE device_id = $1", name
        )
        while leases := await queue.lease(name, 3):
            count += len(leases)
            await pool.execute(
                "UPDATE edge_jobs SET state = 'succeeded' WHERE job_id = ANY($1::uuid[])",
                [lease.job.job_id for lease in leases],
            )

    started = time.perf_counter()
    await asyncio.gather(*(device(n) for n in range(devices)))
    return count / (time.perf_counter() - started)


# -- driver ----------------------------------------------------------------------------


def _start_child(
    home: Path, dsn: str, extra: list[str], tree: str | None
) -> subprocess.Popen[str]:
    """The servers' process; with ``tree``, the broker's code comes from that tree."""
    env = {**os.environ, TREE_ENV: str(Path(tree).resolve())} if tree else None
    return subprocess.Popen(
        [sys.executable, __file__, "--serve", str(home), dsn, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )


async def _ports(child: subprocess.Popen[str]) -> dict[str, int]:
    assert child.stdout is not None
    ports: dict[str, int] = json.loads(await asyncio.to_thread(child.stdout.readline))
    return ports


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        home = Path(tmp) / "home"
        ca = CertificateAuthority.init(home, TRUST_DOMAIN)
        client = ca.issue("edge", "bench-client")
        pg = EmbeddedPostgres(Path(tmp) / "pg" / "data")
        dsn_info = await asyncio.to_thread(pg.start)
        try:
            await ensure_database(dsn_info.url("postgres"), "bench")
            dsn = dsn_info.url("bench")
            db = Database(dsn, DatabaseConfig())
            await db.start()  # migrate
            await db.stop()
            profile = ["--profile-broker", args.profile_broker] if args.profile_broker else []
            children = [_start_child(home, dsn, profile, None)]
            if args.compare:
                children.append(_start_child(home, dsn, [], args.compare))
            try:
                ports, *others = [await _ports(child) for child in children]
                rows = []
                if args.only in (None, "uploads"):
                    rows += await bench_uploads(
                        ports, client, args.upload_mib, args.rounds, others[0] if others else None
                    )
                if args.only in (None, "leases"):
                    rows += await bench_leases(dsn, args.jobs, args.lease_devices)
                if args.only in (None, "heartbeats"):
                    # Imported here, in the parent only: a --compare child imports
                    # ``bench`` from the other tree, which may not have this module.
                    from bench.edge_heartbeats import bench_heartbeats

                    rows += await bench_heartbeats(ports, ca, args.devices, args.seconds)
            finally:
                for child in children:
                    with contextlib.suppress(Exception):
                        assert child.stdin is not None
                        child.stdin.close()
                        child.wait(10)
        finally:
            await asyncio.to_thread(pg.stop)
    print(f"edge broker benchmark ({os.cpu_count()} CPUs, grpcio {grpc.__version__})")
    print("| what | how | result |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=2, metavar=("HOME", "DSN"), help=argparse.SUPPRESS)
    parser.add_argument("--upload-mib", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--lease-devices", type=int, default=50)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", choices=("uploads", "leases", "heartbeats"))
    parser.add_argument("--rounds", type=int, default=3, help="upload rounds per chunk size")
    parser.add_argument("--compare", metavar="TREE",
                        help="also upload to a broker running another source tree's code")
    parser.add_argument("--profile-broker", metavar="FILE")
    cli_args = parser.parse_args()
    if cli_args.serve:
        run_child(Path(cli_args.serve[0]), cli_args.serve[1], cli_args.profile_broker)
    else:
        asyncio.run(main(cli_args))
