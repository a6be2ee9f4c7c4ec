"""The local worker process is restarted when it dies, and stopped with the server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dan.workers.supervisor import WorkerSupervisor


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
