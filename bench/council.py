"""What the council costs on top of its members, and how reliably real votes parse.

Part 1 — orchestration, with the scripted backend (deterministic): the seven members
answer after fixed latencies of 100, 200, … 700 ms and the chair after 200 ms. Each run
is one ``CouncilService.Vote`` through the whole stack — mTLS gRPC client → council
node → InferenceRouter → inference node → scripted backend, and every audit record
committed to thermal memory (a ThermalMemoryService node on PostgreSQL) before the
result. Reported over ``--runs`` runs (default 50):

* parallel wall time (p50/p95) of the council;
* sequential wall time: the same eight calls (same prompts, same router) made one after
  the other, as a council without fan-out would;
* ideal: slowest member + chair (0.9 s) — what perfect orchestration would take;
* orchestration overhead = wall − ideal (p50/p95): fan-out, parsing, audit writes,
  synthesis prompt, gRPC streaming of progress events;
* time to the first progress event (p50/p95), seen by the client.

Part 2 — the embedded SmolLM2-135M (llama.cpp, JSON-schema grammar) on ``--questions``
varied questions (default 50; ``--quick``: 5): the vote parse rate (first try, after the
one repair attempt, failed) and the wall time per council. Minutes on 2 cores.

All nodes run in this one process and event loop (as in the tests), so the overhead
includes the client's own work. PostgreSQL is the embedded server, in a temp dir.

Usage: python bench/council.py [--runs N] [--questions N] [--quick] [--skip-model] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation.config import CouncilConfig, DatabaseConfig, ModelConfig  # noqa: E402
from federation.council.members import load_roster  # noqa: E402
from federation.council.scripted_backend import (  # noqa: E402
    CHAIR,
    Script,
    ScriptedCouncilBackend,
    synthesis_json,
    vote_json,
)
from federation.db import Database  # noqa: E402
from federation.db.embedded import EmbeddedPostgres  # noqa: E402
from federation.inference.types import GenerationRequest  # noqa: E402
from federation.v1 import council_pb2  # noqa: E402
from tests.council_support import CouncilStack, council_stack  # noqa: E402
from tests.support import TestPKI  # noqa: E402

MEMBER_LATENCY = {"crawdad": 0.1, "gecko": 0.2, "turtle": 0.3, "eagle_eye": 0.4,
                  "spider": 0.5, "raven": 0.6, "peace_chief": 0.7}
CHAIR_LATENCY = 0.2
IDEAL = max(MEMBER_LATENCY.values()) + CHAIR_LATENCY

SUBJECTS = [
    "enable nightly database backups to an off-site store",
    "move the gateway to a new data centre",
    "let phones run small inference jobs",
    "rotate every API key this week",
    "raise the request size limit to 8 MiB",
    "drop support for the old v0 API",
    "log full request bodies for debugging",
    "add a second inference node with a larger model",
    "open the gateway to a partner organisation",
    "compress thermal memory records older than a month",
]
FORMS = [
    "Should we {}?",
    "Is it safe to {} now?",
    "What are the risks if we {}?",
    "Do you approve the proposal to {} before the next release?",
    "Our team wants to {}. Should the council authorize it?",
]


def questions(n: int) -> list[str]:
    out = [form.format(subject) for form in FORMS for subject in SUBJECTS]
    return (out * (n // len(out) + 1))[:n]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@contextlib.asynccontextmanager
async def database() -> AsyncIterator[tuple[Database, Path]]:
    with tempfile.TemporaryDirectory(prefix="council-bench-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg")
        dsn = await asyncio.to_thread(server.start)
        db = Database(dsn.url("postgres"), DatabaseConfig(pool_min_size=1, pool_max_size=10))
        try:
            await db.start()
            try:
                yield db, Path(tmp)
            finally:
                await db.stop()
        finally:
            await asyncio.to_thread(server.stop)


# ---- part 1: orchestration -----------------------------------------------------------------

async def one_vote(stub: Any, question: str) -> tuple[float, float]:
    started = time.perf_counter()
    first: float | None = None
    async for event in stub.Vote(council_pb2.VoteRequest(question=question)):
        if first is None:
            first = time.perf_counter() - started
        if event.HasField("result"):
            assert event.result.quorum.voted == 7, event.result
    return time.perf_counter() - started, first or 0.0


async def sequential(stack: CouncilStack, backend: ScriptedCouncilBackend) -> float:
    """The eight calls of the last council, replayed one after the other."""
    last = [r for _, r in backend.requests[-8:]]
    started = time.perf_counter()
    for request in last:
        await drain(stack, request)
    return time.perf_counter() - started


async def drain(stack: CouncilStack, request: GenerationRequest) -> None:
    events = stack.router.generate(request, deadline_seconds=10)
    async with contextlib.aclosing(events):
        async for _ in events:
            pass


async def orchestration(db: Database, home: Path, runs: int) -> dict[str, Any]:
    scripts = {k: Script([vote_json("approve", 0.8, "Fine.", ["watch latency"])], latency)
               for k, latency in MEMBER_LATENCY.items()}
    scripts[CHAIR] = Script([synthesis_json("Proceed.")], CHAIR_LATENCY)
    backend = ScriptedCouncilBackend(scripts=scripts)
    config = CouncilConfig(member_deadline_seconds=10, overall_deadline_seconds=30,
                           synthesis_deadline_seconds=10)
    walls: list[float] = []
    firsts: list[float] = []
    seqs: list[float] = []
    async with council_stack(TestPKI(home / "pki-orch"), db, backend, config=config) as stack:
        stub = stack.stub()  # one client channel, as a gateway keeps
        await one_vote(stub, "warm-up?")  # TLS handshakes, router and memory channels
        for i in range(runs):
            wall, first = await one_vote(stub, f"Question {i}: should we proceed?")
            walls.append(wall)
            firsts.append(first)
            if i < 5:
                seqs.append(await sequential(stack, backend))
    overhead = [w - IDEAL for w in walls]
    return {
        "runs": runs,
        "parallel_wall_p50_s": pct(walls, 50), "parallel_wall_p95_s": pct(walls, 95),
        "sequential_wall_mean_s": statistics.fmean(seqs),
        "ideal_s": IDEAL,
        "speedup_vs_sequential": statistics.fmean(seqs) / pct(walls, 50),
        "overhead_p50_ms": pct(overhead, 50) * 1000, "overhead_p95_ms": pct(overhead, 95) * 1000,
        "first_event_p50_ms": pct(firsts, 50) * 1000, "first_event_p95_ms": pct(firsts, 95) * 1000,
    }


# ---- part 2: the embedded model ---------------------------------------------------------------

async def real_model(db: Database, home: Path, n: int) -> dict[str, Any]:
    from federation.inference.llamacpp import LlamaCppBackend

    model = ModelConfig(id="smollm2-135m-instruct", backend="llamacpp", context_length=2048,
                        n_threads=2)
    config = CouncilConfig(member_deadline_seconds=600, overall_deadline_seconds=1200,
                           synthesis_deadline_seconds=300)
    first_try = repaired = failed = 0
    fallbacks = 0
    walls: list[float] = []
    async with council_stack(TestPKI(home / "pki-model"), db, [LlamaCppBackend(model)],
                             roster=load_roster(), config=config) as stack:
        for i, question in enumerate(questions(n)):
            request_id = f"bench-{i}"
            started = time.perf_counter()
            try:
                response = await stack.stub().VoteUnary(
                    council_pb2.VoteUnaryRequest(question=question),
                    metadata=(("x-request-id", request_id),), timeout=1200)
                fallbacks += response.result.fallback_synthesis
            except Exception as exc:  # quorum missed: counted through the trail below
                print(f"  question {i}: {str(exc)[:120]}", file=sys.stderr)
            walls.append(time.perf_counter() - started)
            for record in await stack.store.trail(request_id):
                if record.action != "council.vote":
                    continue
                body = json.loads(record.body)
                if body["vote"] is None:
                    failed += 1
                    outputs = [a["output"][:160] for a in body["attempts"]]
                    print(f"  vote failed: {body['failure']}: {body['detail'][:160]} "
                          f"outputs {outputs}", file=sys.stderr)
                elif len(body["attempts"]) == 1:
                    first_try += 1
                else:
                    repaired += 1
            print(f"  {i + 1}/{n}: {walls[-1]:.1f} s", file=sys.stderr, flush=True)
    votes = first_try + repaired + failed
    return {
        "questions": n, "votes": votes,
        "parse_rate": (first_try + repaired) / votes if votes else 0.0,
        "parsed_first_try": first_try, "parsed_after_repair": repaired, "failed": failed,
        "chair_fallbacks": fallbacks,
        "wall_p50_s": pct(walls, 50), "wall_p95_s": pct(walls, 95),
        "wall_total_s": sum(walls),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="5 questions on the real model")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    async with database() as (db, home):
        report["scripted"] = await orchestration(db, home, args.runs)
        if not args.skip_model:
            report["smollm2"] = await real_model(db, home, 5 if args.quick else args.questions)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s = report["scripted"]
    print(f"scripted members 100-700 ms, chair 200 ms, {s['runs']} runs")
    print(f"  parallel wall     p50 {s['parallel_wall_p50_s'] * 1000:7.1f} ms   "
          f"p95 {s['parallel_wall_p95_s'] * 1000:7.1f} ms")
    print(f"  sequential wall   mean {s['sequential_wall_mean_s'] * 1000:6.1f} ms   "
          f"(speed-up x{s['speedup_vs_sequential']:.2f})")
    print(f"  ideal             {s['ideal_s'] * 1000:7.1f} ms")
    print(f"  overhead          p50 {s['overhead_p50_ms']:7.1f} ms   "
          f"p95 {s['overhead_p95_ms']:7.1f} ms   (aim p95 <= 30 ms)")
    print(f"  first event       p50 {s['first_event_p50_ms']:7.1f} ms   "
          f"p95 {s['first_event_p95_ms']:7.1f} ms   (aim <= 50 ms)")
    if "smollm2" in report:
        m = report["smollm2"]
        print(f"SmolLM2-135M, {m['questions']} questions, {m['votes']} votes")
        print(f"  parse rate        {m['parse_rate'] * 100:6.1f} %  (first try "
              f"{m['parsed_first_try']}, after repair {m['parsed_after_repair']}, failed "
              f"{m['failed']}; aim >= 99.5 %)   chair fallbacks {m['chair_fallbacks']}")
        print(f"  wall per council  p50 {m['wall_p50_s']:.1f} s   p95 {m['wall_p95_s']:.1f} s   "
              f"total {m['wall_total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
