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
  certificate and channel, against the broker over mTLS, next to a raw gRPC
  baseline: the same number of mTLS channels calling a unary method that
  echoes its request (the ceiling any unary RPC reaches on this machine).

The servers run in a child process on the event loop a federation node uses
(uvloop where installed, see ``federation.cli``), the clients in this one.

Usage: python bench/edge.py [--upload-mib N] [--jobs N] [--devices N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation.channels import secure_channel  # noqa: E402
from federation.config import DatabaseConfig, EdgeConfig, GrpcConfig  # noqa: E402
from federation.db import Database, ensure_database  # noqa: E402
from federation.db.embedded import EmbeddedPostgres  # noqa: E402
from federation.edge.checksum import crc32c  # noqa: E402
from federation.edge.devices import DeviceRegistry  # noqa: E402
from federation.edge.jobs import JobQueue  # noqa: E402
from federation.edge.model import Capabilities  # noqa: E402
from federation.pki import CertificateAuthority, CertificateFiles, load_ca  # noqa: E402
from federation.server import server_credentials  # noqa: E402
from federation.v1 import edge_broker_pb2 as pb  # noqa: E402
from federation.v1 import edge_broker_pb2_grpc  # noqa: E402

MIB = 1 << 20
SINK = "/bench.Sink/Write"
ECHO = "/bench.Sink/Echo"
TRUST_DOMAIN = "federation.local"


# -- the child process: broker + raw sink ---------------------------------------------


async def serve(home: Path, dsn: str) -> None:
    from federation.edge.broker import EdgeBroker
    from federation.server import NodeServer
    from nodes.edge_broker import registration

    ca = load_ca(home, TRUST_DOMAIN)
    files = ca.issue("broker", "bench")
    database = Database(dsn, DatabaseConfig(pool_min_size=4, pool_max_size=20), migrate=False)
    await database.start()
    broker = EdgeBroker.create(database.pool, EdgeConfig(), home, ca, None)
    server = NodeServer(
        [registration(broker)], trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(),
        listen="127.0.0.1:0", credentials=files, metrics_port=None,
    )
    await server.start()
    sink = grpc.aio.server()
    sink.add_generic_rpc_handlers([_sink_handler()])
    plain_port = sink.add_insecure_port("127.0.0.1:0")
    tls_port = sink.add_secure_port("127.0.0.1:0", server_credentials(files))
    await sink.start()
    print(json.dumps({"broker": server.port, "plain": plain_port, "tls": tls_port}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    await sink.stop(0)
    await server.stop(0)
    await database.stop()


def _sink_handler() -> grpc.GenericRpcHandler:
    async def write(requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = 0
        async for data in requests:
            total += len(data)
        return str(total).encode()

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Write": grpc.stream_unary_rpc_method_handler(write),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
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


async def bench_uploads(ports: dict[str, int], files: CertificateFiles, mib: int) -> list[str]:
    rows = []
    config = GrpcConfig()
    plain = grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}")
    tls = secure_channel(f"localhost:{ports['tls']}", files, config)
    broker = secure_channel(f"localhost:{ports['broker']}", files, config)
    stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(broker)
    for chunk in (64 * 1024, MIB):
        data = os.urandom(mib * MIB)  # fresh content: every run really stores a new blob
        await raw_upload(plain, data[: 8 * MIB], chunk)  # warm-up (connection, TLS)
        results = {
            "raw gRPC, plaintext": await raw_upload(plain, data, chunk),
            "raw gRPC, mTLS": await raw_upload(tls, data, chunk),
            "broker Upload, mTLS": await broker_upload(stub, data, chunk),
        }
        for name, rate in results.items():
            rows.append(f"| upload {chunk // 1024:>5} KiB chunks | {name:<22} | {rate:8.0f} MB/s |")
    for channel in (plain, tls, broker):
        await channel.close()
    return rows


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


# -- heartbeats ------------------------------------------------------------------------


async def bench_heartbeats(
    ports: dict[str, int], ca: CertificateAuthority, devices: int, seconds: float
) -> list[str]:
    config = GrpcConfig()
    files = [ca.issue("edge", f"hb-{n}") for n in range(devices)]
    raw_rate = await _raw_unary_rate(ports["tls"], files, config, seconds)
    channels = [secure_channel(f"localhost:{ports['broker']}", f, config) for f in files]
    stubs = [edge_broker_pb2_grpc.EdgeBrokerServiceStub(c) for c in channels]
    await asyncio.gather(*(s.RegisterDevice(pb.RegisterDeviceRequest()) for s in stubs))
    count = 0
    stop_at = time.perf_counter() + seconds

    async def device(stub: Any) -> None:
        nonlocal count
        echo = None
        while time.perf_counter() < stop_at:
            request = pb.HeartbeatRequest(battery_percent=80, load=0.2)
            if echo is not None:
                request.echo_time.CopyFrom(echo)
            echo = (await stub.Heartbeat(request)).server_time
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(device(s) for s in stubs))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return [
        f"| unary calls, {devices} mTLS channels | raw gRPC echo | {raw_rate:8.0f} calls/s |",
        f"| heartbeats, {devices} devices in one process | mTLS + PostgreSQL | "
        f"{count / elapsed:8.0f} heartbeats/s |",
    ]


async def _raw_unary_rate(
    port: int, files: list[CertificateFiles], config: GrpcConfig, seconds: float
) -> float:
    """Unary calls/s through as many mTLS channels, to a handler that does nothing."""
    channels = [secure_channel(f"localhost:{port}", f, config) for f in files]
    calls: list[Any] = [c.unary_unary(ECHO) for c in channels]
    await asyncio.gather(*(call(b"warm-up") for call in calls))
    count = 0
    stop_at = time.perf_counter() + seconds

    async def device(call: Any) -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            await call(b"battery=80 load=0.2")
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(device(call) for call in calls))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return count / elapsed


# -- driver ----------------------------------------------------------------------------


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
            child = subprocess.Popen(  # noqa: ASYNC220 - started once, before any timing
                [sys.executable, __file__, "--serve", str(home), dsn],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            try:
                assert child.stdout is not None
                ports = json.loads(await asyncio.to_thread(child.stdout.readline))
                rows = await bench_uploads(ports, client, args.upload_mib)
                rows += await bench_leases(dsn, args.jobs, args.lease_devices)
                rows += await bench_heartbeats(ports, ca, args.devices, args.seconds)
            finally:
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
    cli_args = parser.parse_args()
    if cli_args.serve:
        try:  # as every federation process (federation.cli): uvloop where installed
            import uvloop
        except ImportError:
            asyncio.run(serve(Path(cli_args.serve[0]), cli_args.serve[1]))
        else:
            uvloop.run(serve(Path(cli_args.serve[0]), cli_args.serve[1]))
    else:
        asyncio.run(main(cli_args))
