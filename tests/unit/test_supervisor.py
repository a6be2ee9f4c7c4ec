"""The local worker process is restarted when it dies, and stopped with the server."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

from dan.domain import LOCAL_ACCOUNT, LOCAL_NODE_NAME, TaskKind, TaskStatus
from dan.nodes.store import node_id_for
from dan.services import build_services
from dan.tasks.store import NewTask
from dan.workers.supervisor import WorkerSupervisor
from tests.api.conftest import install_dummy_checkpoint, make_settings


def test_a_crashed_worker_is_restarted_and_stop_ends_it(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    crash = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(1)"
    supervisor = WorkerSupervisor({}, argv=[sys.executable, "-c", crash])
    supervisor.start()
    deadline = time.monotonic() + 20
    while (not starts.exists() or len(starts.read_text()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    supervisor.stop()
    assert len(starts.read_text()) >= 2


def test_stop_terminates_a_running_worker(tmp_path: Path) -> None:
    supervisor = WorkerSupervisor({}, argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    supervisor.start()
    deadline = time.monotonic() + 10
    while not supervisor.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert supervisor.running
    supervisor.stop(timeout_s=5)
    assert not supervisor.running


def test_a_task_that_kills_its_worker_fails_after_its_last_try(tmp_path: Path) -> None:
    """Each worker the supervisor starts claims the task and dies on it (as a crash in native
    code or the OOM killer would have it); every death counts a try, so the task fails after
    the last one instead of killing every restart forever."""
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path, max_attempts=3))
    store = services.store
    task = NewTask(str(uuid.uuid4()), "someone", TaskKind.TXT2IMG, {"prompt": "poison"})
    task_id = store.submit(task, max_pending=10).id
    dies_on_the_task = (
        "import os, sys\n"
        "from dan.db import create_db_engine\n"
        "from dan.tasks.store import SqlTaskStore\n"
        "from dan.workers.local import local_worker_id\n"
        "session = sys.argv[sys.argv.index('--session-id') + 1]\n"
        f"store = SqlTaskStore(create_db_engine({services.settings.db_url!r}))\n"
        "assert store.claim(local_worker_id(session), lease_s=300) is not None\n"
        "os._exit(9)\n"
    )
    local_node = node_id_for(LOCAL_ACCOUNT, LOCAL_NODE_NAME)
    supervisor = WorkerSupervisor(
        dict(os.environ),
        argv=[sys.executable, "-c", dies_on_the_task],
        on_exit=lambda session: services.nodes.end_session(local_node, session),
    )
    supervisor.start()
    deadline = time.monotonic() + 60
    try:
        while store.get(task_id).status != TaskStatus.FAILURE and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.1)
    finally:
        supervisor.stop()
        services.close()
    record = store.get(task_id)
    assert record is not None and record.status == TaskStatus.FAILURE and record.attempts == 3
    assert "stopped while running it 3 times" in (record.error or "")
