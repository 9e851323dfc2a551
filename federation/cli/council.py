"""``federation council ask``: put a question to the specialist council from a terminal.

One line per member is printed as its vote arrives (stance, confidence, seconds
since the question was asked), then the synthesis. The operator's admin identity
holds every disclosure scope; ``--level`` defaults to 2 so the live lines can
show each member's stance (level 1 discloses the answer only).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from google.protobuf.json_format import MessageToDict

from federation.cli.support import print_json
from federation.config import Settings
from federation.errors import CommandError
from federation.launch.endpoints import admin_channel
from federation.v1 import council_pb2, council_pb2_grpc

_STANCES = {council_pb2.STANCE_APPROVE: "approve", council_pb2.STANCE_REJECT: "reject",
            council_pb2.STANCE_ABSTAIN: "abstain"}
_DECISIONS = {council_pb2.DECISION_AUTHORIZED: "authorized",
              council_pb2.DECISION_BLOCKED: "blocked",
              council_pb2.DECISION_NEEDS_REVIEW: "needs review"}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    council = subparsers.add_parser("council", help="the specialist council")
    sub = council.add_subparsers(dest="council_command", required=True, metavar="ACTION")
    ask = sub.add_parser("ask", help="ask the council a question and show its votes live")
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument("--council", default="",
                     help="sub-council: technical, security, ethics or strategic "
                          "(default: the full council)")
    ask.add_argument("--rounds", type=int, choices=(1, 2), default=0,
                     help="2: members revise after seeing the anonymised round-1 votes")
    ask.add_argument("--level", type=int, choices=(1, 2, 3, 4), default=2,
                     help="disclosure level (default 2: members' stances)")
    ask.add_argument("--specialty", default="", help="whose full record level 3 shows")
    ask.add_argument("--tenant", default="", help="tenant to run and audit the vote for")
    ask.add_argument("--json", action="store_true", help="print only the result, as JSON")
    ask.set_defaults(handler=ask_council)


async def ask_council(settings: Settings, args: argparse.Namespace) -> int:
    request = council_pb2.VoteRequest(
        question=args.question, council=args.council, rounds=args.rounds,
        level=args.level, specialty=args.specialty, tenant_id=args.tenant,
    )
    timeout = settings.council.overall_deadline_seconds + settings.grpc.call_timeout_seconds
    out = sys.stdout
    started = time.monotonic()
    result: council_pb2.CouncilResult | None = None
    async with admin_channel(settings, "council") as channel:
        call = council_pb2_grpc.CouncilServiceStub(channel).Vote(request, timeout=timeout)
        view = LiveView(out)
        async for event in call:  # a failed call raises grpc.RpcError: main() reports it
            if event.HasField("result"):
                result = event.result
            elif not args.json:
                view.show(event, time.monotonic() - started)
    if result is None:
        raise CommandError("the council ended without a result")
    if args.json:
        print_json(MessageToDict(result, preserving_proto_field_name=True))
    else:
        show_result(result, out)
    return 0


class LiveView:
    """Prints progress events as they arrive: a header per round, a line per member."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._started: dict[int, int] = {}

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def show(self, event: council_pb2.VoteResponse, elapsed: float) -> None:
        kind = event.WhichOneof("event")
        if kind == "member_started":
            round_no = event.member_started.round
            if round_no not in self._started:
                self._print(f"round {round_no}:")
            self._started[round_no] = self._started.get(round_no, 0) + 1
        elif kind == "member_voted":
            voted = event.member_voted
            if voted.HasField("vote"):
                vote = voted.vote
                line = (f"  {vote.display_name or voted.member:<12} "
                        f"{_STANCES.get(vote.stance, '?'):<8} {vote.confidence:4.2f}  "
                        f"{elapsed:5.1f} s")
                if vote.concerns:
                    line += "  concerns: " + "; ".join(vote.concerns)
            else:
                line = f"  {voted.member:<12} voted    {elapsed:10.1f} s"
            self._print(line)
        elif kind == "member_failed":
            failed = event.member_failed
            self._print(f"  {failed.member:<12} failed: {failed.reason}  {elapsed:5.1f} s")
        elif kind == "synthesis_started":
            self._print(f"synthesising {event.synthesis_started.vote_count} votes…")


def show_result(result: council_pb2.CouncilResult, out: TextIO) -> None:
    quorum = result.quorum
    missing = ", ".join(f"{m.member} ({m.reason})" for m in quorum.missing)
    print(file=out)
    print(result.answer, file=out)
    print(file=out)
    fallback = "  [fallback synthesis: the tally, without the chair]" \
        if result.fallback_synthesis else ""
    print(f"decision: {_DECISIONS.get(result.decision, '?')}   confidence "
          f"{result.confidence:.2f}   votes {quorum.voted}/{quorum.asked} "
          f"(quorum {quorum.required}){fallback}", file=out)
    if missing:
        print(f"missing: {missing}", file=out)
    for concern in result.concerns:
        print(f"  - {concern}", file=out)
    print(f"request id: {result.request_id}   (federation audit trail {result.request_id})",
          file=out)
