"""What an idle local worker costs, and how long a submitted task waits for its claim.

Runs the worker loop in a thread on a temporary SQLite queue (FakeEngine, no torch), first as
before (looking at the queue every ``poll_interval_s``, 0.02 s), then woken as ``dan serve``
wakes its worker (an Event set when a task is queued; a fallback look every
``worker_idle_poll_s``, 2 s). Prints the process's CPU seconds per wall second while idle and
the median and worst submit-to-claim latency of a few submits.

    PYTHONPATH=src python bench/idle_worker.py [--idle-s 10] [--submits 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dan.config import Settings
from dan.db import create_db_engine, migrate
from dan.domain import TaskStatus
from dan.engine.fake import FakeEngine
from dan.models.registry import ModelRegistry
from dan.storage import InMemoryBlobStore
from dan.tasks.store import SqlTaskStore
from dan.workers.loop import Worker
from tests.api.conftest import install_dummy_checkpoint
from tests.unit.test_worker import submit


def measure(root: Path, idle_sleep_s: float, woken: bool, idle_s: float, submits: int) -> None:
    url = f"sqlite:///{root / 'queue.sqlite3'}"
    migrate(url)
    install_dummy_checkpoint(root / "models")
    registry = ModelRegistry(root / "models", root / "cache", allow_ckpt=False)
    registry.scan()
    store = SqlTaskStore(create_db_engine(url))
    worker = Worker(
        store,
        FakeEngine(),
        registry,
        InMemoryBlobStore(),
        worker_id="w",
        lease_s=30,
        idle_sleep_s=idle_sleep_s,
    )
    stop, wake = threading.Event(), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop, wake if woken else None))
    thread.start()
    time.sleep(1.0)  # settled: imports, first look
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(idle_s)
    cpu_per_s = (time.process_time() - cpu) / (time.monotonic() - wall)
    latencies = [claim_latency(store, registry, wake if woken else None) for _ in range(submits)]
    stop.set()
    wake.set()
    thread.join()
    how = "woken, fallback" if woken else "polling every"
    print(
        f"{how} {idle_sleep_s:5.2f} s: idle CPU {cpu_per_s * 100:5.2f} % of a core; "
        f"submit to claim median {statistics.median(latencies) * 1000:6.1f} ms, "
        f"worst {max(latencies) * 1000:6.1f} ms"
    )


def claim_latency(
    store: SqlTaskStore, registry: ModelRegistry, wake: threading.Event | None
) -> float:
    time.sleep(0.3)  # idle again, at a random point of its wait
    started = time.monotonic()
    task_id = submit(store, registry, "ok")
    if wake is not None:
        wake.set()  # what TaskService's on_queued does through the supervisor
    while (record := store.get(task_id)) is None or record.status == TaskStatus.PENDING:
        time.sleep(0.001)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--submits", type=int, default=10)
    args = parser.parse_args()
    defaults = Settings.model_fields
    before = defaults["poll_interval_s"].default
    after = defaults["worker_idle_poll_s"].default
    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp) / "before", before, False, args.idle_s, args.submits)
        measure(Path(tmp) / "after", after, True, args.idle_s, args.submits)


if __name__ == "__main__":
    main()
