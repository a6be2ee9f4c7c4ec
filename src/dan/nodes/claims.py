"""Claims: how a node's session waits for a task it can run (a long poll).

A session claims tasks as the worker ``node:<node id>:<session id>`` with an Offer of the
node's installed files and loaded checkpoints; catalog models an admin asked it to pull come
first, without a task. A suspect node may not claim. A session waits in one claim at a time,
an account in at most ``max_nodes_per_account``, counted in this process before anything is
written. A waiting claim asks the database at once, then when a queued task's wake reaches it
(dan.nodes.wakeups) or, without queue notifications, every poll interval, and stops early when
its node hangs up. Claims run on threads of their own, so that however many wait, heartbeats,
completes, status and submits never queue behind them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from dan.domain import Account, ClaimedTask, TaskStatus
from dan.errors import TooManyNodes
from dan.nodes.protocol import MAX_WAIT_S
from dan.nodes.sessions import NodeSessions
from dan.nodes.store import Session
from dan.nodes.wakeups import Waiter, Wake
from dan.tasks.base import Offer

MIN_POLL_S = 0.05  # a waiting claim looks at the queue at most this often
# With queue notifications (PostgreSQL's NOTIFY), a waiting claim asks the database when a
# queued task's wake reaches it (dan.nodes.wakeups), and otherwise only this often, in case
# a notice was lost.
NOTIFIED_POLL_S = 5.0
GONE_CHECK_S = 1.0  # how often a waiting claim asks whether its node hung up
Gone = Callable[[], Awaitable[bool]]  # whether the claiming node hung up
T = TypeVar("T")


@dataclass(frozen=True)
class Assignment:
    """The answer to a claim: a task to run (or None), and catalog models to download first."""

    task: ClaimedTask | None
    pull: tuple[str, ...] = ()


class NodeClaims(NodeSessions):
    """NodeService's claims (see the module docstring)."""

    async def claim(
        self,
        account: Account,
        node_id: str,
        session_id: str,
        *,
        loaded: Iterable[str] | None,
        wait_s: float,
        gone: Gone | None = None,
    ) -> Assignment:
        """The next task this session can run, waiting up to ``wait_s`` (at most MAX_WAIT_S)
        for one; catalog models an admin asked it to pull come first, without a task. Stops
        waiting early when ``gone`` says the node hung up. A session waits in one claim at a
        time, an account in at most ``max_nodes_per_account``: a claim past those is refused
        (TooManyNodes) before it writes anything, so a flood of claims neither keeps a node
        online nor earns it honor, nor changes what it says it has loaded."""
        session = await self._in_claim_pool(self.session, account, node_id, session_id)
        with self._waiting_for(session):
            node = await self._in_claim_pool(self._seen_now, session, loaded)
            if node.pull:
                return Assignment(None, await self._in_claim_pool(self._nodes.take_pulls, node_id))
            offer = Offer(
                node.id, node.account, node.loaded, self._settings.affinity_lookahead, session.slots
            )
            return await self._wait_for_task(
                session, offer, min(max(wait_s, 0.0), MAX_WAIT_S), gone
            )

    async def _wait_for_task(
        self, session: Session, offer: Offer, wait_s: float, gone: Gone | None
    ) -> Assignment:
        """Ask the database at once, then when a queued task's wake reaches this claim (or,
        without notifications, every poll interval), and now and then as a fallback."""
        now = self._monotonic()
        deadline, next_gone_check = now + wait_s, now + GONE_CHECK_S
        interval = max(self._settings.poll_interval_s, MIN_POLL_S)
        waiter = self._wakeups.enter()
        try:
            wake, next_query = None, now
            while True:
                if wake is not None or now >= next_query:
                    # Without notifications this is every interval (0: at each nap's end).
                    next_query = now + (NOTIFIED_POLL_S if self.notified.is_set() else 0.0)
                    task = await self._in_claim_pool(self._claim_once, session, offer)
                    if wake is not None:
                        await self._settle(waiter, wake, task)
                    if task is not None:
                        return Assignment(task)
                if now >= deadline:
                    return Assignment(None)
                nap = min(max(next_query - now, interval), deadline - now, next_gone_check - now)
                await self._nap(waiter, nap)
                now = self._monotonic()
                if now >= next_gone_check:
                    next_gone_check = now + GONE_CHECK_S
                    if gone is not None and await gone():  # its wake goes on as it leaves
                        return Assignment(None)
                wake = self._wakeups.take(waiter)
        finally:
            self._wakeups.leave(waiter)

    async def _nap(self, waiter: Waiter, seconds: float) -> None:
        """Sleep ``seconds`` or until a wake is handed to ``waiter``."""
        sleeping = asyncio.ensure_future(self._sleep(max(seconds, 0.0)))
        woken = asyncio.ensure_future(waiter.event.wait())
        try:
            await asyncio.wait((sleeping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()

    async def _settle(self, waiter: Waiter, wake: Wake, task: ClaimedTask | None) -> None:
        """After a woken claim asked: if it did not take the task that woke it and that task
        is still pending, the wake goes on to the next claim; then back in line."""
        if not wake.everyone and (task is None or task.id != wake.task_id):
            statuses = await self._in_claim_pool(self._tasks.statuses, [wake.task_id])
            if statuses.get(wake.task_id) == TaskStatus.PENDING:
                self._wakeups.pass_on(wake)
        if task is None:
            self._wakeups.back_in_line(waiter)

    def task_queued(self, task_id: str = "") -> None:
        """Some process queued ``task_id`` ("": some tasks were handed back): wake one waiting
        claim, or all for "" (called from the NOTIFY listener's thread)."""
        self._wakeups.task_queued(task_id)

    async def _in_claim_pool(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._claim_pool, function, *args)

    def close(self) -> None:
        """Stop the claim threads (claims still running finish first)."""
        self._claim_pool.shutdown(wait=False)

    @contextmanager
    def _waiting_for(self, session: Session) -> Iterator[None]:
        limit = self._settings.max_nodes_per_account
        with self._waiting_lock:
            if self._waiting[session.id]:
                raise TooManyNodes("this node process already waits for a task in another claim")
            if self._waiting[session.account] >= limit:
                raise TooManyNodes(
                    f"this account's nodes already wait in {limit} claims on this server"
                )
            self._waiting[session.id] += 1
            self._waiting[session.account] += 1
        try:
            yield
        finally:
            with self._waiting_lock:
                for key in (session.id, session.account):
                    self._waiting[key] -= 1
                    if self._waiting[key] <= 0:
                        del self._waiting[key]

    def _claim_once(self, session: Session, offer: Offer) -> ClaimedTask | None:
        return self._tasks.claim(session.worker_id, lease_s=self._settings.lease_s, offer=offer)
