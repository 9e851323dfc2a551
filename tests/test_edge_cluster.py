"""Two brokers on one database, real agents over mTLS, a killed agent, audit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from federation.config import DatabaseConfig
from federation.db import Database
from federation.edge_agent import AgentOptions, EdgeAgent
from federation.edge_device import Stub
from federation.errors import FederationError
from federation.v1 import edge_broker_pb2 as pb
from tests.edge_support import admin_stub, broker_server, device_stub
from tests.support import TestPKI

FAST_AGENT = AgentOptions(poll_seconds=0.05, lease_seconds=5.0)


async def submit(stub: Stub, n: int, **kw: object) -> list[str]:
    ids = []
    for i in range(n):
        request = pb.SubmitJobRequest(
            tenant_id="acme", kind="echo", type=pb.JOB_TYPE_BATCH, inline_payload=b"%d" % i
        )
        for key, value in kw.items():
            setattr(request, key, value)
        ids.append((await stub.SubmitJob(request)).job.job_id)
    return ids


async def wait_for(predicate: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    """Poll ``predicate``: the agents' progress has no event to wait on."""
    async with asyncio.timeout(seconds):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_two_brokers_twenty_agents(home: Path, database: Database, pg_url: str) -> None:
    pki = TestPKI(home)
    second_db = Database(pg_url, DatabaseConfig(pool_min_size=2, pool_max_size=10), migrate=False)
    await second_db.start()
    stop = asyncio.Event()
    try:
        async with (
            broker_server(pki, database, home) as (one, _, memory),
            broker_server(pki, second_db, home) as (two, _, _),
        ):
            admin = admin_stub(pki, one.port)
            ids = set(await submit(admin, 120))
            agents = [
                EdgeAgent(device_stub(pki, (one if n % 2 else two).port, f"a{n}"), FAST_AGENT)
                for n in range(20)
            ]
            held: dict[str, str] = {}
            overlaps: list[str] = []
            tasks = [asyncio.create_task(a.run(stop)) for a in agents]

            async def drained() -> bool:
                for n, agent in enumerate(agents):  # no job in two agents' hands at once
                    for job_id in agent.leases:
                        if held.setdefault(job_id, f"a{n}") != f"a{n}":
                            overlaps.append(job_id)
                held.clear()
                return sum(len(a.completed) for a in agents) >= len(ids)

            await wait_for(drained)
            stop.set()
            await asyncio.gather(*tasks)
            assert overlaps == []
            completed = [j for a in agents for j in a.completed]
            assert sorted(completed) == sorted(ids)  # each exactly once, none lost
            rows = await database.pool.fetch("SELECT state, attempts FROM edge_jobs")
            assert {(r["state"], r["attempts"]) for r in rows} == {("succeeded", 1)}
            assert sum(1 for a in agents if a.completed) > 1  # work really was shared

            async def audited() -> bool:
                n = await database.pool.fetchval(
                    "SELECT count(*) FROM memory_records WHERE action = 'edge.job.complete'"
                )
                return bool(n == len(ids))

            await wait_for(audited)
            assert (await memory.verify_chain()).intact
    finally:
        stop.set()
        await second_db.stop()


async def test_killed_agent_lease_expires_and_late_answer_refused(
    home: Path, database: Database
) -> None:
    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, _, _):
        admin = admin_stub(pki, server.port)
        (job_id,) = await submit(admin, 1, kind="sleep", inline_payload=b"0.3")
        doomed_stub = device_stub(pki, server.port, "doomed")
        doomed = EdgeAgent(doomed_stub, dataclasses.replace(FAST_AGENT, lease_seconds=0.6))
        crash = asyncio.create_task(doomed.run(asyncio.Event()))

        async def started() -> bool:
            return job_id in doomed.leases

        await wait_for(started)
        stale = doomed.leases[job_id]
        crash.cancel()  # killed mid-job: no goodbye, the lease is left to lapse
        with contextlib.suppress(asyncio.CancelledError):
            await crash
        stop = asyncio.Event()
        survivor = EdgeAgent(device_stub(pki, server.port, "survivor"), FAST_AGENT)
        running = asyncio.create_task(survivor.run(stop))

        async def done() -> bool:
            return job_id in survivor.completed

        await wait_for(done)
        stop.set()
        await running
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await doomed_stub.CompleteJob(
                pb.CompleteJobRequest(
                    job_id=job_id, fencing_token=stale.fencing_token, inline_result=b"late"
                )
            )
        assert late.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        job = (await admin.GetJob(pb.GetJobRequest(job_id=job_id))).job
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.inline_result == b"slept"
        assert job.attempts == 2


async def test_watch_cancel_list_and_graceful_return(home: Path, database: Database) -> None:
    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, _, _):
        admin = admin_stub(pki, server.port)
        (long_job,) = await submit(admin, 1, kind="sleep", inline_payload=b"30")
        (quick,) = await submit(admin, 1, kind="sha256", inline_payload=b"abc")
        states: list[int] = []

        async def watch() -> None:
            async for update in admin.WatchJob(pb.WatchJobRequest(job_id=quick)):
                states.append(update.job.state)

        watcher = asyncio.create_task(watch())
        stop = asyncio.Event()
        agent = EdgeAgent(device_stub(pki, server.port, "w"), FAST_AGENT)
        running = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(watcher, 10)
        assert states[0] == pb.JOB_STATE_PENDING and states[-1] == pb.JOB_STATE_SUCCEEDED
        result = (await admin.GetJob(pb.GetJobRequest(job_id=quick))).job.inline_result
        assert result == b"sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

        async def holding() -> bool:
            return long_job in agent.leases

        await wait_for(holding)
        stop.set()  # graceful: the sleeping job is handed back, not left to expire
        await running
        job = (await admin.GetJob(pb.GetJobRequest(job_id=long_job))).job
        assert job.state == pb.JOB_STATE_FAILED and "shut down" in job.last_error
        cancelled = (await admin.CancelJob(pb.CancelJobRequest(job_id=long_job, reason="x"))).job
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        page = await admin.ListJobs(pb.ListJobsRequest(tenant_id="acme", page_size=1))
        assert len(page.jobs) == 1 and page.next_page_token
        rest = await admin.ListJobs(
            pb.ListJobsRequest(tenant_id="acme", page_size=5, page_token=page.next_page_token)
        )
        assert {j.job_id for j in [*page.jobs, *rest.jobs]} == {long_job, quick}
        only = await admin.ListJobs(
            pb.ListJobsRequest(tenant_id="acme", state=pb.JOB_STATE_CANCELLED)
        )
        assert [j.job_id for j in only.jobs] == [long_job]


async def test_heartbeats_measure_simulated_latency(home: Path, database: Database) -> None:
    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, broker, _):
        stop = asyncio.Event()
        options = dataclasses.replace(FAST_AGENT, simulate_latency_ms=120)
        agent = EdgeAgent(device_stub(pki, server.port, "far"), options)
        running = asyncio.create_task(agent.run(stop))

        async def measured() -> bool:
            with contextlib.suppress(FederationError):  # not registered yet
                device = await broker.devices.get("far")
                return device.smoothed_latency_ms is not None
            return False

        await wait_for(measured)
        stop.set()
        await running
        latency = (await broker.devices.get("far")).smoothed_latency_ms
        assert latency is not None and 120 <= latency < 400
