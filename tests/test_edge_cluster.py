"""Two broker processes on one database, real agents over mTLS, a killed agent process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest

from federation.config import GrpcConfig, MemoryConfig
from federation.db import Database
from federation.edge.device.agent import AgentOptions, EdgeAgent
from federation.edge.device.client import Stub, device_channel
from federation.memory.store import MemoryStore
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc
from tests.edge_support import (
    FAST_EDGE,
    admin_stub,
    broker_environment,
    broker_server,
    device_stub,
    enroll_device,
    far_agent,
    node_processes,
    rpc_count,
    stop_process,
    wait_for,
)
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


async def test_two_broker_processes_twenty_agents(
    home: Path, database: Database, pg_url: str, tmp_path: Path
) -> None:
    """Two `federation node --role broker` processes on one database, twenty agents
    leasing at once (ten on each): no job is held by two devices, none is lost, and
    both processes handed out leases. A memory node process receives the audit."""
    pki = TestPKI(home)
    env = broker_environment(home, pg_url)
    async with contextlib.AsyncExitStack() as stack:  # brokers stop first, then memory
        (memory,) = await stack.enter_async_context(
            node_processes(pki, env, tmp_path, 1, role="memory")
        )
        env["FEDERATION_PEERS_MEMORY"] = memory.address
        brokers = await stack.enter_async_context(node_processes(pki, env, tmp_path, 2))
        stop = asyncio.Event()
        ids = set(await submit(admin_stub(pki, brokers[0].grpc_port), 120))
        served_by = {f"a{n}": brokers[n % 2] for n in range(20)}
        agents = {
            name: EdgeAgent(device_stub(pki, broker.grpc_port, name), FAST_AGENT)
            for name, broker in served_by.items()
        }
        overlaps: list[str] = []
        tasks = [asyncio.create_task(a.run(stop)) for a in agents.values()]

        async def drained() -> bool:
            held: dict[str, str] = {}
            for name, agent in agents.items():  # no job in two agents' hands at once
                for job_id in agent.leases:
                    if held.setdefault(job_id, name) != name:
                        overlaps.append(job_id)
            return sum(len(a.completed) for a in agents.values()) >= len(ids)

        try:
            await wait_for(drained)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert overlaps == []
        completed = [j for a in agents.values() for j in a.completed]
        assert sorted(completed) == sorted(ids)  # each exactly once, none lost

        # The job rows: every job succeeded on its first and only lease (a second
        # lease, even a concurrent one, would have bumped attempts and the token).
        rows = await database.pool.fetch(
            "SELECT job_id::text, state, attempts, fencing_token, leased_by FROM edge_jobs"
        )
        assert {r["job_id"] for r in rows} == ids
        assert {(r["state"], r["attempts"], r["fencing_token"]) for r in rows} == {
            ("succeeded", 1, 1)
        }
        for name, agent in agents.items():
            assert sorted(agent.completed) == sorted(
                r["job_id"] for r in rows if r["leased_by"] == name
            )
        # Both processes leased: each served the completions of the jobs its own
        # devices leased, by the rows and by its own RPC metrics.
        per_broker = Counter(served_by[r["leased_by"]].grpc_port for r in rows)
        for broker in brokers:
            assert per_broker[broker.grpc_port] > 0
            assert await rpc_count(broker.metrics_port, "CompleteJob") == (
                per_broker[broker.grpc_port]
            )
            assert await rpc_count(broker.metrics_port, "LeaseJobs") > 0
        assert sum(1 for a in agents.values() if a.completed) > 2  # work really was shared

        # One completion event per job, drained from the outbox by the brokers
        # into the memory node's hash chain.
        async def audited() -> bool:
            return not await database.pool.fetchval("SELECT count(*) FROM edge_audit_outbox")

        await wait_for(audited)
        events = await database.pool.fetch(
            "SELECT subject, actor FROM memory_records WHERE action = 'edge.job.complete'"
        )
        assert sorted((e["subject"], e["actor"]) for e in events) == sorted(
            (r["job_id"], r["leased_by"]) for r in rows
        )
        assert (await MemoryStore(database.pool, MemoryConfig()).verify_chain()).intact


async def test_killed_agent_process_lease_expires_and_late_answer_refused(
    home: Path, database: Database, pg_url: str, tmp_path: Path
) -> None:
    """`federation edge agent` killed (SIGKILL) mid-job on one broker process: its
    lease lapses, an agent on the other process completes the job, and the dead
    holder's late answer is refused."""
    pki = TestPKI(home)
    env = broker_environment(home, pg_url, dataclasses.replace(FAST_EDGE, max_lease_seconds=2.0))
    async with node_processes(pki, env, tmp_path, 2) as (one, two):
        admin = admin_stub(pki, one.grpc_port)
        creds = await enroll_device(
            database.pool, pki, one.enrollment_port, "doomed", tmp_path / "doomed"
        )
        (job_id,) = await submit(admin, 1, kind="sleep", inline_payload=b"3")
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "edge", "agent", "--cert-dir", str(creds),
            "--broker", one.address, env=env, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async def leased() -> bool:
                holder = await database.pool.fetchval(
                    "SELECT leased_by FROM edge_jobs WHERE job_id = $1::uuid AND state = 'leased'",
                    job_id,
                )
                return bool(holder == "doomed")

            await wait_for(leased)
            doomed.kill()  # mid-job, no goodbye: the lease is left to lapse
            await doomed.wait()
        finally:
            await stop_process(doomed)
        stale = await database.pool.fetchval(
            "SELECT fencing_token FROM edge_jobs WHERE job_id = $1::uuid", job_id
        )
        stop = asyncio.Event()
        survivor = EdgeAgent(
            device_stub(pki, two.grpc_port, "survivor"),
            dataclasses.replace(FAST_AGENT, lease_seconds=2.0),
        )
        running = asyncio.create_task(survivor.run(stop))

        async def done() -> bool:
            return job_id in survivor.completed

        try:
            await wait_for(done)
        finally:
            stop.set()
            await running
        async with device_channel(one.address, creds, GrpcConfig()) as channel:
            late_stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await late_stub.CompleteJob(
                    pb.CompleteJobRequest(job_id=job_id, fencing_token=stale, inline_result=b"late")
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
    async with broker_server(pki, database, home) as (server, broker, _), \
            far_agent(pki, server, broker, FAST_AGENT):
        pass  # far_agent checks the measured latency
