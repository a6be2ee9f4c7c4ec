"""LiveProgress: nodes' progress kept in memory and published to other replicas in batches."""

from __future__ import annotations

import json
from dataclasses import replace

from dan.domain import TaskKind, TaskRecord, TaskStatus
from dan.tasks.live import MAX_PAYLOAD, LiveProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def running(task_id: str = "t", attempts: int = 1, progress: float = 0.0) -> TaskRecord:
    return TaskRecord(
        id=task_id,
        account="a",
        kind=TaskKind.TXT2IMG,
        status=TaskStatus.PROCESSING,
        params={},
        created_at=0.0,
        progress=progress,
        attempts=attempts,
    )


def test_status_shows_the_latest_beat_of_the_running_try() -> None:
    live = LiveProgress(keep_s=30)
    live.record("t", 1, 0.4, b"png")
    shown = live.show(running())
    assert (shown.progress, shown.preview) == (0.4, b"png")
    live.record("t", 1, 0.6, None)  # a beat without a preview keeps the last one
    assert live.show(running()).preview == b"png"
    assert live.show(running(progress=0.8)).progress == 0.8  # the row may be fresher
    assert live.show(running(attempts=2)).progress == 0.0  # another try: not its progress
    assert live.show(replace(running(), status=TaskStatus.SUCCESS)).progress == 0.0


def test_what_a_silent_node_said_is_forgotten() -> None:
    clock = Clock()
    live = LiveProgress(keep_s=30, monotonic=clock)
    live.record("t", 1, 0.4, None)
    clock.now += 31
    assert live.show(running()).progress == 0.0
    live.record("u", 1, 0.5, None)  # pruning drops the old entry altogether
    assert live.preview_of("t") is None and live.latest("t", 1) is None


def test_progress_is_published_at_once_then_in_batches() -> None:
    clock, sent = Clock(), []
    live = LiveProgress(keep_s=30, publish=sent.append, every_s=0.25, monotonic=clock)
    live.record("a", 1, 0.1, b"preview")
    assert [json.loads(p) for p in sent[0]] == [[["a", 1, 0.1]]]  # idle: sent at once
    for n in range(100):  # a busy replica: one notification per interval
        live.record(f"t{n}", 1, 0.5, None)
    assert len(sent) == 1
    clock.now += 0.25
    live.flush()
    assert len(sent) == 2 and len(sent[1]) == 1 and len(json.loads(sent[1][0])) == 100
    live.flush()
    assert len(sent) == 2  # nothing new, nothing sent


def test_big_batches_are_split_to_fit_a_notification() -> None:
    clock, sent = Clock(), []
    live = LiveProgress(keep_s=30, publish=sent.append, monotonic=clock)
    live.record("first", 1, 0.5, None)  # sent at once; the next wait for the flush
    for n in range(1000):
        live.record(f"{n:036d}", 1, 0.5, None)
    clock.now += 1
    live.flush()
    payloads = sent[-1]
    assert len(payloads) > 1 and all(len(p) <= MAX_PAYLOAD for p in payloads)
    assert sum(len(json.loads(p)) for p in payloads) == 1000


def test_progress_from_another_replica_is_shown() -> None:
    live = LiveProgress(keep_s=30)
    live.receive(json.dumps([["t", 1, 0.7]]))
    live.receive("not json")  # ignored, logged
    assert live.show(running()).progress == 0.7
    live.forget("t")
    assert live.show(running()).progress == 0.0
