"""The real `dan serve` and its worker child on SQLite: a submit wakes the idle worker through
its stdin at once (not at its fallback look), and a server stopped by SIGTERM stops its worker
cleanly and exits 0."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.api.test_server_e2e import install_tiny_checkpoint, txt2img
from tests.fixtures.server import start_server, wait_for_status

pytestmark = pytest.mark.slow

FALLBACK_S = 10.0


def test_a_submit_wakes_the_worker_and_stop_ends_it_cleanly(tmp_path: Path) -> None:
    install_tiny_checkpoint(tmp_path / "models")
    server = start_server(tmp_path, DAN_WORKER_IDLE_POLL_S=str(FALLBACK_S))
    try:
        deadline = time.monotonic() + 60
        while " ready" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # past its first look at the empty queue: idle
        started = time.monotonic()
        task_id = server.post("/api/sd/txt2img/async", txt2img()).json()["data"]["taskId"]
        wait_for_status(server, task_id, {1, 2, 3}, timeout_s=FALLBACK_S / 2)
        assert time.monotonic() - started < FALLBACK_S / 2
    finally:
        server.stop(signal.SIGTERM)  # what systemd and Docker send
    log = server.log()
    assert server.process.returncode == 0, log
    assert "the local worker exited with code 0" in log, log
    assert "Fatal Python error" not in log, log
    assert "handed back 0 task(s)" in log, log
