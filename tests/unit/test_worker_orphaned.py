"""A worker child (run_local_worker, FakeEngine) whose server dies, killed, exits at once: idle
or in the middle of a task, which it hands back instead of finishing; whether its stdin is the
pipe from the server or /dev/null (then it watches its parent id). Real processes: a parent
that starts the worker as `dan serve` does, and is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dan.db import create_db_engine, migrate
from dan.domain import GenerationRequest, ModelKind, ModelRef, TaskKind, TaskStatus
from dan.models.registry import ModelRegistry
from dan.tasks.store import NewTask, SqlTaskStore
from tests.api.conftest import install_dummy_checkpoint

GONE_S = 10.0  # how soon the worker must be gone; the task it runs would take 100 s

WORKER = """
import logging, sys
from dan.config import Settings
from dan.engine.fake import FakeEngine
from dan.workers.local import run_local_worker
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
run_local_worker(Settings(), engine=FakeEngine(step_s=0.05), watch_stdin=True)
"""

SERVER = """
import subprocess, sys
stdin = subprocess.PIPE if sys.argv[2] == "pipe" else subprocess.DEVNULL
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=stdin, stdout=sys.stderr)
print(worker.pid, flush=True)
worker.wait()
"""


@dataclass
class Orphanable:
    server: subprocess.Popen[bytes]
    worker_pid: int
    log_path: Path
    store: SqlTaskStore
    checkpoint: ModelRef

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def exited(pid: int) -> bool:
    """Whether ``pid`` (not our child: no one here may wait for it) has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie has exited


@pytest.fixture(params=["pipe", "/dev/null"])
def worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Orphanable]:
    """A server process running the worker child with stdin ``request.param``, worker ready."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to see a process that is not our child end")
    install_dummy_checkpoint(tmp_path / "models")
    registry = ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    checkpoint = registry.list(ModelKind.CHECKPOINT)[0]
    url = f"sqlite:///{(tmp_path / 'data' / 'dan.sqlite3').resolve()}"
    (tmp_path / "data").mkdir()
    migrate(url)
    db = create_db_engine(url)
    env = {
        **os.environ,
        "DAN_DATA_DIR": str(tmp_path / "data"),
        "DAN_MODELS_DIR": str(tmp_path / "models"),
        "DAN_DOWNLOAD": "false",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, WORKER, request.param],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert server.stdout is not None
    started = Orphanable(
        server,
        int(server.stdout.readline()),
        log_path,
        SqlTaskStore(db),
        ModelRef(checkpoint.sha256, checkpoint.name),
    )
    try:
        assert wait_until(lambda: " ready" in started.log(), 60), started.log()
        yield started
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if not exited(started.worker_pid):
            os.kill(started.worker_pid, signal.SIGKILL)
        server.stdout.close()
        db.dispose()


def kill_server(worker: Orphanable) -> None:
    worker.server.send_signal(signal.SIGKILL)
    worker.server.wait(10)


def test_an_idle_worker_exits_when_its_server_is_killed(worker: Orphanable) -> None:
    kill_server(worker)
    assert wait_until(lambda: exited(worker.worker_pid), GONE_S), worker.log()
    assert "the server process is gone" in worker.log()


def test_a_worker_abandons_its_task_when_its_server_is_killed(worker: Orphanable) -> None:
    request = GenerationRequest("slow", "", 1, "Euler", 2000, 7.0, 64, 64, worker.checkpoint)
    task = NewTask(str(uuid.uuid4()), "a", TaskKind.TXT2IMG, request.to_params())
    task_id = worker.store.submit(task, max_pending=10).id

    def status() -> TaskStatus:
        record = worker.store.get(task_id)
        assert record is not None
        return record.status

    assert wait_until(lambda: status() == TaskStatus.PROCESSING, 30), worker.log()
    kill_server(worker)
    assert wait_until(lambda: exited(worker.worker_pid), GONE_S), worker.log()
    assert status() == TaskStatus.PENDING  # handed back at once, to run again
    assert "handed back 1 task(s)" in worker.log()
