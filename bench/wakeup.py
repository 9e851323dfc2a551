"""What a hop between two processes costs on this machine, busy and after a pause.

At concurrency 1 a request crosses processes about ten times (client, gateway, inference,
upstream, memory, PostgreSQL and back), and between two requests every one of them sleeps.
This prints the round trip of two hops measured back to back and after a few milliseconds
of idleness, so the share of a concurrency-1 latency that is the machine waking sleeping
processes (not our code) can be read off:

* a byte sent over a socket pair to a child process and echoed back;
* 8 KiB written and ``fdatasync``-ed in a temporary file (where a federation's
  PostgreSQL keeps its WAL when it runs from ``/tmp``): a commit's flush. This one
  waits for the disk with nothing else to do, so it also shows what a vCPU that
  halts while the disk works costs when the disk answers;
* ``SELECT 1`` on an embedded PostgreSQL (``--postgres``; takes a few seconds more).

Usage: python bench/wakeup.py [--count 600] [--gap-ms 3] [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from multiprocessing import Process
from pathlib import Path


def echo(sock: socket.socket, parents_end: socket.socket) -> None:
    parents_end.close()  # the fork's copy, or the parent closing its own would not end this
    while data := sock.recv(1):
        sock.sendall(data)


async def timed(call: Callable[[], Awaitable[object]], count: int, gap: float) -> list[float]:
    spent = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        spent.append(time.perf_counter() - started)
        if gap:
            await asyncio.sleep(gap)
    return spent


def report(what: str, busy: list[float], idle: list[float], gap: float) -> None:
    def ms(values: list[float], q: float) -> str:
        return f"{sorted(values)[int(q * (len(values) - 1))] * 1000:.3f}"

    print(f"{what:<28} back to back p50 {ms(busy, 0.5)} ms (p90 {ms(busy, 0.9)}); "
          f"after {gap * 1000:g} ms idle p50 {ms(idle, 0.5)} ms (p90 {ms(idle, 0.9)}); "
          f"×{statistics.median(idle) / statistics.median(busy):.1f}")


async def socket_pair(count: int, gap: float) -> tuple[list[float], list[float]]:
    """Round trips of one byte to an echoing child process: back to back, then each after
    ``gap`` seconds of idleness."""
    ours, theirs = socket.socketpair()
    child = Process(target=echo, args=(theirs, ours), daemon=True)
    child.start()
    theirs.close()
    reader, writer = await asyncio.open_connection(sock=ours)

    async def ping() -> None:
        writer.write(b"x")
        await reader.readexactly(1)

    try:
        busy = await timed(ping, count, 0.0)
        idle = await timed(ping, count, gap)
    finally:
        writer.close()
        await writer.wait_closed()  # the child's EOF: it exits, and joins at once
        child.join(timeout=5)
    return busy, idle


def disk_flush(count: int, gap: float) -> tuple[list[float], list[float]]:
    """``fdatasync`` of 8 KiB just written to a temporary file: back to back, then each
    after ``gap`` seconds of idleness (a blocking sleep: this is a lone process)."""
    block = os.urandom(8192)
    with tempfile.TemporaryDirectory(prefix="bench-wakeup-") as directory:
        fd = os.open(Path(directory) / "flush", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            def flush(index: int) -> float:
                os.pwrite(fd, block, (index % 64) * len(block))
                started = time.perf_counter()
                os.fdatasync(fd)
                return time.perf_counter() - started

            for index in range(64):  # the file's blocks allocated before anything counts
                flush(index)
            busy = [flush(index) for index in range(count)]
            idle = []
            for index in range(count):
                time.sleep(gap)
                idle.append(flush(index))
        finally:
            os.close(fd)
    return busy, idle


async def postgres(count: int, gap: float) -> None:
    import asyncpg

    from federation.db.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bench-wakeup-")) / "pg")
    dsn = server.start()
    try:
        conn = await asyncpg.connect(dsn.url(database="postgres"))
        try:
            busy = await timed(lambda: conn.execute("SELECT 1"), count, 0.0)
            idle = await timed(lambda: conn.execute("SELECT 1"), count, gap)
        finally:
            await conn.close()
    finally:
        server.stop()
        server.delete_cluster()
    report("PostgreSQL SELECT 1", busy, idle, gap)


async def main(args: argparse.Namespace) -> None:
    gap = args.gap_ms / 1000
    report("process echo (socket pair)", *await socket_pair(args.count, gap), gap)
    report("disk flush (fdatasync 8 KiB)", *disk_flush(args.count, gap), gap)
    if args.postgres:
        await postgres(args.count, gap)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--gap-ms", type=float, default=3.0)
    parser.add_argument("--postgres", action="store_true")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(main(parser.parse_args()))
