"""The job queue and leasing rule against real PostgreSQL (domain level, no gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json

import asyncpg
import pytest

from federation.config import DatabaseConfig, EdgeConfig
from federation.db import Database
from federation.edge.devices import DeviceRegistry
from federation.edge.jobs import JobQueue
from federation.edge.model import (
    Capabilities,
    JobSpec,
    JobState,
    JobType,
    Requirements,
    lease_allowance,
)
from federation.edge.reaper import Reaper
from federation.errors import ErrorCode, FederationError

CONFIG = EdgeConfig(retry_backoff_base_seconds=0.05, retry_backoff_cap_seconds=0.05)
PHONE = Capabilities(cpu_cores=8, memory_bytes=8 << 30, sensors=("camera", "gps"))


@pytest.fixture
def queue(database: Database) -> JobQueue:
    return JobQueue(database.pool, CONFIG)


@pytest.fixture
def registry(database: Database) -> DeviceRegistry:
    return DeviceRegistry(database.pool, CONFIG)


async def device(
    registry: DeviceRegistry,
    name: str,
    latency_ms: float | None = None,
    caps: Capabilities = PHONE,
    charging: bool = False,
) -> str:
    await registry.register(name, caps)
    await registry.heartbeat(
        name, battery_percent=80, charging=charging, load=0.1, round_trip_ms=latency_ms
    )
    return name


async def submit(queue: JobQueue, job_type: JobType = JobType.BATCH, **kw: object) -> str:
    spec = JobSpec(tenant_id="t1", kind="echo", job_type=job_type, inline_payload=b"x")
    job = await queue.submit(dataclasses.replace(spec, **kw), actor="test")  # type: ignore[arg-type]
    return job.job_id


def test_allowance_threshold_is_strictly_above() -> None:
    config = EdgeConfig()
    assert lease_allowance(499, config).max_leases == 3
    assert lease_allowance(500, config).max_leases == 3
    assert lease_allowance(500, config).realtime_allowed
    assert lease_allowance(501, config).max_leases == 1
    assert not lease_allowance(501, config).realtime_allowed
    assert lease_allowance(None, config).max_leases == 3
    tuned = EdgeConfig(latency_threshold_ms=100, max_jobs_fast=5, max_jobs_slow=2)
    assert lease_allowance(101, tuned).max_leases == 2
    assert lease_allowance(100, tuned).max_leases == 5


async def test_latency_499_500_501(queue: JobQueue, registry: DeviceRegistry) -> None:
    for _ in range(6):
        await submit(queue, JobType.REALTIME)
        await submit(queue, JobType.BATCH)
    granted = {}
    for latency in (499, 500, 501):
        name = await device(registry, f"d{latency}", latency_ms=latency)
        granted[latency] = await queue.lease(name, max_jobs=10)
    assert len(granted[499]) == 3
    assert len(granted[500]) == 3
    assert len(granted[501]) == 1
    assert granted[501][0].job.job_type is JobType.BATCH
    # Held leases count: a slow device gets nothing more until it finishes one.
    assert await queue.lease("d501", max_jobs=10) == []


async def test_slow_device_never_gets_realtime(queue: JobQueue, registry: DeviceRegistry) -> None:
    await submit(queue, JobType.REALTIME, priority=100)
    slow = await device(registry, "slow", latency_ms=900)
    assert await queue.lease(slow, max_jobs=3) == []
    batch = await submit(queue, JobType.BATCH)
    leases = await queue.lease(slow, max_jobs=3)
    assert [lease.job.job_id for lease in leases] == [batch]


async def test_capability_mismatch(queue: JobQueue, registry: DeviceRegistry) -> None:
    needs = Requirements(min_cpu_cores=4, sensors=("camera",), local_models=("whisper-tiny",))
    job = await submit(queue, requirements=needs)
    charging_job = await submit(queue, requirements=Requirements(requires_charging=True))
    plain = await device(registry, "plain", caps=Capabilities(cpu_cores=8, sensors=("camera",)))
    assert await queue.lease(plain, max_jobs=3) == []
    caps = Capabilities(cpu_cores=4, sensors=("camera", "gps"), local_models=("whisper-tiny",))
    able = await device(registry, "able", caps=caps)
    assert [lease.job.job_id for lease in await queue.lease(able, max_jobs=3)] == [job]
    charger = await device(registry, "charger", caps=Capabilities(), charging=True)
    assert [lease.job.job_id for lease in await queue.lease(charger, 3)] == [charging_job]


async def test_deadline_then_priority_order(queue: JobQueue, registry: DeviceRegistry) -> None:
    now = dt.datetime.now(dt.UTC)
    late = await submit(queue, deadline=now + dt.timedelta(hours=1), priority=50)
    soon = await submit(queue, deadline=now + dt.timedelta(minutes=5))
    high = await submit(queue, priority=10)
    low = await submit(queue, priority=5)
    first = await device(registry, "first")
    assert [lease.job.job_id for lease in await queue.lease(first, 3)] == [soon, late, high]
    second = await device(registry, "second")
    assert [lease.job.job_id for lease in await queue.lease(second, 3)] == [low]


async def test_late_completion_after_expiry_is_refused(
    queue: JobQueue, registry: DeviceRegistry, database: Database
) -> None:
    job_id = await submit(queue)
    killed = await device(registry, "killed")
    (old,) = await queue.lease(killed, 1, lease_seconds=0.2)
    await asyncio.sleep(0.3)
    # The lapsed lease is refused even before the reaper has run.
    with pytest.raises(FederationError) as late:
        await queue.renew(killed, job_id, old.fencing_token, 10)
    assert late.value.code is ErrorCode.FAILED_PRECONDITION
    report = await Reaper(database.pool, CONFIG).reap_once()
    assert report is not None and report.released_leases == 1
    survivor = await device(registry, "survivor")
    (new,) = await queue.lease(survivor, 1)
    assert new.fencing_token == old.fencing_token + 1
    with pytest.raises(FederationError) as refused:
        await queue.complete(killed, job_id, old.fencing_token, inline_result=b"stale")
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION
    done = await queue.complete(survivor, job_id, new.fencing_token, inline_result=b"fresh")
    assert done.state is JobState.SUCCEEDED and done.inline_result == b"fresh"
    with pytest.raises(FederationError):
        await queue.complete(killed, job_id, new.fencing_token, inline_result=b"forged")
    assert (await queue.get(job_id)).inline_result == b"fresh"


async def test_retries_back_off_then_dead_letter(
    queue: JobQueue, registry: DeviceRegistry, database: Database
) -> None:
    job_id = await submit(queue, max_attempts=2)
    dev = await device(registry, "dev")
    (lease,) = await queue.lease(dev, 1)
    failed = await queue.fail(dev, job_id, lease.fencing_token, "boom 1", retryable=True)
    assert failed.state is JobState.FAILED
    assert await queue.lease(dev, 1) == []  # still backing off
    await asyncio.sleep(0.06)
    (again,) = await queue.lease(dev, 1)
    dead = await queue.fail(dev, job_id, again.fencing_token, "boom 2", retryable=True)
    assert dead.state is JobState.DEAD_LETTER
    assert (dead.attempts, dead.last_error) == (2, "boom 2")
    actions = await database.pool.fetch(
        "SELECT action FROM edge_audit_outbox WHERE subject = $1 ORDER BY id", job_id
    )
    assert [r["action"] for r in actions] == [
        "edge.job.submit", "edge.job.lease", "edge.job.retry", "edge.job.lease",
        "edge.job.dead_letter",
    ]


async def test_non_retryable_failure_dead_letters_at_once(
    queue: JobQueue, registry: DeviceRegistry
) -> None:
    job_id = await submit(queue, max_attempts=5)
    dev = await device(registry, "dev")
    (lease,) = await queue.lease(dev, 1)
    job = await queue.fail(dev, job_id, lease.fencing_token, "bad input", retryable=False)
    assert job.state is JobState.DEAD_LETTER and job.attempts == 1


async def test_deadline_expiry_and_audit(
    queue: JobQueue, registry: DeviceRegistry, database: Database
) -> None:
    now = dt.datetime.now(dt.UTC)
    job_id = await submit(queue, deadline=now + dt.timedelta(milliseconds=150))
    await asyncio.sleep(0.2)
    dev = await device(registry, "dev")
    assert await queue.lease(dev, 1) == []  # past deadline: never leased
    report = await Reaper(database.pool, CONFIG).reap_once()
    assert report is not None and report.expired_jobs == 1
    assert (await queue.get(job_id)).state is JobState.EXPIRED
    actions = await database.pool.fetch(
        "SELECT action FROM edge_audit_outbox WHERE subject = $1 ORDER BY id", job_id
    )
    assert [r["action"] for r in actions] == ["edge.job.submit", "edge.job.expire"]


async def test_offline_device_loses_leases_and_revoked_never_revives(
    queue: JobQueue, registry: DeviceRegistry, database: Database
) -> None:
    config = dataclasses.replace(CONFIG, heartbeat_interval_seconds=0.1)
    job_id = await submit(queue)
    dev = await device(registry, "quiet")
    await queue.lease(dev, 1)
    await asyncio.sleep(0.25)  # > 2 × 0.1 s without a heartbeat
    report = await Reaper(database.pool, config).reap_once()
    assert report is not None and report.offline_devices == ("quiet",)
    job = await queue.get(job_id)
    assert (job.state, job.last_error) == (JobState.PENDING, "device went offline")
    revived = await registry.heartbeat(
        dev, battery_percent=50, charging=False, load=0, round_trip_ms=None
    )
    assert revived.state.value == "online"
    await registry.revoke(dev, actor="ops")
    with pytest.raises(FederationError) as refused:
        await registry.heartbeat(dev, battery_percent=50, charging=False, load=0, round_trip_ms=1)
    assert refused.value.code is ErrorCode.UNAUTHENTICATED
    with pytest.raises(FederationError):
        await registry.register(dev, PHONE)
    assert (await registry.get(dev)).state.value == "revoked"
    with pytest.raises(FederationError) as unknown:
        await registry.heartbeat("ghost", battery_percent=1, charging=False, load=0,
                                 round_trip_ms=None)
    assert unknown.value.code is ErrorCode.FAILED_PRECONDITION


async def test_smoothed_latency_is_an_ewma(registry: DeviceRegistry) -> None:
    await registry.register("d", PHONE)
    for sample, expected in ((100.0, 100.0), (200.0, 120.0), (None, 120.0), (0.0, 96.0)):
        dev = await registry.heartbeat(
            "d", battery_percent=1, charging=False, load=0, round_trip_ms=sample
        )
        assert dev.smoothed_latency_ms == pytest.approx(expected)


async def test_batched_heartbeats_each_get_their_own_outcome(
    registry: DeviceRegistry, database: Database
) -> None:
    """Concurrent heartbeats share one UPDATE, but a revoked or unknown device in
    the batch is refused alone, and two beats of one device apply in order."""
    live = [f"batch-{n}" for n in range(20)]
    for name in live:
        await registry.register(name, PHONE)
    await registry.register("batch-revoked", PHONE)
    await registry.revoke("batch-revoked", actor="ops")

    async def beat(name: str, sample: float | None) -> object:
        try:
            return await registry.heartbeat(
                name, battery_percent=40, charging=True, load=0.5, round_trip_ms=sample
            )
        except FederationError as exc:
            return exc.code

    outcomes = await asyncio.gather(
        *(beat(name, 100.0) for name in live),
        beat("batch-revoked", 1.0),
        beat("batch-ghost", 1.0),
        beat(live[0], 200.0),  # a second beat of the same device: applied after the first
    )
    assert all(o.state.value == "online" for o in outcomes[:20])  # type: ignore[attr-defined]
    assert outcomes[20:22] == [ErrorCode.UNAUTHENTICATED, ErrorCode.FAILED_PRECONDITION]
    assert (await registry.get(live[0])).smoothed_latency_ms == pytest.approx(120.0)
    assert (await registry.get(live[1])).smoothed_latency_ms == pytest.approx(100.0)
    assert (await registry.get("batch-revoked")).state.value == "revoked"
    assert await database.pool.fetchval(
        "SELECT count(*) FROM edge_devices WHERE device_id = 'batch-ghost'"
    ) == 0


async def test_only_one_reaper_per_pass(database: Database, pg_url: str) -> None:
    other = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=2), migrate=False)
    await other.start()
    try:
        async with database.pool.acquire() as conn, conn.transaction():
            from federation.edge.reaper import REAPER_LOCK_KEY

            await conn.execute("SELECT pg_advisory_xact_lock($1)", REAPER_LOCK_KEY)
            assert await Reaper(other.pool, CONFIG).reap_once() is None
        assert await Reaper(other.pool, CONFIG).reap_once() is not None
    finally:
        await other.stop()


async def test_two_brokers_twenty_devices_no_double_lease(
    database: Database, pg_url: str
) -> None:
    """Two pools (two broker processes' worth) and 20 devices drain 200 jobs concurrently."""
    second = Database(pg_url, DatabaseConfig(pool_min_size=2, pool_max_size=10), migrate=False)
    await second.start()
    try:
        queues = [JobQueue(database.pool, CONFIG), JobQueue(second.pool, CONFIG)]
        registry = DeviceRegistry(database.pool, CONFIG)
        ids = {await submit(queues[0]) for _ in range(200)}
        holders: dict[str, str] = {}
        completed: list[str] = []

        async def agent(n: int) -> None:
            name = await device(registry, f"agent{n}")
            q = queues[n % 2]
            while True:
                leases = await q.lease(name, 3)
                if not leases:
                    return
                for lease in leases:
                    job_id = lease.job.job_id
                    assert job_id not in holders, f"{job_id} held twice"
                    holders[job_id] = name
                await asyncio.sleep(0)
                for lease in leases:
                    del holders[lease.job.job_id]
                    await q.complete(name, lease.job.job_id, lease.fencing_token,
                                     inline_result=name.encode())
                    completed.append(lease.job.job_id)

        await asyncio.gather(*(agent(n) for n in range(20)))
        assert sorted(completed) == sorted(ids)
        rows = await database.pool.fetch("SELECT state, attempts FROM edge_jobs")
        assert {(r["state"], r["attempts"]) for r in rows} == {("succeeded", 1)}
    finally:
        await second.stop()


async def test_the_reaper_says_once_that_the_database_is_down(
        caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 9: every pass fails as in an outage.
    pool = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:9/none", min_size=0)
    reaper = Reaper(pool, dataclasses.replace(CONFIG, reaper_interval_seconds=0.02))
    task = asyncio.create_task(reaper.run())
    try:
        await asyncio.sleep(0.4)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()
    records = [r for r in caplog.records if r.name == "federation.edge.reaper"]
    assert [r.levelname for r in records] == ["WARNING"]
    assert "the database is unavailable" in records[0].getMessage()


async def test_revocation_is_audited_and_spends_the_attempt(
    queue: JobQueue, registry: DeviceRegistry, database: Database
) -> None:
    """A revoked device's leases go back like lapsed ones: a job with an attempt left is
    PENDING again, one without is DEAD_LETTER (never leased past max_attempts); the
    revocation and the dead-lettering are audited in the revoking transaction."""
    last_try = await submit(queue, max_attempts=1)
    retried = await submit(queue, max_attempts=2)
    stolen = await device(registry, "stolen")
    assert len(await queue.lease(stolen, 2)) == 2
    assert await registry.revoke(stolen, actor="ops")
    assert (await queue.get(last_try)).state is JobState.DEAD_LETTER
    assert (await queue.get(retried)).state is JobState.PENDING
    other = await device(registry, "other")
    (lease,) = await queue.lease(other, 3)
    assert (lease.job.job_id, lease.job.attempts) == (retried, 2)
    rows = await database.pool.fetch(
        "SELECT actor, action, subject, attributes FROM edge_audit_outbox "
        "WHERE action NOT IN ('edge.job.submit', 'edge.job.lease', 'edge.device.register') "
        "ORDER BY id")
    events = [(r["actor"], r["action"], r["subject"]) for r in rows]
    assert events[0] == ("ops", "edge.device.revoke", "stolen")
    assert sorted(events[1:]) == [("ops", "edge.job.dead_letter", last_try),
                                  ("ops", "edge.job.release", retried)]
    assert '"released_leases": "2"' in rows[0]["attributes"]


async def device_events(database: Database, name: str) -> list[tuple[str, str, str]]:
    """(actor, action, previous_state) of the device's audit records, oldest first."""
    rows = await database.pool.fetch(
        "SELECT actor, action, attributes->>'previous_state' AS previous FROM edge_audit_outbox"
        " WHERE subject = $1 AND action LIKE 'edge.device.%' ORDER BY id", name)
    return [(r["actor"], r["action"], r["previous"]) for r in rows]


async def test_registration_and_online_offline_are_audited(
    registry: DeviceRegistry, database: Database
) -> None:
    """A registration, a re-registration that changes capabilities, going offline and
    coming back are state changes, each in the outbox; heartbeats of an online device
    (telemetry) are not."""
    config = dataclasses.replace(CONFIG, heartbeat_interval_seconds=0.05)
    await registry.register("cam", PHONE, actor="spiffe://t/edge/cam")
    for _ in range(3):
        await registry.heartbeat("cam", battery_percent=50, charging=False, load=0,
                                 round_trip_ms=None, actor="spiffe://t/edge/cam")
    await registry.register("cam", dataclasses.replace(PHONE, sensors=("camera",)),
                            actor="spiffe://t/edge/cam")
    await asyncio.sleep(0.15)  # > 2 × 0.05 s without a heartbeat
    report = await Reaper(database.pool, config).reap_once()
    assert report is not None and report.offline_devices == ("cam",)
    again = await Reaper(database.pool, config).reap_once()  # already offline: no record
    assert again is not None and again.offline_devices == ()
    for _ in range(2):
        await registry.heartbeat("cam", battery_percent=50, charging=False, load=0,
                                 round_trip_ms=None, actor="spiffe://t/edge/cam")
    assert await device_events(database, "cam") == [
        ("spiffe://t/edge/cam", "edge.device.register", ""),
        ("spiffe://t/edge/cam", "edge.device.register", "online"),
        ("edge-broker", "edge.device.offline", "online"),
        ("spiffe://t/edge/cam", "edge.device.online", "offline"),
    ]
    registered = await database.pool.fetch(
        "SELECT attributes FROM edge_audit_outbox WHERE action = 'edge.device.register' "
        "ORDER BY id")
    first, second = (json.loads(r["attributes"]) for r in registered)
    assert first["changed"] == "cpu_cores,memory_bytes,network_type,sensors,local_models"
    assert (second["changed"], second["sensors"]) == ("sensors", "camera")


_REFUSE_AUDIT = """
CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'the audit outbox refuses writes'; END $$;
CREATE TRIGGER refuse_audit BEFORE INSERT ON edge_audit_outbox
FOR EACH ROW EXECUTE FUNCTION refuse_audit();
"""


async def test_a_device_change_that_cannot_be_audited_is_not_made(
    registry: DeviceRegistry, database: Database
) -> None:
    """Registration and the offline/online transitions fail with their audit record:
    the stored state is left as it was."""
    config = dataclasses.replace(CONFIG, heartbeat_interval_seconds=0.05)
    await registry.register("known", PHONE)
    await database.pool.execute(_REFUSE_AUDIT)
    with pytest.raises(asyncpg.RaiseError):
        await registry.register("new", PHONE)
    assert not await database.pool.fetchval(
        "SELECT count(*) FROM edge_devices WHERE device_id = 'new'")
    await asyncio.sleep(0.15)
    with pytest.raises(asyncpg.RaiseError):
        await Reaper(database.pool, config).reap_once()
    assert (await registry.get("known")).state.value == "online"
    await database.pool.execute("ALTER TABLE edge_audit_outbox DISABLE TRIGGER refuse_audit")
    await Reaper(database.pool, config).reap_once()
    await database.pool.execute("ALTER TABLE edge_audit_outbox ENABLE TRIGGER refuse_audit")
    with pytest.raises(asyncpg.RaiseError):
        await registry.heartbeat("known", battery_percent=1, charging=False, load=0,
                                 round_trip_ms=None)
    assert (await registry.get("known")).state.value == "offline"


async def test_every_job_transition_is_audited(
    queue: JobQueue, registry: DeviceRegistry, database: Database
) -> None:
    """Leased, failed for a retry, released when the lease lapsed: each change of a
    job's state is in the outbox, written by the transaction that made it."""
    job_id = await submit(queue, max_attempts=3)
    dev = await device(registry, "dev")
    (lease,) = await queue.lease(dev, 1, lease_seconds=0.05)
    await asyncio.sleep(0.1)
    report = await Reaper(database.pool, CONFIG).reap_once()
    assert report is not None and report.released_leases == 1
    (again,) = await queue.lease(dev, 1)
    await queue.fail(dev, job_id, again.fencing_token, "flaky", retryable=True)
    rows = await database.pool.fetch(
        "SELECT actor, action, attributes FROM edge_audit_outbox WHERE subject = $1 "
        "ORDER BY id", job_id)
    assert [(r["actor"], r["action"]) for r in rows] == [
        ("test", "edge.job.submit"),
        ("dev", "edge.job.lease"),
        ("edge-broker", "edge.job.release"),
        ("dev", "edge.job.lease"),
        ("dev", "edge.job.retry"),
    ]
    assert f'"fencing_token": "{lease.fencing_token}"' in rows[1]["attributes"]


async def test_a_tenant_queue_depth_is_bounded(
    registry: DeviceRegistry, database: Database
) -> None:
    """edge.max_open_jobs_per_tenant: unfinished jobs (pending, leased, awaiting a retry)
    count; concurrent submissions cannot together pass it; finished jobs free room."""
    queue = JobQueue(database.pool, dataclasses.replace(CONFIG, max_open_jobs_per_tenant=3))
    outcomes = await asyncio.gather(*(submit(queue) for _ in range(6)),
                                    return_exceptions=True)
    refusals = [o for o in outcomes if isinstance(o, FederationError)]
    assert len(refusals) == 3
    assert all(r.code is ErrorCode.RESOURCE_EXHAUSTED for r in refusals)
    assert "max_open_jobs_per_tenant" in refusals[0].message
    await submit(queue, tenant_id="t2")  # another tenant's queue is its own
    dev = await device(registry, "dev")
    lease, *_ = await queue.lease(dev, 1)
    await queue.complete(dev, lease.job.job_id, lease.fencing_token, inline_result=b"ok")
    await submit(queue)
    with pytest.raises(FederationError):
        await submit(queue)
