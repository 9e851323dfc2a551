"""What the gateway path costs: HTTP → gateway → mTLS gRPC → inference node → backend.

Runs, in one go, with the zero-latency test backend so only the path is measured:

* direct: the same backend called in-process (the baseline);
* gateway: the full path, served by a child process (gateway + one inference node in
  one event loop, as a small deployment would), driven over HTTP keep-alive from this
  process;

and prints p50/p99 latency of non-streaming completions, time to first token of
streaming ones, the latency the path adds over direct, and requests/s at concurrency
1, 16 and 64. Keys and audit use in-process stand-ins (cached key verification is the
hot path anyway; the per-request ConsumeQuota round trip to a real key authority and
the background audit write are not included).

Usage: python bench/gateway.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation.inference.test_backend import TestBackend  # noqa: E402
from federation.inference.types import (  # noqa: E402
    ChatMessage,
    GenerationRequest,
    TokenDelta,
)

MODEL = "test-model"
PROMPT = "the quick brown fox jumps over the lazy dog"
KEY = "sk-bench"


# ---- the child process: gateway + inference node ---------------------------------------------

async def serve() -> None:
    from federation.errors import ErrorCode, FederationError
    from gateway_http.app import GatewayServer
    from gateway_http.auth import AuditEntry, KeyPrincipal
    from tests.gateway_support import gateway_settings, start_inference_node
    from tests.support import TestPKI

    class Keys:
        async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
            if key != KEY:
                raise FederationError(ErrorCode.UNAUTHENTICATED, "bad key")
            return KeyPrincipal("key_bench", "bench", frozenset({"chat"}))

        async def consume(self, key_id: str, *, tokens: int, is_request: bool) -> None:
            return None

    class Audit:
        async def record(self, entry: AuditEntry) -> None:
            return None

    home = Path(tempfile.mkdtemp()) / "home"
    pki = TestPKI(home)
    node = await start_inference_node(pki, TestBackend(capacity=10_000), "bench")
    server = GatewayServer(gateway_settings(home, [node.address]), pki.identity("gateway"),
                           keys=Keys(), audit=Audit())
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent exits
    await server.stop()
    await node.kill()


# ---- measurements -------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def direct(n: int) -> tuple[list[float], list[float]]:
    backend = TestBackend(capacity=10_000)
    request = GenerationRequest(MODEL, (ChatMessage("user", PROMPT),))
    full, first = [], []
    for _ in range(n):
        started = time.perf_counter()
        got_first = False
        async for event in backend.generate(request):
            if isinstance(event, TokenDelta) and not got_first:
                first.append(time.perf_counter() - started)
                got_first = True
        full.append(time.perf_counter() - started)
    return full, first


BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
HEADERS = {"Authorization": f"Bearer {KEY}"}


async def one_completion(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with http.post(url, json=BODY, headers=HEADERS) as response:
        await response.read()
        assert response.status == 200, response.status
    return time.perf_counter() - started


async def one_ttft(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    first = 0.0
    async with http.post(url, json={**BODY, "stream": True}, headers=HEADERS) as response:
        assert response.status == 200, response.status
        async for line in response.content:
            if not first and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - started
    return first


async def through_gateway(url: str, n: int) -> tuple[list[float], list[float]]:
    async with aiohttp.ClientSession() as http:
        for _ in range(50):  # warm up connections, caches and code paths
            await one_completion(http, url)
        full = [await one_completion(http, url) for _ in range(n)]
        first = [await one_ttft(http, url) for _ in range(n)]
    return full, first


async def throughput(url: str, concurrency: int, seconds: float) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    done = 0
    async with aiohttp.ClientSession(connector=connector) as http:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await one_completion(http, url)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def ms(value: float) -> str:
    return f"{value * 1000:8.3f}"


async def measure(requests: int) -> None:
    # A separate process serves the gateway so client and server do not share a loop;
    # its start-up is a one-off outside the measured section.
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,  # noqa: ASYNC220
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        port = json.loads(child.stdout.readline())["port"]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        d_full, d_first = await direct(requests)
        g_full, g_first = await through_gateway(url, requests)
        rates = {c: await throughput(url, c, 3.0) for c in (1, 16, 64)}
    finally:
        child.terminate()
        child.wait(10)
    rows: list[tuple[str, Any, Any]] = [
        ("completion (non-streaming)", d_full, g_full),
        ("time to first token (streaming)", d_first, g_first),
    ]
    print(f"{requests} sequential requests each; zero-latency test backend; 9-token echo\n")
    print(f"{'':34}{'direct p50':>11}{'p99':>9}{'gateway p50':>13}{'p99':>9}"
          f"{'added p50':>11}{'p99':>9}  (ms)")
    for name, d, g in rows:
        print(f"{name:34}{ms(pct(d, .5)):>11}{ms(pct(d, .99)):>9}{ms(pct(g, .5)):>13}"
              f"{ms(pct(g, .99)):>9}{ms(pct(g, .5) - pct(d, .5)):>11}"
              f"{ms(pct(g, .99) - pct(d, .99)):>9}")
    print()
    for concurrency, rate in rates.items():
        print(f"throughput at concurrency {concurrency:>2}: {rate:8.0f} requests/s")
    print(f"(mean latency at c=1: {statistics.mean(g_full) * 1000:.3f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(serve() if args.serve else measure(args.requests))


if __name__ == "__main__":
    main()
