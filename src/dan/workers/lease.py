"""A claimed task's lease, held from a thread of its own while the task runs (see Lease)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from PIL.Image import Image

from dan.errors import TaskAbandoned, TaskCancelled
from dan.imaging import encode_preview
from dan.tasks.store import Heartbeat

log = logging.getLogger(__name__)
BEAT_S = 0.3  # how often a running task's progress is sent (and its cancel flag read)
PREVIEW_S = 1.0  # how often a step preview is drawn and sent


class Beats(Protocol):
    """What a lease needs of a queue (the loop's WorkQueue has it). May block: it is called
    from the lease's beat thread only."""

    def heartbeat(
        self,
        task_id: str,
        worker_id: str,
        *,
        lease_s: float,
        progress: float | None = None,
        preview: bytes | None = None,
    ) -> Heartbeat:
        """Renew the lease and record progress (and a step preview, a small PNG); whether it
        is still held, and whether to stop."""
        ...


class Lease:
    """Holds a claimed task's lease from a beat thread while the task runs.

    The beat thread sends the latest progress every ``beat_s`` and keeps the queue's last
    answer; the engine's step callback (:meth:`report`) only writes progress to memory and
    reads that answer, so no step waits for the database or the network. A heartbeat that
    fails (a database hiccup, a cut network) is tried again at the next beat; only when none
    has got through for a whole lease is the task taken as lost. ``report`` raises
    TaskCancelled at the first step after the answer says stop (cancelled, or no longer held),
    and TaskAbandoned at the first step after ``abandon`` is set (the worker stops at once).
    :meth:`preview` draws a step preview at most every ``preview_s``; the next beat sends it.
    """

    def __init__(
        self,
        queue: Beats,
        task_id: str,
        worker_id: str,
        lease_s: float,
        *,
        beat_s: float = BEAT_S,
        preview_s: float = PREVIEW_S,
        clock: Callable[[], float] = time.monotonic,
        abandon: threading.Event | None = None,
    ) -> None:
        self._queue, self._task_id, self._worker_id = queue, task_id, worker_id
        self._abandon = abandon or threading.Event()
        self._lease_s = lease_s
        self._beat_s = min(beat_s, lease_s / 3)
        self._preview_s = preview_s
        self._clock = clock
        self._lock = threading.Lock()
        self._progress: float | None = None
        self._preview: bytes | None = None  # drawn, not sent yet
        self._previewed = -float("inf")
        self._answer = Heartbeat(held=True, cancel_requested=False)
        self._last_answer = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat_forever, name=f"lease-{task_id[:8]}", daemon=True
        )

    @property
    def lost(self) -> bool:
        """Whether the worker no longer holds the task (its result would be refused)."""
        with self._lock:
            return not self._answer.held

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, step: int, total: int) -> None:
        """Record progress after a denoising step; raise TaskCancelled if asked to stop,
        TaskAbandoned if the worker stops."""
        with self._lock:
            self._progress = step / max(total, 1)
            answer = self._answer
        if answer.cancel_requested or not answer.held:
            raise TaskCancelled("the task was cancelled" if answer.held else "the lease was lost")
        if self._abandon.is_set():
            raise TaskAbandoned()

    def preview(self, draw: Callable[[], Image]) -> None:
        """The engine offers a step preview: draw and keep it if the last is ``preview_s``
        old (a drawing that fails costs the preview, never the task)."""
        now = self._clock()
        if now - self._previewed < self._preview_s:
            return
        self._previewed = now
        try:
            data = encode_preview(draw())
        except Exception:
            log.exception("could not draw a preview of %s", self._task_id)
            return
        with self._lock:
            self._preview = data

    def _beat_forever(self) -> None:
        while not self._stop.wait(self._beat_s):
            self.beat()

    def beat(self) -> None:
        """Send one heartbeat with the latest progress and keep the answer."""
        with self._lock:
            progress, preview, self._preview = self._progress, self._preview, None
        try:
            answer = self._queue.heartbeat(
                self._task_id,
                self._worker_id,
                lease_s=self._lease_s,
                progress=progress,
                preview=preview,
            )
        except Exception as exc:
            silent_s = self._clock() - self._last_answer
            log.warning("heartbeat of %s failed (%s); trying again", self._task_id, exc)
            if silent_s < self._lease_s:
                return
            log.error(
                "no heartbeat of %s got through for %.0f s: the lease is lost",
                self._task_id,
                silent_s,
            )
            answer = Heartbeat(held=False, cancel_requested=True)
        with self._lock:
            self._answer = answer
            self._last_answer = self._clock()
