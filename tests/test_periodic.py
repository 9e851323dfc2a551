"""TaskSet, the one holder of tasks nobody awaits where they start; and the one way a
background task is stopped."""

from __future__ import annotations

import asyncio

import pytest

from federation.periodic import TaskSet, cancel_all, cancel_and_wait


async def test_a_spawned_task_is_held_until_it_ends() -> None:
    tasks = TaskSet()
    release = asyncio.Event()
    task = tasks.spawn(release.wait(), name="held")
    await asyncio.sleep(0)
    assert len(tasks) == 1 and task.get_name() == "held"
    release.set()
    await task
    await asyncio.sleep(0)  # the done callback runs in the step after the task's last
    assert len(tasks) == 0


async def test_wait_with_a_grace_returns_without_cancelling() -> None:
    tasks = TaskSet()
    release = asyncio.Event()
    task = tasks.spawn(release.wait())
    await tasks.wait(grace_seconds=0.01)
    assert not task.done() and len(tasks) == 1
    release.set()
    await tasks.wait()
    assert task.done() and not task.cancelled() and len(tasks) == 0


async def test_a_cancelled_wait_leaves_the_tasks_running() -> None:
    tasks = TaskSet()
    release = asyncio.Event()
    task = tasks.spawn(release.wait())
    waiter = asyncio.create_task(tasks.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not task.done()
    release.set()
    assert await task is True


async def test_cancel_ends_every_task() -> None:
    tasks = TaskSet()
    spawned = [tasks.spawn(asyncio.sleep(60)) for _ in range(3)]
    tasks.cancel()
    await asyncio.gather(*spawned, return_exceptions=True)
    assert all(task.cancelled() for task in spawned)
    assert len(tasks) == 0


async def _retry_loop_that_swallows_one_cancel(attempts: list[int]) -> None:
    """A retry loop whose ``except Exception`` takes a cancellation asyncpg turned into a
    TimeoutError (it does, when the cancel lands while it releases a connection) for an
    outage, as the edge broker's audit-outbox flusher did."""
    while True:
        attempts.append(1)
        try:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if len(attempts) == 1:
                    raise TimeoutError from None
                raise
        except Exception:
            pass  # "an outage: retry"


@pytest.mark.parametrize("stop", [cancel_and_wait, lambda task: cancel_all([task])])
async def test_a_task_that_swallows_a_cancel_is_cancelled_again(stop: object) -> None:
    attempts: list[int] = []
    task = asyncio.create_task(_retry_loop_that_swallows_one_cancel(attempts))
    await asyncio.sleep(0)
    assert callable(stop)
    async with asyncio.timeout(5):  # a single cancel left it running for ever
        await stop(task)
    assert task.cancelled() and len(attempts) == 2
