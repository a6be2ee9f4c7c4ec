"""Wake-ups of nodes' waiting claims: one waiting claim per queued task, longest waiting first.

An API replica holds many nodes' claims waiting (long-polls). Waking them all when a task is
queued (NOTIFY ``dan_task_queued``, from any process) makes each ask the database, and all but
one find nothing: at a few hundred nodes that herd of queries fills the claim threads and
connections, and status and heartbeat requests wait seconds behind it. So a queued task wakes
the claim that has waited longest (a fair FIFO line). If that claim cannot take the task (it
lacks the task's files or family) while the task is still pending, the claim passes the wake
to the next one in line, and after ``PASS_LIMIT`` passes to everyone waiting, so no task is
stranded here. A wake that finds nobody waiting (all are asking the database) is kept, a
bounded number of them for ``KEEP_S``, for the next claim to come back in line: one whose look
may have begun before the task was queued. A claim that has just entered asks the database
first anyway, so it gets none; and an older kept wake is dropped, or a burst of notices while
every claim was busy (a flood of submits and cancels) would wake every later claim, one stale
wake after another. A notice without a task id (tasks handed back in bulk) wakes everyone.
The service's periodic fallback look covers notices that never came, or were dropped.

All methods may be called from any thread (the NOTIFY listener's, the event loop's); a waiter
is woken on the event loop it entered from.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace

PASS_LIMIT = 8  # claims that try one wake in turn before it goes to everyone waiting
MAX_KEPT = 1024  # wakes kept for claims not yet back in line
# How long a kept wake waits: claims busy when it came are back within a database query.
KEEP_S = 1.0


@dataclass(frozen=True)
class Wake:
    """Why a waiter was woken: ``task_id`` was queued ("" for unknown tasks); ``tried``: the
    waiters it was handed to so far."""

    task_id: str
    tried: frozenset[Waiter] = frozenset()
    everyone: bool = False  # a wake given to everyone is not passed on


class Waiter:
    """One waiting claim; ``event`` is set (on its loop) when a wake is handed to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()
        self.wake: Wake | None = None


class ClaimWakeups:
    """The line of waiting claims in this process, and the wakes handed along it."""

    def __init__(
        self,
        pass_limit: int = PASS_LIMIT,
        max_kept: int = MAX_KEPT,
        keep_s: float = KEEP_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._line: OrderedDict[Waiter, None] = OrderedDict()  # without a wake, oldest first
        self._kept: deque[tuple[float, Wake]] = deque(maxlen=max_kept)  # (when kept, wake)
        self._pass_limit = pass_limit
        self._keep_s, self._monotonic = keep_s, monotonic

    def __len__(self) -> int:
        return len(self._line)

    def enter(self) -> Waiter:
        """A claim starts waiting (from its event loop): to the back of the line. No kept
        wake is handed to it: it asks the database before it first waits."""
        waiter = Waiter(asyncio.get_running_loop())
        with self._lock:
            self._line[waiter] = None
        return waiter

    def back_in_line(self, waiter: Waiter) -> None:
        """The waiter is done with its wake: back of the line, or a kept wake at once."""
        with self._lock:
            wake = self._unexpired()
            if wake is not None:
                self._hand(waiter, wake)
            else:
                self._line[waiter] = None

    def leave(self, waiter: Waiter) -> None:
        """The claim stops waiting; a wake it was handed and did not use goes on."""
        with self._lock:
            self._line.pop(waiter, None)
            wake, waiter.wake = waiter.wake, None
            if wake is not None and not wake.everyone:
                self._pass(replace(wake, tried=wake.tried - {waiter}))

    def take(self, waiter: Waiter) -> Wake | None:
        """The wake handed to ``waiter`` since it last looked, if any."""
        with self._lock:
            wake, waiter.wake = waiter.wake, None
            waiter.event.clear()
        return wake

    def task_queued(self, task_id: str) -> None:
        """A task was queued: wake the claim that has waited longest (everyone for "")."""
        with self._lock:
            if task_id:
                self._pass(Wake(task_id))
            else:
                self._wake_everyone(Wake("", everyone=True))

    def pass_on(self, wake: Wake) -> None:
        """The woken claim could not take ``wake``'s task, which is still pending: the next
        claim in line that has not tried, or after PASS_LIMIT tries everyone left."""
        if wake.everyone:
            return
        with self._lock:
            if len(wake.tried) < self._pass_limit:
                self._pass(wake)
            else:
                self._wake_everyone(replace(wake, everyone=True))

    def _pass(self, wake: Wake) -> None:
        waiter = next((w for w in self._line if w not in wake.tried), None)
        if waiter is not None:
            self._hand(waiter, replace(wake, tried=wake.tried | {waiter}))
        elif not wake.tried:  # nobody waits now: for the next claim back in line
            self._keep(wake)
        # else everyone waiting here has tried: the task is for claims elsewhere

    def _wake_everyone(self, wake: Wake) -> None:
        waiters = [w for w in self._line if w not in wake.tried]
        if not waiters and not wake.tried:
            self._keep(wake)
        for waiter in waiters:
            self._hand(waiter, wake)

    def _hand(self, waiter: Waiter, wake: Wake) -> None:
        # Under the lock: out of the line until it is done with the wake.
        self._line.pop(waiter, None)
        waiter.wake = wake
        waiter.loop.call_soon_threadsafe(waiter.event.set)

    def _keep(self, wake: Wake) -> None:
        self._kept.append((self._monotonic(), wake))

    def _unexpired(self) -> Wake | None:
        """The oldest kept wake not older than ``keep_s``; older ones are dropped."""
        now = self._monotonic()
        while self._kept:
            kept_at, wake = self._kept.popleft()
            if now - kept_at <= self._keep_s:
                return wake
        return None
