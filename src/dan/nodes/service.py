"""NodeService: the rules a node's requests follow. A node is a stranger's machine: nothing it
says is trusted further than its own tasks.

A node belongs to the account that registered it and only that account's keys may speak for
it. Each registration opens a session (one running process, holding at most the ``slots``
tasks it declared); the session claims tasks as the worker ``node:<node id>:<session id>``
with an Offer of the node's installed files and loaded checkpoints. While it holds a task
(and only then) it may read that task's input images and upload its results, under
``<task id>/a<try>-<n>.png`` (dan.nodes.protocol.result_key).

A result is accepted only if it is what the task asks for: exactly the expected number of
real PNG images of the task's output size, within a byte cap (a caption for interrogate).
Anything else is refused (ResultRefused) and the task goes back to the queue, counting a try,
with no honor. A result or failure from a node that no longer holds the task (its lease or
time limit ran out, it was cancelled) changes nothing and is answered with TaskNotHeld.

Honor: a node's owner earns ``honor_per_task`` x the task's cost for a task of another account
(none for its own), held in escrow while the node is on probation; online honor follows the
store's rules. The cost is the task's as queued (its images x steps x pixels, dan.tasks.needs),
never anything the node reports, so a node is paid for the work it was given.
The embedded worker's owner, the local account, earns none. A suspect node may not claim.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from dan.config import Settings
from dan.domain import LOCAL_ACCOUNT, Account, ClaimedTask, ModelFamily, TaskResult, TaskStatus
from dan.errors import (
    InvalidArgument,
    NodeNotFound,
    NodeSuspect,
    PermissionDenied,
    ResultRefused,
    SessionEnded,
    TaskNotHeld,
    TooManyNodes,
)
from dan.imaging import check_preview
from dan.models.catalog import Catalog
from dan.nodes.checks import ResultChecks
from dan.nodes.protocol import MAX_ERROR_CHARS, MAX_WAIT_S, parse_result_key, result_key
from dan.nodes.results import result_problem, upload_problem
from dan.nodes.store import (
    NodeFile,
    NodeRecord,
    NodeStore,
    PublicNode,
    Session,
    session_worker_id,
)
from dan.nodes.wakeups import ClaimWakeups, Waiter, Wake
from dan.storage import BlobStore
from dan.tasks.base import Expected, Heartbeat, HeldTask, Offer, Reward, TaskStore
from dan.tasks.live import LiveProgress

MIN_POLL_S = 0.05  # a waiting claim looks at the queue at most this often
# With queue notifications (PostgreSQL's NOTIFY), a waiting claim asks the database when a
# queued task's wake reaches it (dan.nodes.wakeups), and otherwise only this often, in case
# a notice was lost.
NOTIFIED_POLL_S = 5.0
GONE_CHECK_S = 1.0  # how often a waiting claim asks whether its node hung up
Gone = Callable[[], Awaitable[bool]]  # whether the claiming node hung up
T = TypeVar("T")


@dataclass(frozen=True)
class NodeDescription:
    """What a node says of itself when it registers."""

    name: str
    capabilities: dict[str, Any]
    files: tuple[NodeFile, ...] = ()
    loaded: frozenset[str] = frozenset()
    slots: int = 1
    # The model families it runs and has the memory for; None: it does not say (a node from
    # before families), which the server takes as SD 1.x only.
    families: frozenset[ModelFamily] | None = None


@dataclass(frozen=True)
class Assignment:
    """The answer to a claim: a task to run (or None), and catalog models to download first."""

    task: ClaimedTask | None
    pull: tuple[str, ...] = ()


class NodeService:
    """Registration, sessions, claims, leases, inputs and results of nodes; listings, pulls
    and suspects."""

    def __init__(
        self,
        nodes: NodeStore,
        tasks: TaskStore,
        blobs: BlobStore,
        catalog: Catalog,
        settings: Settings,
        checks: ResultChecks,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        live: LiveProgress | None = None,
    ) -> None:
        self._nodes, self._tasks, self._blobs = nodes, tasks, blobs
        # Heartbeats' progress and previews, for watchers: not a database write per beat.
        self._live = live or LiveProgress(keep_s=settings.lease_s)
        self._checks = checks
        self._catalog = catalog
        self._settings = settings
        self._sleep, self._monotonic = sleep, monotonic
        # When each session's sighting was last written by this process (heartbeats come often).
        self._touched: dict[str, float] = {}
        # Claims waiting in this process, by session and by account (each bounded).
        self._waiting: Counter[str] = Counter()
        self._waiting_lock = threading.Lock()
        # While a listener is connected (``notified``), a queued task wakes one waiting claim.
        self._wakeups = ClaimWakeups(monotonic=monotonic)
        self.notified: threading.Event = threading.Event()
        # Claims (and their connections) get threads of their own, so that however many wait,
        # heartbeats, completes, status and submits never queue behind them.
        self._claim_pool = ThreadPoolExecutor(settings.claim_threads, thread_name_prefix="claim")
        self._touch_every_s = min(5.0, settings.node_offline_after_s / 4)

    # -- registration ------------------------------------------------------------------------
    def register(self, account: Account, description: NodeDescription) -> Session:
        """Create or refresh ``account``'s node of that name (the same name keeps its id) and
        open a session for the process that registers."""
        session = self._nodes.register(
            account.id,
            description.name,
            description.capabilities,
            description.files,
            description.loaded,
            slots=description.slots,
            honor_per_interval=self._online_rate(account.id),
            families=description.families,
        )
        self._touched[session.id] = self._monotonic()
        return session

    def offline(self, account: Account, node_id: str, session_id: str) -> int:
        """The process stops: its tasks go back to the queue (each counts a try) and the node
        is listed offline unless another process serves it. Returns how many it held."""
        session = self.session(account, node_id, session_id)
        return self.end_session(session.node_id, session.id)

    def end_session(self, node_id: str, session_id: str) -> int:
        """The process of ``session_id`` stopped or died (its supervisor says so): hand back
        what it held (each counts a try) and end the session. Returns how many it held."""
        released = self._tasks.release_worker(session_worker_id(node_id, session_id))
        self._nodes.end_session(session_id)
        self._touched.pop(session_id, None)
        return released

    def sessions_of(self, node_id: str) -> list[Session]:
        return self._nodes.sessions_of(node_id)

    def expire_sessions(self) -> int:
        """End the sessions of processes not heard from for the offline limit, handing back
        what they held; returns how many tasks went back."""
        released = 0
        for session in self._nodes.expire_sessions():
            released += self._tasks.release_worker(session.worker_id)
            self._touched.pop(session.id, None)
        return released

    # -- work --------------------------------------------------------------------------------
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

    def heartbeat(
        self,
        account: Account,
        node_id: str,
        session_id: str,
        task_id: str,
        progress: float | None,
        preview: bytes | None = None,
    ) -> Heartbeat:
        """Answer whether the session still holds the task and whether it should stop
        (cancelled, or no longer held). Its progress (and step preview, which must be a small
        PNG) goes to watchers through LiveProgress; the lease, with them, is written only once
        half of it has run out, so most beats only read the task's row."""
        session = self.session(account, node_id, session_id)
        if preview is not None:
            check_preview(preview)
        self._touch(session)
        beat = self._tasks.heartbeat(
            task_id,
            session.worker_id,
            lease_s=self._settings.lease_s,
            progress=progress,
            preview=preview or self._live.preview_of(task_id),
            lazy=True,
        )
        if beat.held:
            # Not forgotten when not held: a node may name any task it once held, and its
            # entry ends with the task (complete, fail, refuse) or ages out.
            self._live.record(task_id, beat.attempt, progress, preview)
        return beat

    def read_input(
        self, account: Account, node_id: str, session_id: str, task_id: str, key: str
    ) -> bytes:
        """An input image of a task the session holds (a verification run reads those of the
        task it re-runs, never its results)."""
        _, held = self._check_holds(account, node_id, session_id, task_id)
        owners = {task_id} | ({held.verify_of} if held.verify_of else set())
        group, _, name = key.partition("/")
        if group not in owners or not name or parse_result_key(group, key) is not None:
            raise InvalidArgument(f"key must name an input of task {task_id} ('{task_id}/...')")
        try:
            return self._blobs.get(key)
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"task {task_id} has no input {key!r}") from exc

    def store_result(
        self, account: Account, node_id: str, session_id: str, task_id: str, key: str, data: bytes
    ) -> None:
        """Store a result image of a task the session holds; it must be a real PNG of the
        task's output size within the byte cap, else the task goes back to the queue."""
        session, held = self._check_holds(account, node_id, session_id, task_id)
        problem = upload_problem(held, key, data, max_bytes=self._settings.max_body_bytes)
        if problem is not None:
            self._refuse(session, held, problem)
        self._blobs.put(key, data)

    def complete(
        self,
        account: Account,
        node_id: str,
        session_id: str,
        task_id: str,
        result: TaskResult,
    ) -> None:
        """Record the task's success (its images uploaded first) and reward the node's owner;
        ResultRefused (the task back in the queue) if the result is not what the task asks
        for; TaskNotHeld if the session no longer holds the task."""
        session, held = self._check_holds(account, node_id, session_id, task_id)
        node = self._get(node_id)
        problem = result_problem(held, result, self._blobs)
        if node.suspect:
            problem = f"node {node.name!r} is suspect ({node.suspect_reason})"
        if problem is not None:
            self._refuse(session, held, problem)
        trusted = _trusted(account)
        plan = self._checks.plan(held, node, trusted=trusted)
        own = held.account == session.account
        # A trusted node is never checked: escrow would hold its honor for good.
        reward = Reward(
            session.account,
            0.0 if own else self._task_rate(session.account) * held.cost,
            node_id,
            held=not trusted and node.checks_passed < self._settings.probation_checks,
            work=not own,
        )
        hold_s = self._checks.hold_s(plan)
        if not self._tasks.complete(
            task_id, session.worker_id, result, reward=reward, hold_s=hold_s
        ):
            raise _not_held(task_id)
        self._live.forget(task_id)
        self._checks.start(task_id, session.account, plan)
        if held.verify_of is not None:  # a verification run: settle its check at once
            self._checks.settle(held.verify_of)

    def fail(
        self, account: Account, node_id: str, session_id: str, task_id: str, error: str
    ) -> None:
        """Record that the task failed on the node, with the node's message."""
        session = self.session(account, node_id, session_id)
        message = error.strip()[:MAX_ERROR_CHARS] or "the task failed on the node"
        held = self._tasks.held(task_id)
        if not self._tasks.fail(task_id, session.worker_id, message):
            raise _not_held(task_id)
        self._live.forget(task_id)
        if held is not None and held.verify_of is not None:
            self._checks.settle(held.verify_of)

    # -- listings, pulls and suspects ----------------------------------------------------------
    def list_public(self) -> list[PublicNode]:
        return self._nodes.list_public()

    def list_for(self, account: Account) -> list[NodeRecord]:
        return self._nodes.list_for(account.id)

    def files(self, node_id: str) -> frozenset[str]:
        return self._nodes.files(node_id)

    def request_pull(self, node_id: str, model: str) -> tuple[str, ...]:
        """Ask the node to download the catalog model ``model`` (verified by its sha256);
        returns the node's pending pulls."""
        entry = self._catalog.find(model)
        node = self._get(node_id)
        if any(sha in self._nodes.files(node_id) for sha in entry.hashes):
            raise InvalidArgument(f"node {node.name!r} already has {entry.name} installed")
        pending = self._nodes.request_pull(node_id, entry.name)
        if pending is None:
            raise NodeNotFound(f"no node with id {node_id!r}", nodeId=node_id)
        return pending

    def suspects(self) -> list[NodeRecord]:
        return self._nodes.suspects()

    def clear_suspect(self, node_id: str) -> NodeRecord:
        """An admin clears a suspect node: it may work again, on probation from the start."""
        self._get(node_id)
        node = self._nodes.clear_suspect(node_id)
        if node is None:
            raise NodeNotFound(f"no node with id {node_id!r}", nodeId=node_id)
        return node

    def owned(self, account: Account, node_id: str) -> NodeRecord:
        """The node, which must belong to ``account``."""
        node = self._get(node_id)
        if node.account != account.id:
            raise PermissionDenied(f"node {node_id} belongs to another account")
        return node

    def session(self, account: Account, node_id: str, session_id: str) -> Session:
        """The live session ``session_id`` of ``account``'s node ``node_id``."""
        session = self._nodes.session(session_id)
        if session is None or session.node_id != node_id:
            self.owned(account, node_id)  # a foreign or unknown node says so first
            raise SessionEnded(
                f"session {session_id!r} of node {node_id} is over (the process stopped or was "
                "silent too long); register again (POST /api/node/register)",
                nodeId=node_id,
            )
        if session.account != account.id:
            raise PermissionDenied(f"node {node_id} belongs to another account")
        return session

    # -- helpers -----------------------------------------------------------------------------
    def _get(self, node_id: str) -> NodeRecord:
        node = self._nodes.get(node_id)
        if node is None:
            raise NodeNotFound(
                f"no node with id {node_id!r}; register it again (POST /api/node/register)",
                nodeId=node_id,
            )
        return node

    def _seen_now(self, session: Session, loaded: Iterable[str] | None) -> NodeRecord:
        """Record that the session's node is alive; NodeSuspect if it may not work."""
        node = self._nodes.seen(
            session.node_id,
            session_id=session.id,
            loaded=loaded,
            honor_per_interval=self._online_rate(session.account),
        )
        if node is None:
            raise NodeNotFound(f"no node with id {session.node_id!r}", nodeId=session.node_id)
        self._touched[session.id] = self._monotonic()
        if node.suspect:
            raise NodeSuspect(
                f"node {node.name!r} is suspect ({node.suspect_reason}); an admin must clear it",
                nodeId=node.id,
            )
        return node

    def _touch(self, session: Session) -> None:
        last = self._touched.get(session.id)
        if last is None or self._monotonic() - last >= self._touch_every_s:
            self._touched[session.id] = self._monotonic()
            self._nodes.seen(
                session.node_id,
                session_id=session.id,
                honor_per_interval=self._online_rate(session.account),
            )

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

    def _check_holds(
        self, account: Account, node_id: str, session_id: str, task_id: str
    ) -> tuple[Session, HeldTask]:
        # Asking the queue is renewing the lease: a node fetching or uploading is alive.
        session = self.session(account, node_id, session_id)
        lease_s = self._settings.lease_s
        beat = self._tasks.heartbeat(task_id, session.worker_id, lease_s=lease_s, lazy=True)
        held = self._tasks.held(task_id) if beat.held else None
        if held is None or held.status != TaskStatus.PROCESSING:
            raise _not_held(task_id)
        return session, held

    def _refuse(self, session: Session, held: HeldTask, problem: str) -> NoReturn:
        """Refuse a result: the task goes back to the queue (its try counts), its uploads of
        this try are deleted, and the node hears why."""
        for index in range((held.expects or Expected()).images):
            self._blobs.delete(result_key(held.id, held.attempt, index))
        reason = f"a worker's result was refused: {problem}"
        self._tasks.release(held.id, session.worker_id, reason)
        self._live.forget(held.id)
        raise ResultRefused(f"{problem}; the task went back to the queue", taskId=held.id)

    def _online_rate(self, owner: str) -> float:
        return 0.0 if owner == LOCAL_ACCOUNT else self._settings.honor_per_interval

    def _task_rate(self, owner: str) -> float:
        return 0.0 if owner == LOCAL_ACCOUNT else self._settings.honor_per_task


def _trusted(account: Account) -> bool:
    """Whose nodes' results are never checked: the local worker's, and admins'."""
    return account.id == LOCAL_ACCOUNT or account.is_admin


def _not_held(task_id: str) -> TaskNotHeld:
    return TaskNotHeld(
        f"this node no longer holds task {task_id} (its lease or time limit ran out, it was "
        "cancelled, or it finished elsewhere); this result was not recorded",
        taskId=task_id,
    )
