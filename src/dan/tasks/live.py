"""LiveProgress: the progress and step previews of running tasks, kept in memory.

A node sends a heartbeat with its progress about three times a second; only watchers (status,
events, the A1111 progress route) need it, so it does not cost a database write per beat.
The API replica that receives a heartbeat keeps the task's latest progress and preview here,
and the store writes them only with a lease renewal (dan.tasks.leases, ``lazy``), a few times
per lease. Status answers show the fresher of the row and this memory.

Across replicas (PostgreSQL), progress travels by NOTIFY on ``dan_task_progress``: a replica
publishes what changed at once when it has not published for ``every_s``, and otherwise the
next :meth:`flush` (every ``every_s``) sends it, all tasks in one notification. So a replica
sends at most about two notifications per ``every_s`` however many nodes it serves, and the
others see progress within ``every_s``. Previews (kilobytes) do not travel: another replica
shows the one last written with the lease. SQLite is one process: the memory is enough.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from dan.domain import TaskRecord, TaskStatus

log = logging.getLogger(__name__)

PUBLISH_S = 0.25  # the longest a change waits to be published to the other replicas
MAX_PAYLOAD = 7000  # bytes of one notification (PostgreSQL's limit is 8000)
Publish = Callable[[list[str]], None]  # sends notification payloads, in one transaction


@dataclass(frozen=True)
class Live:
    """What a heartbeat said of one try of a task, and when this process heard it."""

    attempt: int
    progress: float
    preview: bytes | None
    heard_at: float


class LiveProgress:
    """Latest progress and preview of running tasks, by task id (thread-safe).

    An entry older than ``keep_s`` is forgotten: a node that stopped sending says nothing
    any more. An entry counts only for the try it was heard for."""

    def __init__(
        self,
        *,
        keep_s: float,
        publish: Publish | None = None,
        every_s: float = PUBLISH_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keep_s, self._every_s = keep_s, every_s
        self._publish, self._monotonic = publish, monotonic
        self._entries: dict[str, Live] = {}
        self._unsent: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._published = -float("inf")
        self._pruned = monotonic()

    def record(
        self, task_id: str, attempt: int, progress: float | None, preview: bytes | None
    ) -> None:
        """A heartbeat of try ``attempt`` of the task said this (None: it did not say)."""
        now = self._monotonic()
        with self._lock:
            self._remember(task_id, attempt, progress, preview, now)
            if progress is not None and self._publish is not None:
                self._unsent[task_id] = (attempt, progress)
            due = bool(self._unsent) and now - self._published >= self._every_s
        if due:
            self.flush()

    def receive(self, payload: str) -> None:
        """Another replica published progress (called from the NOTIFY listener's thread)."""
        try:
            items = [(str(t), int(a), float(p)) for t, a, p in json.loads(payload)]
        except (ValueError, TypeError):
            log.warning("ignored a malformed progress notification")
            return
        now = self._monotonic()
        with self._lock:
            for task_id, attempt, progress in items:
                self._remember(task_id, attempt, progress, None, now)

    def flush(self) -> None:
        """Publish what changed since the last time (no-op without a publisher); errors are
        logged: the rows still get progress with the next lease renewal."""
        with self._lock:
            batch, self._unsent = self._unsent, {}
            self._published = self._monotonic()
        if not batch or self._publish is None:
            return
        try:
            self._publish(list(_payloads(batch)))
        except Exception:
            log.exception("could not publish the progress of %d tasks", len(batch))

    def forget(self, task_id: str) -> None:
        """The task ended (or left this try): drop what is known of it."""
        with self._lock:
            self._entries.pop(task_id, None)
            self._unsent.pop(task_id, None)

    def latest(self, task_id: str, attempt: int) -> Live | None:
        """What is known of try ``attempt`` of the task, if heard within ``keep_s``."""
        with self._lock:
            entry = self._entries.get(task_id)
        if entry is None or entry.attempt != attempt:
            return None
        return entry if self._monotonic() - entry.heard_at <= self._keep_s else None

    def preview_of(self, task_id: str) -> bytes | None:
        """The latest preview heard of the task (of its latest try heard)."""
        with self._lock:
            entry = self._entries.get(task_id)
        return None if entry is None else entry.preview

    def show(self, record: TaskRecord) -> TaskRecord:
        """``record`` with the fresher progress and preview of its running try, if known."""
        if record.status != TaskStatus.PROCESSING:
            return record
        entry = self.latest(record.id, record.attempts)
        if entry is None:
            return record
        progress = max(record.progress, entry.progress)
        return replace(record, progress=progress, preview=entry.preview or record.preview)

    def _remember(
        self, task_id: str, attempt: int, progress: float | None, preview: bytes | None, now: float
    ) -> None:
        old = self._entries.get(task_id)
        if old is not None and old.attempt == attempt:
            progress = old.progress if progress is None else progress
            preview = preview or old.preview
        self._entries[task_id] = Live(attempt, progress or 0.0, preview, now)
        if now - self._pruned > self._keep_s:
            self._pruned = now
            cutoff = now - self._keep_s
            self._entries = {k: v for k, v in self._entries.items() if v.heard_at >= cutoff}


def _payloads(batch: dict[str, tuple[int, float]]) -> Iterator[str]:
    """``[[task id, attempt, progress], ...]`` as JSON, split to fit in notifications."""
    items: list[list[object]] = []
    size = 2
    for task_id, (attempt, progress) in batch.items():
        item: list[object] = [task_id, attempt, round(progress, 4)]
        length = len(_compact(item)) + 1
        if items and size + length > MAX_PAYLOAD:
            yield _compact(items)
            items, size = [], 2
        items.append(item)
        size += length
    if items:
        yield _compact(items)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
