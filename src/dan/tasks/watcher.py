"""TaskWatcher: lets many waiting requests learn that their task finished, with one query.

Every waiting request registers its task id; a single loop reads the status of all of them
per interval and wakes those whose task has finished. :meth:`TaskWatcher.poke` (called on
PostgreSQL's NOTIFY, see dan.db.notify) makes the loop look at once; the polling stays as
the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from dan.tasks.store import TaskStore

log = logging.getLogger(__name__)


class TaskWatcher:
    def __init__(self, store: TaskStore, *, interval_s: float) -> None:
        self._store = store
        self._interval = interval_s
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._wakeup = asyncio.Event()
        self._nudge = asyncio.Event()

    async def wait(self, task_id: str, timeout_s: float) -> bool:
        """True once the task has finished, False if ``timeout_s`` passed first."""
        event = asyncio.Event()
        self._waiters[task_id].add(event)
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters[task_id].discard(event)
            if not self._waiters[task_id]:
                del self._waiters[task_id]

    async def run(self) -> None:
        """Poll until cancelled. Errors are logged and retried; they never end the loop."""
        while True:
            if not self._waiters:
                self._wakeup.clear()
                await self._wakeup.wait()
            self._nudge.clear()
            try:
                await self._check_once()
            except Exception:
                log.exception("task watcher could not read task statuses; retrying")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._nudge.wait()

    def poke(self, task_id: str) -> None:
        """A task finished somewhere: look now if anyone waits for it (loop thread only)."""
        if task_id in self._waiters:
            self._nudge.set()

    async def _check_once(self) -> None:
        ids = list(self._waiters)
        statuses = await asyncio.to_thread(self._store.statuses, ids)
        for task_id in ids:
            status = statuses.get(task_id)
            if status is None or status.finished:
                for event in self._waiters.get(task_id, ()):
                    event.set()


@contextlib.asynccontextmanager
async def running(watcher: TaskWatcher):  # type: ignore[no-untyped-def]
    """Run the watcher's loop for the duration of the block."""
    task = asyncio.create_task(watcher.run(), name="task-watcher")
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
