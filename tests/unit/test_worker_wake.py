"""An idle worker waits to be woken instead of polling: by a byte from its supervising server
on stdin (SQLite) or by PostgreSQL's NOTIFY; and its stdin watch ends cleanly, on a pipe and on
a stdin that is none (then it watches its parent process: tests/unit/test_worker_orphaned.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dan.db import create_db_engine, migrate
from dan.domain import ClaimedTask, TaskStatus
from dan.engine.fake import FakeEngine
from dan.models.registry import ModelRegistry
from dan.services import Stores
from dan.storage import InMemoryBlobStore
from dan.tasks.store import SqlTaskStore
from dan.workers.local import ParentWatch, queue_notices
from dan.workers.loop import Worker
from dan.workers.supervisor import WorkerSupervisor
from tests.api.conftest import install_dummy_checkpoint
from tests.fixtures.postgres import schema_url
from tests.unit.test_worker import submit

FALLBACK_S = 10.0  # the idle worker's own look; a woken claim must come well before it
POSTGRES_URL = os.environ.get("DAN_TEST_POSTGRES_URL")


class CountingStore(SqlTaskStore):
    """The real store, counting claims, so a test knows the worker has gone idle."""

    claims = 0

    def claim(self, *args: Any, **kwargs: Any) -> ClaimedTask | None:
        self.claims += 1
        return super().claim(*args, **kwargs)


def wait_until(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@contextlib.contextmanager
def serve_in_thread(
    url: str, tmp_path: Path, wake: threading.Event
) -> Iterator[tuple[CountingStore, ModelRegistry]]:
    """A worker on ``url`` idling FALLBACK_S between looks unless ``wake`` is set; yields
    (store, registry) once it has looked once and gone idle."""
    migrate(url)
    db = create_db_engine(url)
    install_dummy_checkpoint(tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    store = CountingStore(db)
    worker = Worker(
        store,
        FakeEngine(),
        registry,
        InMemoryBlobStore(),
        worker_id="w",
        lease_s=30,
        idle_sleep_s=FALLBACK_S,
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, wake))
    thread.start()
    try:
        assert wait_until(lambda: store.claims >= 1, 10)
        time.sleep(0.1)  # past its first look: now waiting
        yield store, registry
    finally:
        stop.set()
        wake.set()
        thread.join(10)
        db.dispose()
    assert not thread.is_alive()


def assert_claimed_promptly(store: SqlTaskStore, task_id: str) -> None:
    def claimed() -> bool:
        record = store.get(task_id)
        return record is not None and record.status != TaskStatus.PENDING

    assert wait_until(claimed, FALLBACK_S / 2), "the idle worker was not woken"


def test_a_woken_idle_worker_claims_at_once(tmp_path: Path) -> None:
    wake = threading.Event()
    with serve_in_thread(f"sqlite:///{tmp_path / 'q.db'}", tmp_path, wake) as (store, registry):
        task_id = submit(store, registry, "ok")
        wake.set()
        assert_claimed_promptly(store, task_id)


@pytest.mark.postgres
def test_on_postgresql_a_submit_wakes_the_idle_worker(tmp_path: Path) -> None:
    if not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL to run the PostgreSQL tests")
    wake = threading.Event()
    with schema_url(POSTGRES_URL) as url:
        migrate(url)
        db = create_db_engine(url)
        stores = Stores(db, None, None, None, None)  # type: ignore[arg-type]
        listener = queue_notices(stores, url, wake)
        assert listener is not None
        try:
            assert listener.listening.wait(10)
            with serve_in_thread(url, tmp_path, wake) as (store, registry):
                assert_claimed_promptly(store, submit(store, registry, "ok"))
        finally:
            listener.stop()
            db.dispose()


def test_no_listener_on_sqlite(tmp_path: Path) -> None:
    db = create_db_engine(f"sqlite:///{tmp_path / 'q.db'}")
    stores = Stores(db, None, None, None, None)  # type: ignore[arg-type]
    assert queue_notices(stores, "sqlite://", threading.Event()) is None


def test_parent_watch_wakes_on_a_byte_and_stops_at_end_of_file() -> None:
    read, write = os.pipe()
    stop, wake = threading.Event(), threading.Event()
    watch = ParentWatch(read, stop, wake).start()
    os.write(write, b"\n")
    assert wake.wait(5) and not stop.is_set()
    wake.clear()
    os.close(write)  # the server is gone
    assert stop.wait(5) and wake.is_set()
    watch.close()
    os.close(read)


def test_parent_watch_closes_while_the_server_lives() -> None:
    """close() ends the thread with the pipe still open: none is left blocked at exit."""
    read, write = os.pipe()
    stop, wake = threading.Event(), threading.Event()
    watch = ParentWatch(read, stop, wake).start()
    watch.close()
    assert not [t for t in threading.enumerate() if t.name == "parent-watch"]
    assert not stop.is_set()
    os.close(read)
    os.close(write)


@pytest.mark.parametrize("stdin", ["/dev/null", "a file"])
def test_parent_watch_on_a_stdin_that_is_no_pipe_runs_on(tmp_path: Path, stdin: str) -> None:
    """epoll refuses /dev/null and regular files, and their end of file means nothing: the
    watch runs (watching the parent instead, which lives), then closes cleanly."""
    path = Path(os.devnull) if stdin == "/dev/null" else tmp_path / "stdin"
    if stdin == "a file":
        path.write_bytes(b"not from a server\n")
    fd = os.open(path, os.O_RDONLY)
    stop, wake = threading.Event(), threading.Event()
    watch = ParentWatch(fd, stop, wake).start()
    try:
        assert not stop.wait(0.5)
        assert [t for t in threading.enumerate() if t.name == "parent-watch"]
    finally:
        watch.close()
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "parent-watch"]


def test_the_supervisor_wakes_its_worker_through_stdin(tmp_path: Path) -> None:
    got = tmp_path / "got"
    child = f"import sys; open({str(got)!r}, 'ab').write(sys.stdin.buffer.read(1))"
    supervisor = WorkerSupervisor({}, argv=[sys.executable, "-c", child])
    supervisor.wake()  # no worker yet: nothing to do, nothing raised
    supervisor.start()
    try:
        assert wait_until(lambda: supervisor.running, 10)
        supervisor.wake()
        assert wait_until(lambda: got.exists() and b"\n" in got.read_bytes(), 10)
    finally:
        supervisor.stop(timeout_s=5)
