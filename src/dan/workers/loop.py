"""The worker loop: claim a task, hold its lease, run it on the engine, store the result.

A task that fails inside the engine fails alone, with a message; the loop goes on. Only a
FatalEngineError (the device is unusable) ends the loop, so a supervisor can restart the
process; the task it was running goes back to the queue when its lease expires.

The loop needs four things of its queue (``WorkQueue``): the same loop serves a TaskStore
directly (``dan worker`` and the tests), the embedded worker through an adapter that offers
what it has installed and loaded (dan.workers.local), and a remote node through the HTTP
client of dan.workers.remote.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from dan.domain import ClaimedTask, TaskResult
from dan.engine.base import Engine
from dan.errors import DanError, FatalEngineError, TaskCancelled
from dan.tasks.orders import ModelLookup
from dan.tasks.store import CANCELLED_MESSAGE, Heartbeat
from dan.workers.runner import TaskFiles, TaskRunner

log = logging.getLogger(__name__)


class WorkQueue(Protocol):
    """What the worker loop needs of a queue: the worker side of dan.tasks.store.TaskStore,
    which satisfies it as it is. Methods may block; they are called from the loop's thread
    and (heartbeat) from the lease's renewal thread."""

    def claim(self, worker_id: str, *, lease_s: float) -> ClaimedTask | None:
        """The next task this worker may run, its lease taken; None if there is none."""
        ...

    def heartbeat(
        self, task_id: str, worker_id: str, *, lease_s: float, progress: float | None = None
    ) -> Heartbeat:
        """Renew the lease and record progress; whether it is still held, and whether to stop."""
        ...

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        """Record success; False if the worker no longer holds the task (nothing changes)."""
        ...

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        """Record failure; False if the worker no longer holds the task (nothing changes)."""
        ...


class Lease:
    """Keeps a claimed task's lease alive from a background thread while the task runs, and
    carries per-step progress; ``report`` raises TaskCancelled when the task should stop."""

    def __init__(self, store: WorkQueue, task_id: str, worker_id: str, lease_s: float) -> None:
        self._store, self._task_id, self._worker_id = store, task_id, worker_id
        self._lease_s = lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, name=f"lease-{task_id[:8]}", daemon=True
        )
        self.lost = False

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, step: int, total: int) -> None:
        """Record progress after a denoising step; raise TaskCancelled if asked to stop."""
        beat = self._store.heartbeat(
            self._task_id, self._worker_id, lease_s=self._lease_s, progress=step / max(total, 1)
        )
        self.lost = not beat.held
        if beat.cancel_requested:
            raise TaskCancelled("the task was cancelled" if beat.held else "the lease was lost")

    def _renew(self) -> None:
        # Covers the phases without steps (loading a checkpoint, encoding images).
        while not self._stop.wait(self._lease_s / 3):
            try:
                self.lost = not self._store.heartbeat(
                    self._task_id, self._worker_id, lease_s=self._lease_s
                ).held
            except Exception:
                log.exception("could not renew the lease of %s", self._task_id)


class Worker:
    def __init__(
        self,
        store: WorkQueue,
        engine: Engine,
        models: ModelLookup,
        blobs: TaskFiles,
        *,
        worker_id: str,
        lease_s: float,
        idle_sleep_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._runner = TaskRunner(engine, models, blobs)
        self.worker_id = worker_id
        self._lease_s = lease_s
        self._idle_sleep_s = idle_sleep_s
        self._clock = clock

    def run(self, stop: threading.Event) -> None:
        """Serve tasks until ``stop`` is set. Raises FatalEngineError when the engine is dead."""
        log.info("worker %s ready", self.worker_id)
        while not stop.is_set():
            try:
                worked = self.run_once()
            except FatalEngineError:
                raise
            except Exception:
                log.exception("worker %s: queue error; retrying", self.worker_id)
                worked = False
            if not worked:
                stop.wait(self._idle_sleep_s)

    def run_once(self) -> bool:
        """Run the next task if there is one; True if a task was run."""
        task = self._store.claim(self.worker_id, lease_s=self._lease_s)
        if task is None:
            return False
        self._execute(task)
        return True

    def _execute(self, task: ClaimedTask) -> None:
        started = self._clock()
        try:
            with Lease(self._store, task.id, self.worker_id, self._lease_s) as lease:
                result = self._runner.run(task, lease.report)
        except TaskCancelled:
            self._store.fail(task.id, self.worker_id, CANCELLED_MESSAGE)
            log.info("task %s cancelled", task.id)
            return
        except FatalEngineError as exc:
            log.critical("engine failure on task %s: %s", task.id, exc.message)
            raise
        except DanError as exc:
            self._store.fail(task.id, self.worker_id, exc.message)
            log.warning("task %s failed: %s", task.id, exc.message)
            return
        except Exception as exc:
            log.exception("task %s crashed", task.id)
            self._store.fail(task.id, self.worker_id, f"internal error in the worker: {exc}")
            return
        if not self._store.complete(task.id, self.worker_id, result):
            log.warning("task %s finished after its lease was lost; result dropped", task.id)
        else:
            log.info("task %s done in %.2f s", task.id, self._clock() - started)
