"""Runs: what a session may do with a task it holds, and how the run ends.

While a session holds a task (and only then) it may report progress, read that task's input
images and upload its results, under ``<task id>/a<try>-<n>.png``
(dan.nodes.protocol.result_key); each of these renews its lease.

A result is accepted only if it is what the task asks for: exactly the expected number of
real PNG images of the task's output size, within a byte cap (a caption for interrogate; the
rules are dan.nodes.results'). Anything else is refused (ResultRefused) and the task goes back
to the queue, counting a try, with no honor. A result or failure from a node that no longer
holds the task (its lease or time limit ran out, it was cancelled) changes nothing and is
answered with TaskNotHeld.

Honor: a node's owner earns ``honor_per_task`` x the task's cost for a task of another account
(none for its own), held in escrow while the node is on probation. The cost is the task's as
queued (its images x steps x pixels, dan.tasks.needs), never anything the node reports, so a
node is paid for the work it was given. The embedded worker's owner, the local account, earns
none, and a suspect node's results are refused.
"""

from __future__ import annotations

from typing import NoReturn

from dan.domain import LOCAL_ACCOUNT, Account, TaskResult, TaskStatus
from dan.errors import InvalidArgument, ResultRefused, TaskNotHeld
from dan.imaging import check_preview
from dan.nodes.protocol import MAX_ERROR_CHARS, parse_result_key, result_key
from dan.nodes.results import result_problem, upload_problem
from dan.nodes.sessions import NodeSessions
from dan.nodes.store import Session
from dan.nodes.trust import trusted
from dan.tasks.base import Expected, Heartbeat, HeldTask, Reward


class NodeRuns(NodeSessions):
    """NodeService's runs of held tasks (see the module docstring)."""

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

    def _task_rate(self, owner: str) -> float:
        return 0.0 if owner == LOCAL_ACCOUNT else self._settings.honor_per_task


def _trusted(account: Account) -> bool:
    return trusted(account.id, account.is_admin)


def _not_held(task_id: str) -> TaskNotHeld:
    return TaskNotHeld(
        f"this node no longer holds task {task_id} (its lease or time limit ran out, it was "
        "cancelled, or it finished elsewhere); this result was not recorded",
        taskId=task_id,
    )
