"""Key strength: K(t) = K0·exp(−λt + αU(t)), made sound.

Pure functions and small value types; no I/O. Times are POSIX seconds (float).

* **Incremental U.** ``U(t) = Σ exp(−(t − tᵢ)/τ)·wᵢ·aᵢ`` is kept as an
  :class:`Accumulator` ``(value, at)``: adding an event decays the stored value
  to the event's time and adds ``w·a``. O(1) work and storage per event, and
  exactly equal (up to float rounding) to the direct sum over the history.
* **Cap.** ``K = min(ceiling, K0·exp(−λt + αU))``: heavy use cannot make a key
  immortal or immune to failures.
* **Failures per source.** Verified uses feed the key's own ``U``. Failed
  attempts feed a separate accumulator ``F_s`` per (key, source). The strength
  seen from source *s* is ``K_s = K·exp(α·F_s)``, applied *after* the cap; a
  source whose ``K_s`` is below the minimum is refused, other sources are not.
* **Anomaly factor a(event).** A failure counts ``unusual_source_factor`` times
  more from a source that never verified this key, and ``burst_factor`` times
  more during a burst. A verified use during a burst counts ``burst_factor``
  times less. A burst is a one-minute event rate (a decayed counter with τ = 60 s)
  above ``burst_multiplier`` × the key's baseline, where the baseline is the
  key's long-run use rate ``max(U, 0)/τ`` per minute, floored at
  ``burst_floor_per_minute``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from federation.config import KeysConfig

SECONDS_PER_DAY: Final = 86_400.0
BURST_WINDOW_SECONDS: Final = 60.0


@dataclass(frozen=True)
class Accumulator:
    """An exponentially decayed sum, stored as its value at time ``at``."""

    value: float = 0.0
    at: float = 0.0

    def value_at(self, now: float, tau_seconds: float) -> float:
        if now <= self.at:
            return self.value
        return self.value * math.exp(-(now - self.at) / tau_seconds)

    def add(self, now: float, amount: float, tau_seconds: float) -> Accumulator:
        """The accumulator after an event of weight ``amount`` at ``now``."""
        if now < self.at:  # a late event: decay the event, not the sum
            return Accumulator(self.value + amount * math.exp(-(self.at - now) / tau_seconds),
                               self.at)
        return Accumulator(self.value_at(now, tau_seconds) + amount, now)

    def merge(self, other: Accumulator, tau_seconds: float) -> Accumulator:
        """Both sums together, expressed at the later of the two times."""
        at = max(self.at, other.at)
        return Accumulator(self.value_at(at, tau_seconds) + other.value_at(at, tau_seconds), at)


@dataclass(frozen=True)
class Event:
    """One use or attempt, for the reference (direct-sum) computation."""

    at: float
    weight: float
    anomaly: float = 1.0


@dataclass(frozen=True)
class StrengthParams:
    k0: float
    decay_per_day: float
    alpha: float
    tau_seconds: float
    minimum: float
    ceiling: float
    use_weight: float
    failure_weight: float
    unusual_source_factor: float
    burst_factor: float
    burst_multiplier: float
    burst_floor_per_minute: float

    @classmethod
    def from_config(cls, config: KeysConfig) -> StrengthParams:
        return cls(
            k0=config.initial_strength,
            decay_per_day=config.decay_per_day,
            alpha=config.reinforcement,
            tau_seconds=config.usage_time_constant_days * SECONDS_PER_DAY,
            minimum=config.minimum_strength,
            ceiling=config.ceiling_strength,
            use_weight=config.verified_use_weight,
            failure_weight=config.failed_attempt_weight,
            unusual_source_factor=config.unusual_source_factor,
            burst_factor=config.burst_factor,
            burst_multiplier=config.burst_multiplier,
            burst_floor_per_minute=config.burst_floor_per_minute,
        )


def key_strength(params: StrengthParams, epoch: float, usage: Accumulator, now: float) -> float:
    """K(t) for the key as a whole: decay since ``epoch`` (issue or rotation), capped."""
    age_days = max(0.0, now - epoch) / SECONDS_PER_DAY
    exponent = -params.decay_per_day * age_days + params.alpha * usage.value_at(
        now, params.tau_seconds
    )
    # Compare in log space first: exp() of a huge exponent would overflow.
    if exponent >= math.log(params.ceiling / params.k0):
        return params.ceiling
    return params.k0 * math.exp(exponent)


def source_strength(
    params: StrengthParams, key_value: float, failures: Accumulator, now: float
) -> float:
    """K_s: the key's (capped) strength as seen from one source, after its failures."""
    return key_value * math.exp(params.alpha * failures.value_at(now, params.tau_seconds))


def normalised(params: StrengthParams, value: float) -> float:
    """Strength on the API's [0, 1] scale: a fraction of the ceiling."""
    return max(0.0, min(1.0, value / params.ceiling))


def baseline_per_minute(params: StrengthParams, usage: Accumulator, now: float) -> float:
    """The key's long-run use rate: a steady r uses/minute makes U settle near r·τ."""
    tau_minutes = params.tau_seconds / 60.0
    rate = max(0.0, usage.value_at(now, params.tau_seconds)) / tau_minutes
    return max(rate, params.burst_floor_per_minute)


def is_burst(params: StrengthParams, recent: Accumulator, usage: Accumulator, now: float) -> bool:
    """True when the last minute's events (``recent``, τ = 60 s) far exceed the baseline."""
    per_minute = recent.value_at(now, BURST_WINDOW_SECONDS)
    return per_minute > params.burst_multiplier * baseline_per_minute(params, usage, now)


def use_anomaly(params: StrengthParams, *, burst: bool) -> float:
    return 1.0 / params.burst_factor if burst else 1.0


def failure_anomaly(params: StrengthParams, *, unusual_source: bool, burst: bool) -> float:
    factor = params.unusual_source_factor if unusual_source else 1.0
    return factor * (params.burst_factor if burst else 1.0)


def accumulate(events: Iterable[Event], tau_seconds: float) -> Accumulator:
    """Fold events, in time order, into an accumulator (the incremental path)."""
    acc = Accumulator()
    for event in events:
        acc = acc.add(event.at, event.weight * event.anomaly, tau_seconds)
    return acc


def direct_sum(events: Iterable[Event], now: float, tau_seconds: float) -> float:
    """U(now) straight from its definition: the reference for the incremental path."""
    return sum(
        math.exp(-(now - e.at) / tau_seconds) * e.weight * e.anomaly for e in events
    )
