"""What the gateway path costs: HTTP → gateway → mTLS gRPC → inference node → backend.

One run measures, with the zero-latency test backend so only the path is measured:

* direct: the same backend called in-process (the baseline; it never suspends, so its
  callers take turns and its latency is the backend's own compute at any concurrency);
* gateway: the full path as ``federation up`` deploys it, in three processes on this
  machine: this one (the HTTP client), a gateway, and an inference node behind mTLS gRPC;

at concurrency 1, 16 and 64 (closed loop: each of the c clients sends its next request as
soon as the previous one is answered), and prints p50/p99 latency of non-streaming
completions, p50/p99 time to first token of streaming ones, the latency the path adds over
direct (gateway percentile − direct percentile), and requests/s of non-streaming
completions.

Keys and audit use in-process stand-ins in the gateway (cached key verification is the
hot path anyway; the per-request ReserveQuota round trip to a real key authority, the
SettleQuota after it and the background audit write to thermal memory are not included,
though the gateway still does all its own work for them).

In a closed loop, latency at concurrency c is at least c / throughput (Little's law): once
the gateway saturates the machine, latency at c=16 and c=64 measures queueing, not the
cost of one request.

``--compare DIR`` also serves the gateway and node from another checkout (e.g. a copy of
the tree before a change), interleaved round by round with this one so both see the same
machine load; the table then has one block per tree.

Usage: python bench/gateway.py [--rounds R] [--seconds S] [--compare DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "test-model"
PROMPT = "the quick brown fox jumps over the lazy dog"
KEY = "sk-bench"
NODE_NAME = "bench"
CONCURRENCY = (1, 16, 64)


# ---- child processes: the inference node and the gateway ---------------------------------------

async def serve_node(home: Path) -> None:
    from federation.config import GrpcConfig
    from federation.inference.backend import BackendSet
    from federation.inference.test_backend import TestBackend
    from federation.pki import certificate_files
    from federation.server import NodeServer
    from nodes.inference import InferenceServicer, registration
    from tests.support import TRUST_DOMAIN

    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend(capacity=10_000)])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0.5),
        listen="127.0.0.1:0",
        credentials=certificate_files(home, TRUST_DOMAIN, "inference", NODE_NAME),
        metrics_port=None,
    )
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent exits
    await server.stop(0)


async def serve_gateway(home: Path, node: str) -> None:
    from federation.errors import ErrorCode, FederationError
    from federation.keys.client import KeyPrincipal, KeyReservation
    from federation.memory.records import AuditEntry
    from federation.pki import certificate_files
    from gateway_http.app import GatewayServer
    from tests.gateway_support import gateway_settings
    from tests.support import TRUST_DOMAIN

    class Keys:
        async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
            if key != KEY:
                raise FederationError(ErrorCode.UNAUTHENTICATED, "bad key")
            return KeyPrincipal("key_bench", "bench", frozenset({"chat"}))

        async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> KeyReservation:
            return KeyReservation(key_id, "rsv_bench", tokens, None)

        async def settle(self, reservation: KeyReservation, used_tokens: int) -> None:
            return None

    class Audit:  # drops the records: the benchmark measures the gateway alone
        async def record(self, entry: AuditEntry) -> None:
            return None

    server = GatewayServer(gateway_settings(home, [node]),
                           certificate_files(home, TRUST_DOMAIN, "gateway", NODE_NAME),
                           keys=Keys(), audit=Audit())
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent exits
    await server.stop()


def child_main(args: argparse.Namespace) -> None:
    root = Path(args.root)
    sys.path.insert(0, str(root))  # ahead of the editable install: serve *that* tree
    if args.serve == "node":
        asyncio.run(serve_node(Path(args.home)))
    else:
        asyncio.run(serve_gateway(Path(args.home), args.node))


# ---- the parent: PKI, child processes, measurements -------------------------------------------

class Deployment:
    """A node process and a gateway process serving from one source tree."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.home = home
        self.children: list[subprocess.Popen[str]] = []
        self.url = ""

    def _spawn(self, *extra: str) -> int:
        child = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "gateway.py"), "--root", str(self.root),
             "--home", str(self.home), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=self.root,
            env={**os.environ, "PYTHONPATH": str(self.root)},
        )
        self.children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"a bench child ({' '.join(extra)}) failed to start")
        return int(json.loads(line)["port"])

    def start(self) -> None:
        node_port = self._spawn("--serve", "node")
        port = self._spawn("--serve", "gateway", "--node", f"127.0.0.1:{node_port}")
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def stop(self) -> None:
        for child in reversed(self.children):
            assert child.stdin is not None
            child.stdin.close()  # the child's stdin.read returns: it shuts down
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


@dataclass
class Samples:
    full: dict[int, list[float]] = field(default_factory=lambda: {c: [] for c in CONCURRENCY})
    first: dict[int, list[float]] = field(default_factory=lambda: {c: [] for c in CONCURRENCY})
    completed: dict[int, int] = field(default_factory=lambda: dict.fromkeys(CONCURRENCY, 0))
    elapsed: dict[int, float] = field(default_factory=lambda: dict.fromkeys(CONCURRENCY, 0.0))

    def rps(self, c: int) -> float:
        return self.completed[c] / self.elapsed[c] if self.elapsed[c] else 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


BODY = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
STREAM_BODY = {**BODY, "stream": True}
HEADERS = {"Authorization": f"Bearer {KEY}"}


async def closed_loop(concurrency: int, seconds: float, one: object) -> tuple[list[float], float]:
    """Run ``one()`` from ``concurrency`` workers for ``seconds``; latencies and elapsed time."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await one())  # type: ignore[operator]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def measure_direct(samples: Samples, seconds: float) -> None:
    from federation.inference.test_backend import TestBackend
    from federation.inference.types import ChatMessage, GenerationRequest, TokenDelta

    backend = TestBackend(capacity=10_000)
    request = GenerationRequest(MODEL, (ChatMessage("user", PROMPT),))

    async def full() -> float:
        started = time.perf_counter()
        async for _ in backend.generate(request):
            pass
        return time.perf_counter() - started

    async def first() -> float:
        started = time.perf_counter()
        got = 0.0
        async for event in backend.generate(request):
            if isinstance(event, TokenDelta) and not got:
                got = time.perf_counter() - started
        return got

    for c in CONCURRENCY:
        samples.full[c] += (await closed_loop(c, seconds / 4, full))[0]
        samples.first[c] += (await closed_loop(c, seconds / 4, first))[0]


async def measure_gateway(http: object, url: str, samples: Samples, seconds: float) -> None:
    import aiohttp

    assert isinstance(http, aiohttp.ClientSession)

    async def full() -> float:
        started = time.perf_counter()
        async with http.post(url, json=BODY, headers=HEADERS) as response:
            await response.read()
            assert response.status == 200, response.status
        return time.perf_counter() - started

    async def first() -> float:
        started = time.perf_counter()
        got = 0.0
        async with http.post(url, json=STREAM_BODY, headers=HEADERS) as response:
            assert response.status == 200, response.status
            async for line in response.content:
                if not got and b'"content":"' in line and b'"content":""' not in line:
                    got = time.perf_counter() - started
        return got

    for c in CONCURRENCY:
        latencies, elapsed = await closed_loop(c, seconds, full)
        samples.full[c] += latencies
        samples.completed[c] += len(latencies)
        samples.elapsed[c] += elapsed
        samples.first[c] += (await closed_loop(c, seconds / 2, first))[0]


def ms(value: float) -> str:
    return f"{value * 1000:.2f}"


def report(name: str, direct: Samples, gateway: Samples) -> None:
    print(f"\n{name}")
    print(f"{'':6}{'':14}{'direct':>16}{'gateway':>18}{'added':>18}{'req/s':>9}")
    print(f"{'conc':6}{'':14}" + f"{'p50':>9}{'p99':>8}" * 3)
    for c in CONCURRENCY:
        for label, d, g in (("completion", direct.full[c], gateway.full[c]),
                            ("first token", direct.first[c], gateway.first[c])):
            cols = [pct(d, .5), pct(d, .99), pct(g, .5), pct(g, .99),
                    pct(g, .5) - pct(d, .5), pct(g, .99) - pct(d, .99)]
            rate = f"{gateway.rps(c):9.0f}" if label == "completion" else ""
            print(f"{c:<6}{label:14}" + "".join(f"{ms(v):>{9 if i % 2 == 0 else 8}}"
                                                 for i, v in enumerate(cols)) + rate)


async def measure(args: argparse.Namespace) -> None:
    import aiohttp

    sys.path.insert(0, str(ROOT))
    from tests.support import TestPKI

    roots = [ROOT, *(Path(r).resolve() for r in args.compare)]
    home = Path(tempfile.mkdtemp(prefix="bench-gateway-")) / "home"
    pki = TestPKI(home)
    pki.identity("inference", NODE_NAME)
    pki.identity("gateway", NODE_NAME)
    deployments = [Deployment(root, home) for root in roots]
    direct = Samples()
    results = {root: Samples() for root in roots}
    try:
        for deployment in deployments:
            deployment.start()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            for deployment in deployments:  # warm up connections, caches and code paths
                await measure_gateway(http, deployment.url, Samples(), 0.5)
            for _ in range(args.rounds):
                await measure_direct(direct, args.seconds)
                for deployment in deployments:
                    await measure_gateway(http, deployment.url, results[deployment.root],
                                          args.seconds)
    finally:
        for deployment in deployments:
            deployment.stop()
    print(f"zero-latency test backend, 9-token echo; {args.rounds} rounds of {args.seconds:g} s "
          "per concurrency (non-streaming), half that streaming; milliseconds")
    for root in roots:
        report(f"gateway from {root}", direct, results[root])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="per round and concurrency, non-streaming (streaming: half)")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR",
                        help="also measure the gateway served from this source tree")
    parser.add_argument("--serve", choices=("node", "gateway"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--node", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        child_main(args)
    else:
        asyncio.run(measure(args))


if __name__ == "__main__":
    main()
