"""Live events of a task, for ``GET /api/sd/task/events`` (server-sent events).

A task's state is read from the queue, where every worker's heartbeats put it (a local
worker, a remote node through any API replica), a few times a second and at once when it
finishes (the TaskWatcher, woken by PostgreSQL's NOTIFY across replicas). Each change is one
``state`` event ``{taskId, status, queuePosition, progress, etaS[, preview]}`` (``preview``, a
PNG data URL, only when it changed); the stream ends with one ``done`` event whose data is
exactly the task-status answer (images and seeds, a caption, or a failure message).

Event ids count up from the ``Last-Event-ID`` a reconnecting client sends: a reconnected
stream starts with the task's current state under the next id, so nothing a client already
has comes again, and what it missed is the state it is sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from dan.api.generation import ApiContext, task_status
from dan.domain import TaskRecord, TaskStatus

POLL_S = 0.25  # how often a running task's state is read


async def task_events(
    ctx: ApiContext, task_id: str, owner: str | None, last_id: int = 0
) -> AsyncIterator[dict[str, Any]]:
    """The events of ``task_id`` (which ``owner`` may see; None: anyone), ids after
    ``last_id``."""
    event_id = last_id
    shown: dict[str, Any] | None = None
    preview_shown: bytes | None = None
    while True:
        record = await asyncio.to_thread(ctx.services.tasks.get, task_id, owner)
        state = _state(record)
        changed_preview = record.preview is not None and record.preview != preview_shown
        if state != shown or changed_preview:
            data = {**state, "preview": _data_url(record.preview)} if changed_preview else state
            event_id += 1
            yield {"event": "state", "id": str(event_id), "data": json.dumps(data)}
            shown, preview_shown = state, record.preview or preview_shown
        if record.status.finished:
            event_id += 1
            final = await task_status(ctx, task_id, owner)
            yield {"event": "done", "id": str(event_id), "data": json.dumps(final)}
            return
        await ctx.watcher.wait(task_id, POLL_S)  # early when the task finishes


def last_event_id(header: str | None) -> int:
    """The id a reconnecting client last saw (0 when none or not ours)."""
    return int(header) if header is not None and header.strip().isdigit() else 0


def _state(record: TaskRecord) -> dict[str, Any]:
    return {
        "taskId": record.id,
        "status": record.status.wire,
        "queuePosition": record.queue_position,
        "progress": round(record.progress, 4),
        "etaS": eta_s(record),
    }


def eta_s(record: TaskRecord) -> float | None:
    """Seconds left at the rate the task has progressed so far (None before it started)."""
    if record.status != TaskStatus.PROCESSING or not record.started_at or record.progress <= 0:
        return None
    elapsed = max(time.time() - record.started_at, 0.0)
    return round(elapsed * (1.0 - record.progress) / record.progress, 1)


def _data_url(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()
