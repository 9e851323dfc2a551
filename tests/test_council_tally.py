"""The council confidence formula, the tally's decision and the vote parser."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.council.members import load_roster, parse_roster
from federation.council.tally import (
    WeightedVote,
    concerns_union,
    council_confidence,
    fallback_synthesis,
    reconcile,
    support,
    tally_decision,
)
from federation.council.votes import (
    Decision,
    ParseError,
    Stance,
    Vote,
    parse_synthesis,
    parse_vote,
)

stances = st.sampled_from(list(Stance))
confidences = st.floats(min_value=0, max_value=1, allow_nan=False)
weights = st.floats(min_value=0.1, max_value=5, allow_nan=False)


@st.composite
def weighted_votes(draw: st.DrawFn, min_size: int = 1) -> list[WeightedVote]:
    n = draw(st.integers(min_value=min_size, max_value=9))
    return [
        WeightedVote(f"m{i}", draw(weights), Vote(draw(stances), draw(confidences), "", ()))
        for i in range(n)
    ]


def wv(stance: Stance, confidence: float, weight: float = 1.0, name: str = "m") -> WeightedVote:
    return WeightedVote(name, weight, Vote(stance, confidence, "", ()))


@given(weighted_votes())
def test_confidence_is_a_probability_and_support_is_bounded(votes: list[WeightedVote]) -> None:
    assert -1 <= support(votes) <= 1
    assert 0 <= council_confidence(votes) <= 1


@given(st.lists(confidences.filter(lambda c: c >= 0.9), min_size=1, max_size=9),
       st.lists(weights, min_size=9, max_size=9))
def test_unanimous_confident_approval_is_authorized_with_high_confidence(
    cs: list[float], ws: list[float]
) -> None:
    votes = [wv(Stance.APPROVE, c, w) for c, w in zip(cs, ws, strict=False)]
    assert tally_decision(support(votes)) is Decision.AUTHORIZED
    assert council_confidence(votes) >= 0.9 - 1e-9


@given(weighted_votes(), st.data())
def test_a_rejection_never_raises_support_and_confidence_in_it_lowers_it_more(
    votes: list[WeightedVote], data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, len(votes) - 1))
    before = support(votes)
    rejected = [*votes]
    rejected[i] = wv(Stance.REJECT, votes[i].vote.confidence, votes[i].weight)
    assert support(rejected) <= before + 1e-12
    low = data.draw(confidences)
    high = data.draw(confidences.filter(lambda c: c >= low))
    hesitant = [*votes]
    hesitant[i] = wv(Stance.REJECT, low, votes[i].weight)
    confident = [*votes]
    confident[i] = wv(Stance.REJECT, high, votes[i].weight)
    assert support(confident) <= support(hesitant) + 1e-12


@given(weighted_votes(), st.data())
def test_when_authorized_a_more_confident_rejection_lowers_council_confidence(
    votes: list[WeightedVote], data: st.DataObject
) -> None:
    dissent = wv(Stance.REJECT, data.draw(confidences), data.draw(weights))
    stronger = wv(Stance.REJECT, min(1.0, dissent.vote.confidence + 0.1), dissent.weight)
    with_dissent = [*votes, dissent]
    if tally_decision(support(with_dissent)) is Decision.AUTHORIZED:
        assert council_confidence([*votes, stronger]) <= council_confidence(with_dissent)
        assert council_confidence(with_dissent) <= council_confidence(votes) + 1e-12


@given(weighted_votes())
def test_a_mirrored_split_has_no_confidence_and_needs_review(votes: list[WeightedVote]) -> None:
    flip = {Stance.APPROVE: Stance.REJECT, Stance.REJECT: Stance.APPROVE,
            Stance.ABSTAIN: Stance.ABSTAIN}
    mirrored = [WeightedVote(v.member + "'", v.weight,
                             Vote(flip[v.vote.stance], v.vote.confidence, "", ()))
                for v in votes]
    both = votes + mirrored
    assert abs(support(both)) < 1e-9
    assert council_confidence(both) < 1e-9
    assert tally_decision(support(both)) is Decision.NEEDS_REVIEW


@given(weighted_votes(), st.randoms(), st.floats(min_value=0.1, max_value=10))
def test_order_and_weight_scale_do_not_matter(
    votes: list[WeightedVote], rnd: object, scale: float
) -> None:
    shuffled = list(votes)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    scaled = [WeightedVote(v.member, v.weight * scale, v.vote) for v in votes]
    assert support(shuffled) == pytest.approx(support(votes), abs=1e-9)
    assert support(scaled) == pytest.approx(support(votes), abs=1e-9)


@given(weighted_votes())
def test_fallback_synthesis_follows_the_weighted_majority(votes: list[WeightedVote]) -> None:
    synthesis = fallback_synthesis(votes)
    assert synthesis.decision is tally_decision(support(votes))
    assert synthesis.answer.startswith("Fallback synthesis")


def test_examples_of_the_formula() -> None:
    unanimous = [wv(Stance.APPROVE, 0.9) for _ in range(7)]
    assert council_confidence(unanimous) == pytest.approx(0.9)
    five_two = [wv(Stance.APPROVE, 0.9)] * 5 + [wv(Stance.REJECT, 0.9)] * 2
    assert support(five_two) == pytest.approx((4.5 - 1.8) / 7)
    assert tally_decision(support(five_two)) is Decision.AUTHORIZED
    four_three = [wv(Stance.APPROVE, 0.9)] * 4 + [wv(Stance.REJECT, 0.9)] * 3
    assert tally_decision(support(four_three)) is Decision.NEEDS_REVIEW
    security_veto = [wv(Stance.APPROVE, 0.9)] * 6 + [wv(Stance.REJECT, 0.95, 1.25)]
    assert council_confidence(security_veto) < council_confidence(unanimous)
    all_reject = [wv(Stance.REJECT, 0.9)] * 7
    assert tally_decision(support(all_reject)) is Decision.BLOCKED
    assert support([]) == 0


def test_the_chair_may_escalate_but_not_overrule() -> None:
    assert reconcile(Decision.AUTHORIZED, Decision.AUTHORIZED) == (Decision.AUTHORIZED, "")
    assert reconcile(Decision.NEEDS_REVIEW, Decision.AUTHORIZED)[0] is Decision.NEEDS_REVIEW
    decision, note = reconcile(Decision.AUTHORIZED, Decision.BLOCKED)
    assert decision is Decision.NEEDS_REVIEW and "votes support blocked" in note


def test_concerns_union_deduplicates_most_frequent_first() -> None:
    votes = [
        WeightedVote("a", 1, Vote(Stance.APPROVE, 1, "", ("Backups untested", "cost"))),
        WeightedVote("b", 1, Vote(Stance.REJECT, 1, "", ("backups  untested.",))),
    ]
    assert concerns_union(votes) == ("Backups untested", "cost")


# ---- parsing ---------------------------------------------------------------------------------

def test_a_clean_vote_parses() -> None:
    vote = parse_vote(json.dumps({"stance": "reject", "confidence": 0.7,
                                  "rationale": "keys leak", "concerns": ["a", "a", "b"]}))
    assert vote == Vote(Stance.REJECT, 0.7, "keys leak", ("a", "b"))


@pytest.mark.parametrize("text, expected", [
    ('```json\n{"stance": "Approve", "confidence": 80, "rationale": "ok", "concerns": []}\n```',
     Vote(Stance.APPROVE, 0.8, "ok", ())),
    ('Here is my vote: {"stance": "abstain", "confidence": "40%", "concerns": "cost"} thanks',
     Vote(Stance.ABSTAIN, 0.4, "", ("cost",))),
])
def test_common_deviations_are_tolerated(text: str, expected: Vote) -> None:
    assert parse_vote(text) == expected


def test_concerns_without_a_letter_are_dropped() -> None:
    # SmolLM2-135M in `make run` numbered its concerns: "1", "2", shown to the user as such.
    vote = parse_vote(json.dumps({"stance": "approve", "confidence": 0.5, "rationale": "1",
                                  "concerns": ["2", " - ", "cost of the cache", "3."]}))
    assert vote.concerns == ("cost of the cache",)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("I approve.", "no JSON object"),
    ('{"stance": "approve", "confidence": 0.5', "malformed"),
    ('{"confidence": 0.5}', '"stance" is missing'),
    ('{"stance": "maybe", "confidence": 0.5}', "must be one of approve, reject, abstain"),
    ('{"stance": "approve", "confidence": 150}', "between 0 and 1"),
    ('{"stance": "approve", "confidence": true}', "number between 0 and 1"),
    ('[1, 2]', "no JSON object"),
])
def test_unusable_votes_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse_vote(text)


def test_synthesis_parses_and_needs_an_answer() -> None:
    s = parse_synthesis('{"answer": "Go.", "decision": "needs review", "remaining_concerns": []}')
    assert s.decision is Decision.NEEDS_REVIEW
    with pytest.raises(ParseError, match="answer"):
        parse_synthesis('{"answer": "", "decision": "blocked", "remaining_concerns": []}')


@pytest.mark.parametrize("answer", [",.29,", ", approved, authorized", "42", "- - -"])
def test_a_synthesis_answer_that_is_not_prose_is_refused(answer: str) -> None:
    # What SmolLM2-135M produced under the grammar in `make run`; the repair attempt
    # or the fallback synthesis serves the user better.
    with pytest.raises(ParseError, match="sentences in words"):
        parse_synthesis(json.dumps({"answer": answer, "decision": "authorized",
                                    "remaining_concerns": []}))
    assert parse_synthesis(json.dumps({"answer": "“Yes” — 2 nodes agree.",
                                       "decision": "authorized",
                                       "remaining_concerns": []})).answer


@given(st.text(max_size=200))
def test_the_parser_never_raises_anything_but_parse_error(text: str) -> None:
    with contextlib.suppress(ParseError):
        parse_vote(text)


# ---- members ---------------------------------------------------------------------------------

def test_the_shipped_roster_has_the_seven_and_scaled_quorums() -> None:
    roster = load_roster()
    assert [m.name for m in roster.members] == [
        "Crawdad", "Gecko", "Turtle", "Eagle Eye", "Spider", "Raven", "Peace Chief"]
    assert roster.chair.key == "peace_chief"
    assert [m.key for m in roster.select("technical")] == ["gecko", "eagle_eye"]
    assert [m.key for m in roster.select("security")] == ["crawdad"]
    assert [m.key for m in roster.select("ethics")] == ["turtle"]
    assert [m.key for m in roster.select("strategic")] == ["raven", "peace_chief"]
    assert [roster.required_votes(n, 5) for n in (7, 5, 3, 2, 1)] == [5, 4, 3, 2, 1]


def test_a_bad_roster_is_refused() -> None:
    from federation.council.members import MembersFileError

    with pytest.raises(MembersFileError, match="chair"):
        parse_roster({"members": [{"key": "a", "name": "A", "specialty": "x", "model": "m",
                                   "system": "s"}]})
    with pytest.raises(MembersFileError, match="weight"):
        parse_roster({"members": [{"key": "a", "name": "A", "specialty": "x", "model": "m",
                                   "system": "s", "weight": 0}],
                      "chair": {"member": "a", "system": "s"}})
