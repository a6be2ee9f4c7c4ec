"""ResultChecks: nodes' results are re-run by someone else and compared.

A node can return a plausible picture that is not the one asked for (another seed's, a cached
one) and be paid for it. So a share of results is checked: the task is run again, with the same
seed and parameters, by a node of another account (or the trusted local worker), and the two
pictures are compared with :func:`dan.imaging.picture_distance`, which tolerates the fine
differences of other GPUs, dtypes and thread counts but not another picture (the threshold,
``verify_threshold``, is calibrated by bench/verify_calibration.py).

- A node on probation (fewer than ``probation_checks`` checks passed) has every result checked
  before it is shown: the task stays running until the check settles (at most
  ``verify_timeout_s``), and its owner's honor waits in escrow.
- After that, a ``verify_share`` of its results is checked after they are shown.
- When the runs agree, the check passes. When they disagree and the verifier is trusted (the
  local worker, or a node of an admin), the checked node fails; otherwise a tie-break run, on a
  node of a third account, decides which of the two was wrong. The node whose result was wrong
  becomes suspect: its escrowed honor is dropped, it may claim nothing until an admin clears
  it, and the task gets the right picture.
- A check that cannot be made (no other account's node has the files, or its run failed)
  leaves the result unchecked, and the node on probation.

Interrogate results (text) are not checked. The state lives in dan.tasks.checks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from dan.config import Settings
from dan.domain import TaskKind, TaskResult, TaskStatus
from dan.imaging import picture_distance
from dan.nodes.store import NodeRecord, NodeStore
from dan.nodes.trust import trusted
from dan.storage import BlobStore
from dan.tasks.base import HeldTask
from dan.tasks.checks import OPEN_STATES, RUN, CheckState, Outcome, SqlCheckStore

log = logging.getLogger(__name__)
CHECKED_KINDS = frozenset({TaskKind.TXT2IMG, TaskKind.IMG2IMG, TaskKind.UPSCALE, TaskKind.DETECT})


@dataclass(frozen=True)
class Plan:
    """Whether a result is checked, and whether it is held until then."""

    check: bool = False
    hold: bool = False


class ResultChecks:
    def __init__(
        self,
        checks: SqlCheckStore,
        nodes: NodeStore,
        blobs: BlobStore,
        settings: Settings,
        *,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._checks, self._nodes, self._blobs = checks, nodes, blobs
        self._settings = settings
        self._draw = draw

    # -- when a node delivers ----------------------------------------------------------------
    def plan(self, task: HeldTask, node: NodeRecord, *, trusted: bool) -> Plan:
        """Whether ``node``'s result for ``task`` is checked (and held until then)."""
        if trusted or task.verify_of is not None or task.kind not in CHECKED_KINDS:
            return Plan()
        probation = node.checks_passed < self._settings.probation_checks
        if not probation and self._draw() >= self._settings.verify_share:
            return Plan()
        if not self._checks.can_verify(task.id, [node.account]):
            return Plan()  # nobody else could run it: shown unchecked, still on probation
        return Plan(check=True, hold=probation)

    def start(self, task_id: str, node_account: str, plan: Plan) -> None:
        """Queue the verification run of a result just recorded (see :meth:`plan`)."""
        if plan.check:
            self._checks.start(task_id, [node_account], state="held" if plan.hold else "checking")

    def hold_s(self, plan: Plan) -> float | None:
        return self._settings.verify_timeout_s if plan.hold else None

    # -- settling ----------------------------------------------------------------------------
    def settle_open(self) -> int:
        """Settle every check with a finished run, or a held result past its deadline (the
        sweeper calls this); returns how many were looked at."""
        ready = self._checks.to_settle()
        for task_id in ready:
            try:
                self.settle(task_id)
            except Exception:
                log.exception("could not settle the check of task %s", task_id)
        return len(ready)

    def settle(self, task_id: str) -> None:
        """Settle the check of ``task_id`` as far as its finished runs allow."""
        state = self._checks.state(task_id)
        if state is None or state.task.verification not in OPEN_STATES:
            return
        fresh = [r for r in state.runs if r.verification == RUN and r.status.finished]
        if not fresh:
            if self._checks.is_overdue(task_id):
                self._close(state, "unchecked", [])
            return
        if state.task.verification == "disputed":
            self._break_tie(state, fresh[0])
        else:
            self._compare(state, fresh[0])

    def _compare(self, state: CheckState, run: Outcome) -> None:
        task = state.task
        if run.status != TaskStatus.SUCCESS:
            self._close(state, "unchecked", [run.id])
            return
        distance = self._distance(task, run)
        if distance is None:
            self._close(state, "unchecked", [run.id])
        elif distance <= self._settings.verify_threshold:
            if self._close(state, "passed", [run.id]):
                self._record(task, passed=True)
        elif _trusted(run):
            self._convict(state, task, run, [run.id], distance)
        else:
            self._dispute(state, run)

    def _break_tie(self, state: CheckState, tie: Outcome) -> None:
        task = state.task
        first = next(r for r in state.runs if r.id != tie.id and r.status == TaskStatus.SUCCESS)
        if tie.status != TaskStatus.SUCCESS:
            self._close(state, "inconclusive", [tie.id])
            return
        threshold = self._settings.verify_threshold
        to_task, to_first = self._distance(task, tie), self._distance(first, tie)
        if to_task is not None and to_task <= threshold:
            if self._close(state, "passed", [tie.id]):
                self._record(task, passed=True)
                self._record(first, passed=False, reason=_reason(task.id, to_task, first=True))
        elif to_first is not None and to_first <= threshold:
            if self._convict(state, task, tie, [tie.id], self._distance(task, first) or 1.0):
                self._record(first, passed=True)
        else:
            self._close(state, "inconclusive", [tie.id])

    def _dispute(self, state: CheckState, run: Outcome) -> None:
        """An untrusted verifier disagrees: a node of a third account breaks the tie."""
        task = state.task
        exclude = [a for a in (task.node_account, run.node_account) if a]
        if not self._checks.can_verify(task.id, exclude):
            self._close(state, "inconclusive", [run.id])
            return
        if self._checks.settle(
            task.id, was=task.verification or "", now_state="disputed", used=[run.id]
        ):
            self._checks.start(task.id, exclude, state="disputed")

    def _convict(
        self, state: CheckState, task: Outcome, right: Outcome, used: list[str], distance: float
    ) -> bool:
        """``task``'s node made another picture than ``right``'s: it becomes suspect, and the
        task gets the right picture. False if another process settled the check first."""
        replaced = self._copy_result(right, task.id)
        if not self._close(state, "failed", used, result=replaced):
            return False
        self._record(task, passed=False, reason=_reason(task.id, distance, first=False))
        return True

    def _close(
        self, state: CheckState, outcome: str, used: list[str], *, result: TaskResult | None = None
    ) -> bool:
        return self._checks.settle(
            state.task.id,
            was=state.task.verification or "",
            now_state=outcome,
            used=used,
            result=result,
            publish=True,
            close_runs=True,
        )

    def _record(self, outcome: Outcome, *, passed: bool, reason: str = "") -> None:
        if outcome.node_id is not None and not _trusted(outcome):
            self._nodes.record_check(outcome.node_id, passed=passed, reason=reason)
            if not passed:
                log.warning("node %s is now suspect: %s", outcome.node_id, reason)

    def _distance(self, first: Outcome, second: Outcome) -> float | None:
        """The largest distance between the runs' images, pair by pair (every image of a
        batch is checked: any of them could be the forged one); None if one is missing."""
        ours, theirs = first.result.image_keys, second.result.image_keys
        if not ours or len(ours) != len(theirs):
            return None
        try:
            pairs = [
                (self._blobs.get(a), self._blobs.get(b)) for a, b in zip(ours, theirs, strict=True)
            ]
        except KeyError:
            return None
        return max(picture_distance(a, b) for a, b in pairs)

    def _copy_result(self, run: Outcome, task_id: str) -> TaskResult | None:
        """``run``'s images, copied into the task's own keys (they expire with the task)."""
        keys = []
        try:
            for index, key in enumerate(run.result.image_keys):
                copy = f"{task_id}/checked-{index}.png"
                self._blobs.put(copy, self._blobs.get(key))
                keys.append(copy)
        except KeyError:
            return None
        return TaskResult(image_keys=tuple(keys), seeds=run.result.seeds)


def _trusted(outcome: Outcome) -> bool:
    return trusted(outcome.node_account, outcome.admin_node)


def _reason(task_id: str, distance: float, *, first: bool) -> str:
    what = "its check of task" if first else "its result for task"
    return f"{what} {task_id} was another picture than the other runs' (distance {distance:.3f})"
