"""Property tests for the strength model K(t) = K0·exp(−λt + αU(t)), capped, per source."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.config import KeysConfig
from federation.keys.strength import (
    SECONDS_PER_DAY,
    Accumulator,
    Event,
    StrengthParams,
    accumulate,
    direct_sum,
    key_strength,
    source_strength,
)

PARAMS = StrengthParams.from_config(KeysConfig())
TAU = PARAMS.tau_seconds
DAY = SECONDS_PER_DAY

offsets = st.floats(min_value=0, max_value=60 * DAY, allow_nan=False)
weights = st.sampled_from([1.0, -0.5])
anomalies = st.sampled_from([0.5, 1.0, 2.0, 4.0])
events = st.lists(st.builds(Event, at=offsets, weight=weights, anomaly=anomalies), max_size=200)


@settings(max_examples=200, deadline=None)
@given(events, st.floats(min_value=0, max_value=30 * DAY))
def test_incremental_accumulator_equals_the_direct_sum(history: list[Event], later: float) -> None:
    ordered = sorted(history, key=lambda e: e.at)
    now = (ordered[-1].at if ordered else 0.0) + later
    incremental = accumulate(ordered, TAU).value_at(now, TAU)
    reference = direct_sum(ordered, now, TAU)
    scale = sum(abs(e.weight * e.anomaly) for e in ordered) + 1.0
    assert math.isclose(incremental, reference, rel_tol=1e-9, abs_tol=1e-9 * scale)


@settings(max_examples=200, deadline=None)
@given(events, events)
def test_merging_two_accumulators_equals_accumulating_everything(
    first: list[Event], second: list[Event]
) -> None:
    a = accumulate(sorted(first, key=lambda e: e.at), TAU)
    b = accumulate(sorted(second, key=lambda e: e.at), TAU)
    both = sorted(first + second, key=lambda e: e.at)
    now = max([e.at for e in both], default=0.0)
    merged = a.merge(b, TAU).value_at(now, TAU)
    scale = sum(abs(e.weight * e.anomaly) for e in both) + 1.0
    assert math.isclose(merged, direct_sum(both, now, TAU), rel_tol=1e-9, abs_tol=1e-9 * scale)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=-50, max_value=50), st.integers(min_value=0, max_value=100),
    st.floats(min_value=0, max_value=365 * DAY), anomalies,
)
def test_more_failures_never_raise_strength(
    usage: float, failures: int, age: float, anomaly: float
) -> None:
    key = key_strength(PARAMS, 0.0, Accumulator(usage, age), age)
    fewer = Accumulator()
    for _ in range(failures):
        fewer = fewer.add(age, PARAMS.failure_weight * anomaly, TAU)
    more = fewer.add(age, PARAMS.failure_weight * anomaly, TAU)
    assert source_strength(PARAMS, key, more, age) < source_strength(PARAMS, key, fewer, age)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=0, max_value=1000), st.floats(min_value=0, max_value=365 * DAY),
    st.floats(min_value=1, max_value=365 * DAY),
)
def test_an_unused_key_decays(usage: float, last_use: float, idle: float) -> None:
    acc = Accumulator(usage, last_use)
    before = key_strength(PARAMS, 0.0, acc, last_use)
    after = key_strength(PARAMS, 0.0, acc, last_use + idle)
    assert after <= before
    if before < PARAMS.ceiling:
        assert after < before


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e9), st.floats(min_value=0, max_value=3650 * DAY))
def test_strength_is_capped(usage: float, age: float) -> None:
    value = key_strength(PARAMS, 0.0, Accumulator(usage, age), age)
    assert 0.0 <= value <= PARAMS.ceiling


def test_unused_key_expires_naturally_after_about_139_days() -> None:
    fresh = Accumulator()
    assert key_strength(PARAMS, 0.0, fresh, 138 * DAY) > PARAMS.minimum
    assert key_strength(PARAMS, 0.0, fresh, 140 * DAY) < PARAMS.minimum


def test_heavy_use_does_not_make_a_key_immune_to_failures() -> None:
    heavy = key_strength(PARAMS, 0.0, Accumulator(1e6, 0.0), 0.0)
    assert heavy == PARAMS.ceiling
    failures = Accumulator()
    for _ in range(60):
        failures = failures.add(0.0, PARAMS.failure_weight, TAU)
    assert source_strength(PARAMS, heavy, failures, 0.0) < PARAMS.minimum
