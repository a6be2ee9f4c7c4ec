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

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol

from dan.domain import ClaimedTask, ProgressCallback, TaskResult
from dan.engine.base import Engine
from dan.errors import DanError, FatalEngineError, TaskAbandoned, TaskCancelled
from dan.tasks.order_models import ModelLookup
from dan.tasks.store import CANCELLED_MESSAGE
from dan.workers.lease import BEAT_S, PREVIEW_S, Beats, Lease
from dan.workers.runner import TaskFiles, TaskRunner

log = logging.getLogger(__name__)
REPORT_TRIES_S = 30.0  # how long a finished task's outcome is retried against a failing queue


class WorkQueue(Beats, Protocol):
    """What the worker loop needs of a queue: the worker side of dan.tasks.store.TaskStore,
    which satisfies it as it is. Methods may block; they are called from the loop's thread
    and (heartbeat, see Beats) from the lease's renewal thread."""

    def claim(
        self, worker_id: str, *, lease_s: float, like: str | None = None
    ) -> ClaimedTask | None:
        """The next task this worker may run, its lease taken; None if there is none. With
        ``like`` (a batch key), that task only if its batch key is ``like`` (see
        TaskStore.claim); a queue that does not batch returns None."""
        ...

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        """Record success; False if the worker no longer holds the task (nothing changes)."""
        ...

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        """Record failure; False if the worker no longer holds the task (nothing changes)."""
        ...


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
        beat_s: float = BEAT_S,
        preview_s: float = PREVIEW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._runner = TaskRunner(engine, models, blobs)
        self.worker_id = worker_id
        self._lease_s = lease_s
        self._idle_sleep_s = idle_sleep_s
        self._beat_s = beat_s
        self._preview_s = preview_s
        self._clock = clock
        self._stop = self._abandon = threading.Event()

    def run(
        self,
        stop: threading.Event,
        wake: threading.Event | None = None,
        abandon: threading.Event | None = None,
    ) -> None:
        """Serve tasks until ``stop`` is set (the task in hand is finished first) or
        ``abandon`` is (it is not: it stops at its next step, unreported, for whoever stops
        the worker to hand back, or for its lease to run out). Raises FatalEngineError when
        the engine is dead.

        Idle, the loop looks at the queue again after ``idle_sleep_s``, or as soon as ``wake``
        is set: by whatever learns that a task may be claimable (a NOTIFY, a byte from the
        supervising server), and by whoever sets ``stop`` or ``abandon``. Without ``wake`` it
        waits on ``stop``, so ``idle_sleep_s`` must then be short."""
        log.info("worker %s ready", self.worker_id)
        self._stop, self._abandon = stop, abandon or threading.Event()
        bell = wake or stop
        while not stop.is_set() and not self._abandon.is_set():
            if wake is not None:
                wake.clear()  # before the claim: a task queued during it rings again
            try:
                worked = self.run_once()
            except FatalEngineError:
                raise
            except Exception:
                log.exception("worker %s: queue error; retrying", self.worker_id)
                worked = False
            if not worked:
                bell.wait(self._idle_sleep_s)

    def run_once(self) -> bool:
        """Run the next task if there is one (with the tasks that may share its batch); True
        if a task was run."""
        task = self._store.claim(self.worker_id, lease_s=self._lease_s)
        if task is None:
            return False
        batch = self._with_more_like(task)
        if len(batch) == 1:
            self._execute(task)
        else:
            self._execute_batch(batch)
        return True

    def _with_more_like(self, task: ClaimedTask) -> list[ClaimedTask]:
        """``task`` and the tasks claimed to share its UNet batch, up to the runner's limit:
        each the task this worker would claim next anyway (TaskStore.claim ``like``), so a
        batch never lets a task jump ahead of another account's earlier one."""
        batch = [task]
        if task.batch_key is None:
            return batch
        try:
            limit = self._runner.batch_limit(task)
            while len(batch) < limit:
                more = self._store.claim(self.worker_id, lease_s=self._lease_s, like=task.batch_key)
                if more is None:
                    break
                batch.append(more)
        except Exception:  # the tasks held so far still run; the run reports a bad task
            log.exception("worker %s: could not gather a batch", self.worker_id)
        return batch

    def _lease(self, task: ClaimedTask) -> Lease:
        return Lease(
            self._store,
            task.id,
            self.worker_id,
            self._lease_s,
            beat_s=self._beat_s,
            preview_s=self._preview_s,
            abandon=self._abandon,
        )

    def _execute(self, task: ClaimedTask) -> None:
        started = self._clock()
        lease = self._lease(task)
        try:
            with lease:
                result = self._runner.run(task, lease.report, lease.preview)
        except TaskAbandoned:
            log.warning("task %s abandoned: the worker stops", task.id)
            return
        except TaskCancelled:
            self._cancel(task)
            return
        except FatalEngineError as exc:
            log.critical("engine failure on task %s: %s", task.id, exc.message)
            raise
        except Exception as exc:
            self._fail(task, exc)
            return
        self._finish(task, lease, result, started)

    def _execute_batch(self, batch: list[ClaimedTask]) -> None:
        """Run ``batch`` as one: a lease per task, progress and cancel per task (a cancelled
        one leaves at once, the others go on; it is failed as cancelled, once, by a thread of
        the batch's, so a queue slow to take that report holds up no step of the others),
        each completed with its own result. When the batch fails, each task still held runs
        again alone, so one task's error (or a batch too big for the memory) fails only the
        tasks it fails alone. Returns once every report of the batch is made."""
        with ThreadPoolExecutor(1, thread_name_prefix="batch-leaving") as leaving:
            self._run_batch(batch, leaving)

    def _run_batch(self, batch: list[ClaimedTask], leaving: Executor) -> None:
        started = self._clock()
        leases = [self._lease(task) for task in batch]
        left: set[str] = set()
        log.info("running %d tasks as one batch: %s", len(batch), [t.id for t in batch])
        try:
            with contextlib.ExitStack() as held:
                for lease in leases:
                    held.enter_context(lease)
                progress = [
                    self._leaving(t, lease, left, leaving)
                    for t, lease in zip(batch, leases, strict=True)
                ]
                previews = [lease.preview for lease in leases]
                results = self._runner.run_batch(batch, progress, previews)
        except TaskCancelled:
            return  # each task was failed as cancelled when it left, or abandoned
        except FatalEngineError as exc:
            log.critical("engine failure on a batch of %d tasks: %s", len(batch), exc.message)
            raise
        except Exception as exc:
            log.warning("a batch of %d tasks failed (%r); they run one by one", len(batch), exc)
            for task, lease in zip(batch, leases, strict=True):
                if task.id not in left and not lease.lost and not self._abandon.is_set():
                    self._execute(task)
            return
        for task, lease, result in zip(batch, leases, results, strict=True):
            if result is not None:
                self._finish(task, lease, result, started)

    def _leaving(
        self, task: ClaimedTask, lease: Lease, left: set[str], leaving: Executor
    ) -> ProgressCallback:
        """``lease.report``, which also adds the task to ``left`` the moment it leaves its
        batch (cancelled, or its lease lost) and hands its report to ``leaving``: it is failed
        as cancelled then, not when the batch ends, and only once however often it is asked.
        An abandoned task leaves unreported."""

        def progress(done: int, total: int) -> None:
            try:
                lease.report(done, total)
            except TaskCancelled as exc:
                if task.id not in left:
                    left.add(task.id)
                    if not isinstance(exc, TaskAbandoned):
                        leaving.submit(self._cancel, task)
                raise

        return progress

    def _cancel(self, task: ClaimedTask) -> None:
        self._report(
            task, "fail", lambda: self._store.fail(task.id, self.worker_id, CANCELLED_MESSAGE)
        )
        log.info("task %s cancelled", task.id)

    def _fail(self, task: ClaimedTask, exc: Exception) -> None:
        """Fail ``task`` with the message of ``exc`` (a DanError's own; anything else, a
        MemoryError included, is a crash in the worker); the worker goes on."""
        if isinstance(exc, DanError):
            message = exc.message
            log.warning("task %s failed: %s", task.id, message)
        else:
            log.error("task %s crashed", task.id, exc_info=exc)
            message = f"internal error in the worker: {exc!r}"
        send = functools.partial(self._store.fail, task.id, self.worker_id, message)
        self._report(task, "fail", send)

    def _finish(self, task: ClaimedTask, lease: Lease, result: TaskResult, started: float) -> None:
        """Complete ``task`` with ``result`` unless its lease was lost (the result is dropped)."""
        if lease.lost:
            log.warning("task %s finished after its lease was lost; result dropped", task.id)
        elif self._report(
            task, "complete", lambda: self._store.complete(task.id, self.worker_id, result)
        ):
            log.info("task %s done in %.2f s", task.id, self._clock() - started)
        else:
            log.warning("task %s finished after its lease was lost; result dropped", task.id)

    def _report(self, task: ClaimedTask, what: str, send: Callable[[], bool]) -> bool:
        """Send a task's outcome; a failing queue (a database restart, a network hiccup) is
        tried again with backoff for up to REPORT_TRIES_S, or until the worker stops."""
        delay, deadline = 0.1, self._clock() + REPORT_TRIES_S
        while True:
            try:
                return send()
            except Exception as exc:
                stopping = self._stop.is_set() or self._abandon.is_set()
                if self._clock() + delay > deadline or stopping:
                    log.error("could not %s task %s: %s; it will run again", what, task.id, exc)
                    return False
                log.warning("could not %s task %s (%s); trying again", what, task.id, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
