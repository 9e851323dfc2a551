"""The "pheromone decay" job: recompute every active key's strength on a schedule.

Each run records a DECAY strength sample per active key and suspends those
below the minimum viable strength; each suspension is audited in thermal
memory (through :meth:`KeyAuthority.suspend`, which fails closed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from federation.keys import repository as repo
from federation.keys.authority import KeyAuthority
from federation.keys.models import StrengthKind, StrengthSample
from federation.periodic import PeriodicTask

log = logging.getLogger(__name__)

PAGE = 500
ACTOR = "keys/decay"


@dataclass(frozen=True)
class DecayReport:
    checked: int
    suspended: list[str]


async def decay_once(authority: KeyAuthority, pool: asyncpg.Pool) -> DecayReport:
    checked = 0
    suspended: list[str] = []
    after = ""
    while True:
        records = await repo.active_keys_page(pool, after, PAGE)
        if not records:
            break
        after = records[-1].key_id
        views = [authority.view(r) for r in records]
        await repo.add_samples(pool, [
            (v.record.tenant_id, v.record.key_id,
             StrengthSample(repo.from_posix(authority.clock()), v.strength, StrengthKind.DECAY, ""))
            for v in views
        ])
        checked += len(views)
        for view in views:
            if view.strength * authority.params.ceiling < authority.params.minimum and \
                    await authority.suspend(view.record, ACTOR, "strength below minimum"):
                suspended.append(view.record.key_id)
    if suspended:
        log.info("pheromone decay suspended keys", extra={"count": len(suspended)})
    return DecayReport(checked, suspended)


def strength_decay_job(
    authority: KeyAuthority, pool: asyncpg.Pool, interval: float
) -> PeriodicTask:
    async def run() -> DecayReport:
        return await decay_once(authority, pool)

    return PeriodicTask("key-strength-decay", interval, run)
