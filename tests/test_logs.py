"""What the federation's processes log: JSON lines, and a database outage as one line per
reconnect attempt, not a traceback."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import asyncpg
import pytest

from federation import logs
from federation.db.errors import OUTAGE_MESSAGE, log_job_failure
from tests.db_support import database_name, with_database


@pytest.fixture
def configured_logs() -> Iterator[io.StringIO]:
    """The process's logging as ``logs.configure`` sets it, written to a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    quiet = [logging.getLogger(name) for name in logs.QUIET_TRACEBACK_LOGGERS]
    saved_filters = [logger.filters[:] for logger in quiet]
    logs.configure("test")
    out = io.StringIO()
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    try:
        yield out
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for logger, filters in zip(quiet, saved_filters, strict=True):
            logger.filters[:] = filters


async def test_a_pool_that_cannot_reconnect_logs_one_line_per_attempt(
        pg_url: str, configured_logs: io.StringIO) -> None:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=1)
    admin = await asyncpg.connect(with_database(pg_url, "postgres"))
    name = database_name(pg_url)
    try:
        # The pool's connection is cut and every new one refused: asyncpg's pool then
        # tries to restore its floor connection, and logs each failure.
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = $1 AND pid <> pg_backend_pid()", name)
        for _ in range(50):
            if "Failed to restore" in configured_logs.getvalue():
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
        pool.terminate()
    lines = [json.loads(line) for line in configured_logs.getvalue().splitlines()]
    failures = [line for line in lines if line["logger"] == "asyncpg.pool"]
    assert failures, lines
    for failure in failures:
        assert "exc" not in failure  # no traceback
        assert "is not currently accepting connections" in failure["error"], failure


def test_our_own_failures_keep_their_traceback(configured_logs: io.StringIO) -> None:
    try:
        raise ValueError("a bug")
    except ValueError:
        logging.getLogger("federation.test").exception("unexpected")
    line = json.loads(configured_logs.getvalue())
    assert "Traceback" in line["exc"] and "error" not in line


def test_a_job_failing_in_an_outage_logs_one_line_and_a_bug_its_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("federation.test.job")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log_job_failure(log, "flushing failed", asyncpg.CannotConnectNowError(
            "the database system is starting up"), job="flush")
        try:
            raise KeyError("a bug")
        except KeyError as exc:
            log_job_failure(log, "flushing failed", exc, job="flush")
    outage, bug = caplog.records
    assert (outage.levelno, outage.exc_info) == (logging.WARNING, None)
    assert outage.getMessage() == f"flushing failed: {OUTAGE_MESSAGE}"
    assert bug.levelno == logging.ERROR and bug.exc_info and bug.exc_info[0] is KeyError
    assert bug.job == "flush"  # type: ignore[attr-defined]
