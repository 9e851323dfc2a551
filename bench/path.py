"""The whole request path as users take it, measured against the upstream alone.

One run starts, in processes of their own:

* an OpenAI-compatible upstream that answers at once (a stand-in for vLLM: it is
  outside the federation), non-streaming or with ``--chunks`` SSE chunks;
* ``federation up`` in a scratch home, serving one model whose backend is ``openai``
  pointed at that upstream, with everything real: the gateway, the key authority, the
  memory node, inference, PostgreSQL;

then, for each concurrency (closed loop: each of c clients sends its next request when
the last is answered) and mode, alternates rounds of "direct" (the upstream called by this
client) and "federation" (the same request through the gateway with a real key), so both
see the same machine load. It prints requests/s, p50/p99 latency of each, the latency the
federation adds (federation percentile − direct percentile), and the CPU milliseconds per
request each federation process spent during the federation rounds (from /proc, through
psutil; PostgreSQL is the postmaster and all its backends).

Before the first row and after the last, it prints what a round trip to another process
costs on this machine right now, back to back and after 3 ms idle (``bench/wakeup.py``'s
probe): at concurrency 1 every hop of the path wakes a sleeping process, so this is the
figure to read next to a concurrency-1 latency when runs on different days disagree.

The client is this Python process (aiohttp on uvloop): its own CPU is not counted, and on
2 cores it competes with what it measures, as a real co-located client would.

Usage: python bench/path.py [--seconds S] [--rounds R] [--concurrency 1,16,64]
                            [--modes nonstream,stream] [--chunks 32] [--tracing]
                            [--compare DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from wakeup import disk_flush, socket_pair

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
MESSAGES = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
ANSWER = "ok"


# ---- the upstream: an OpenAI-compatible server that answers at once --------------------------

def upstream_app(chunks: int) -> web.Application:
    completion = {
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": ANSWER}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
    body = json.dumps(completion).encode()

    def chunk(delta: dict[str, Any], finish: str | None = None,
              usage: dict[str, int] | None = None) -> bytes:
        event: dict[str, Any] = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": MODEL,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            event["usage"] = usage
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    stream = b"".join([
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": "x"}) for _ in range(chunks)),
        chunk({}, "stop"),
        chunk({}, usage={"prompt_tokens": 9, "completion_tokens": chunks,
                         "total_tokens": 9 + chunks}),
        b"data: [DONE]\n\n",
    ])

    async def completions(request: web.Request) -> web.StreamResponse:
        data = await request.json()
        if not data.get("stream"):
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(stream)
        await response.write_eof()
        return response

    async def traces(request: web.Request) -> web.Response:
        await request.read()  # an OTLP/HTTP collector that keeps nothing (--tracing)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/traces", traces)
    return app


def run_upstream(port: int, chunks: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(upstream_app(chunks), host="127.0.0.1", port=port, print=None,
                access_log=None)


# ---- the federation -----------------------------------------------------------------------------

@dataclass
class Federation:
    home: Path
    process: subprocess.Popen[bytes]
    tree: Path = ROOT
    """The checkout whose code it runs (``--compare`` runs a second one)."""
    endpoints: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def pids(self) -> dict[str, int]:
        state = json.loads((self.home / "run" / "supervisor.json").read_text())
        return {name: child["pid"] for name, child in state["children"].items()
                if child.get("pid")}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds spent so far by each process (PostgreSQL: postmaster + backends)."""
        spent: dict[str, float] = {}
        for name, pid in self.pids().items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                family = [process]
                if name == "postgres":
                    family += process.children(recursive=True)
                total = 0.0
                for member in family:
                    with contextlib.suppress(psutil.Error):
                        times = member.cpu_times()
                        total += times.user + times.system
                spent[name] = total
        return spent


def federation_cli(home: Path, *args: str, tree: Path = ROOT) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env["FEDERATION_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "federation.cli", *args], env=env,
                          check=True, capture_output=True, text=True, cwd=tree).stdout


@contextlib.contextmanager
def federation(upstream_port: int, tracing: bool = False, tree: Path = ROOT) -> Any:
    """``federation up`` running ``tree``'s code: ``python -m`` puts the working
    directory first on the path, ahead of this venv's editable install."""
    home = Path(tempfile.mkdtemp(prefix="bench-path-"))
    traced = (f'[tracing]\notlp_endpoint = "http://127.0.0.1:{upstream_port}/v1/traces"\n\n'
              if tracing else "")
    (home / "federation.toml").write_text(
        traced +
        f'[[inference.models]]\nid = "{MODEL}"\nbackend = "openai"\n'
        f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
        f'context_length = 4096\n'
        # Room for every client: the default (16 waiting) answers 429 at concurrency 64,
        # which is backpressure working, not the path's cost.
        f'queue_capacity = 256\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env["FEDERATION_HOME"] = str(home)
    log = (home / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "federation.cli", "up", "--http-port", "0"],
        env=env, stdout=log, stderr=log, cwd=tree, start_new_session=True)
    running = Federation(home, process, tree)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                running.endpoints = json.loads((home / "endpoints.json").read_text())
                if running.endpoints.get("supervisor_pid") == process.pid:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("federation up did not start:\n"
                                 + (home / "up.log").read_text()[-3000:])
            time.sleep(0.2)
        running.key = federation_cli(home, "keys", "issue", "--tenant", "bench",
                                     "--scope", "chat", tree=tree).strip()
        yield running
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        with contextlib.suppress(Exception):
            from federation.db import embedded_data_dir
            from federation.db.embedded import EmbeddedPostgres

            EmbeddedPostgres(embedded_data_dir(home)).delete_cluster()
        subprocess.run(["rm", "-rf", str(home)], check=False)


# ---- the load -----------------------------------------------------------------------------------

@dataclass
class Round:
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    """Streams only: from sending the request to the first chunk with content."""
    errors: dict[int, int] = field(default_factory=dict)
    """Answers other than 200, by status."""
    seconds: float = 0.0


async def closed_loop(url: str, headers: dict[str, str], body: dict[str, Any],
                      concurrency: int, seconds: float) -> Round:
    result = Round()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with session.post(url, json=body, headers=headers) as response:
                    if body.get("stream"):
                        first = await first_token(response)
                        if first is not None:
                            result.first_tokens.append(first - started)
                    await response.read()
                    status = response.status
                if status == 200:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.errors[status] = result.errors.get(status, 0) + 1

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - began
    return result


async def first_token(response: aiohttp.ClientResponse) -> float | None:
    """When the first SSE chunk carrying content arrived (None if none did); the rest of
    the stream is left to read."""
    async for line in response.content:
        if line.startswith(b"data: {") and b'"content"' in line:
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return time.perf_counter()
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Totals:
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    requests: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, result: Round) -> None:
        self.latencies += result.latencies
        self.first_tokens += result.first_tokens
        self.requests += len(result.latencies)
        for status, count in result.errors.items():
            self.errors[status] = self.errors.get(status, 0) + count
        self.seconds += result.seconds

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def measure(feds: list[Federation], upstream: str, mode: str, concurrency: int,
                  rounds: int, seconds: float) -> tuple[Totals, list[Totals]]:
    """Rounds of the upstream alone, then each federation in turn (``--compare``: the
    trees alternate within every round, so they see the same machine load)."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64}
    if mode == "stream":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    direct, throughs = Totals(), [Totals() for _ in feds]
    for fed in feds:  # warm-up
        await closed_loop(gateway_url(fed), auth(fed), body, concurrency, 1.0)
    for _ in range(rounds):
        direct.add(await closed_loop(upstream, {}, body, concurrency, seconds))
        for fed, through in zip(feds, throughs, strict=True):
            before = fed.cpu_seconds()
            through.add(await closed_loop(gateway_url(fed), auth(fed), body, concurrency,
                                          seconds))
            after = fed.cpu_seconds()
            for name, spent in after.items():
                through.cpu[name] = through.cpu.get(name, 0.0) + spent - before.get(name, spent)
    return direct, throughs


def gateway_url(fed: Federation) -> str:
    return str(fed.endpoints["gateway"]["url"]) + "/v1/chat/completions"


def auth(fed: Federation) -> dict[str, str]:
    return {"Authorization": f"Bearer {fed.key}"}


def report(mode: str, concurrency: int, direct: Totals, through: Totals,
           tree: str | None = None) -> dict[str, Any]:
    ms = 1000.0
    row = {
        **({"tree": tree} if tree else {}),
        "mode": mode, "concurrency": concurrency,
        "direct_rps": round(direct.rate), "federation_rps": round(through.rate),
        "direct_p50_ms": round(percentile(direct.latencies, 0.5) * ms, 2),
        "direct_p99_ms": round(percentile(direct.latencies, 0.99) * ms, 2),
        "federation_p50_ms": round(percentile(through.latencies, 0.5) * ms, 2),
        "federation_p99_ms": round(percentile(through.latencies, 0.99) * ms, 2),
        "errors": through.errors,
        "cpu_ms_per_request": {
            name: round(spent * ms / max(through.requests, 1), 2)
            for name, spent in sorted(through.cpu.items())
        },
    }
    row["added_p50_ms"] = round(row["federation_p50_ms"] - row["direct_p50_ms"], 2)
    row["added_p99_ms"] = round(row["federation_p99_ms"] - row["direct_p99_ms"], 2)
    if through.first_tokens:
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            row[f"added_ttft_{name}_ms"] = round(
                (percentile(through.first_tokens, q) - percentile(direct.first_tokens, q)) * ms, 2)
    row["cpu_ms_per_request_total"] = round(sum(row["cpu_ms_per_request"].values()), 2)
    return row


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def upstream_process(chunks: int) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(port),
                                "--chunks", str(chunks)], cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait()


async def machine_probe(when: str) -> None:
    """This machine's cost of waking another process, printed as one JSON row."""
    busy, idle = await socket_pair(count=300, gap=0.003)
    flushed_busy, flushed_idle = disk_flush(count=300, gap=0.003)
    print(json.dumps({"machine": when, "process_round_trip_p50_ms": {
        "back_to_back": round(statistics.median(busy) * 1000, 3),
        "after_3ms_idle": round(statistics.median(idle) * 1000, 3)},
        "disk_flush_p50_ms": {
        "back_to_back": round(statistics.median(flushed_busy) * 1000, 3),
        "after_3ms_idle": round(statistics.median(flushed_idle) * 1000, 3)}}), flush=True)


async def main(args: argparse.Namespace) -> None:
    rows = []
    await machine_probe("before")
    trees = [ROOT, *([Path(args.compare).resolve()] if args.compare else [])]
    with upstream_process(args.chunks) as upstream, contextlib.ExitStack() as stack:
        port = int(upstream.split(":")[2].split("/")[0])
        feds = [stack.enter_context(federation(port, args.tracing, tree)) for tree in trees]
        for mode in args.modes.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                direct, throughs = await measure(feds, upstream, mode, concurrency,
                                                 args.rounds, args.seconds)
                for fed, through in zip(feds, throughs, strict=True):
                    row = report(mode, concurrency, direct, through,
                                 str(fed.tree) if args.compare else None)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    await machine_probe("after")
    print(f"\nload average {os.getloadavg()[0]:.2f}; "
          f"{statistics.fmean(r['cpu_ms_per_request_total'] for r in rows):.1f} ms CPU per "
          "request on average over the rows", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--modes", default="nonstream,stream")
    parser.add_argument("--chunks", type=int, default=32, help="SSE chunks per streamed answer")
    parser.add_argument("--tracing", action="store_true",
                        help="trace every request, exported over OTLP to a collector that "
                             "keeps nothing (the upstream process)")
    parser.add_argument("--compare", metavar="DIR",
                        help="also run a federation from another checkout (e.g. an export of "
                             "main), its rounds interleaved with this tree's")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_upstream:
        run_upstream(arguments.serve_upstream, arguments.chunks)
    else:
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        # A SIGTERM unwinds like Ctrl-C, so the federations and the upstream are stopped
        # and their scratch homes deleted (they run in sessions of their own).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        asyncio.run(main(arguments))
