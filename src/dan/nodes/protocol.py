"""The node wire protocol: what a node and a DAN server say to each other over HTTP.

Both sides import this module (the server's routes in dan.api.routes.nodes, the node's
client in dan.workers.remote); it has no FastAPI in it. Every ``/api/node/...`` request
carries the owner's API key; after ``register``, every request names the node and the session
(one running process of the node) it opened.

Bodies are validated here, with the limits that keep one node from costing everyone else:
files per node, loaded checkpoints, slots, result sizes. A refusal comes back in the DAN
envelope with ``data.reason``, one of :class:`Reason`; the client raises by that reason
(:func:`error_for`), never by HTTP status.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dan.domain import ModelFamily, ModelKind
from dan.errors import (
    DanError,
    InvalidArgument,
    NodeNotFound,
    NodeSuspect,
    PermissionDenied,
    ResultRefused,
    SessionEnded,
    TaskNotHeld,
    TooManyNodes,
)

VERSION = 3  # 3: nodes say which model families they run, and each file's family
MAX_WAIT_S = 25.0  # longest claim long-poll; below common proxies' idle timeouts
MAX_FILES = 20_000  # files one node may report
MAX_LOADED = 64  # checkpoints one node may say it has loaded
MAX_SLOTS = 8  # tasks one node process may run at once
MAX_CAPABILITIES_BYTES = 64 * 1024
MAX_NAME_CHARS = 256  # a model or file name
MAX_ERROR_CHARS = 2000
MAX_CAPTION_CHARS = 20_000
MAX_PREVIEW_CHARS = 90_000  # base64 of a step preview (dan.imaging.PREVIEW_BYTES and some)
SHA256 = re.compile(r"[0-9a-f]{64}")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


class Reason(StrEnum):
    """Why the server refused a node's request (``data.reason`` of the error envelope)."""

    INVALID = "invalid"  # a malformed request: a bug on one side
    FORBIDDEN = "forbidden"  # the key may not run nodes, or not this node
    NODE_NOT_FOUND = "node_not_found"  # register again
    SESSION_ENDED = "session_ended"  # this process's session is over: register again
    TASK_NOT_HELD = "task_not_held"  # the task went elsewhere; drop it
    RESULT_REFUSED = "result_refused"  # the result was not what the task asks for
    SUSPECT = "node_suspect"  # a result of this node failed its check: an admin must clear it
    TOO_MANY = "too_many"  # the account's nodes, sessions or waiting claims are at their limit
    ERROR = "error"  # anything else


# Most specific first: the first class an error is an instance of names its reason.
_REASONS: tuple[tuple[type[DanError], Reason], ...] = (
    (SessionEnded, Reason.SESSION_ENDED),
    (NodeNotFound, Reason.NODE_NOT_FOUND),
    (TaskNotHeld, Reason.TASK_NOT_HELD),
    (ResultRefused, Reason.RESULT_REFUSED),
    (NodeSuspect, Reason.SUSPECT),
    (TooManyNodes, Reason.TOO_MANY),
    (PermissionDenied, Reason.FORBIDDEN),
    (InvalidArgument, Reason.INVALID),
)


def reason_of(error: DanError) -> Reason:
    """The reason the server sends for ``error``."""
    return next((reason for kind, reason in _REASONS if isinstance(error, kind)), Reason.ERROR)


def error_for(reason: str | None, message: str) -> DanError:
    """The error the client raises for a refusal with ``reason``."""
    for kind, known in _REASONS:
        if reason == known.value:
            return kind(message)
    return DanError(message)


# -- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FileBody(_Body):
    """A file the node has installed; ``kind``, ``name`` and ``file`` when it describes it,
    and the ``family`` it read from it (checkpoints, LoRAs, ControlNets)."""

    sha256: str = Field(pattern=SHA256.pattern)
    kind: ModelKind | None = None
    family: ModelFamily | None = None
    name: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    file: str | None = Field(None, min_length=1, max_length=MAX_NAME_CHARS)
    size: int | None = Field(None, ge=0)

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and ("/" in value or "\\" in value):
            raise ValueError("must be a file name, not a path")
        return value


class RegisterBody(_Body):
    """``POST /api/node/register``: what the node is and has. ``families``: the model
    families it runs and has the memory for; a node that leaves it out (older than protocol
    version 3) is offered SD 1.x tasks only."""

    name: str = Field(pattern=NODE_NAME.pattern)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    families: list[ModelFamily] | None = Field(None, max_length=len(ModelFamily))
    files: list[FileBody] = Field(default_factory=list, max_length=MAX_FILES)
    loaded: list[str] = Field(default_factory=list, max_length=MAX_LOADED)
    slots: int = Field(1, ge=1, le=MAX_SLOTS)

    @field_validator("loaded")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        bad = next((sha for sha in value if not SHA256.fullmatch(sha)), None)
        if bad is not None:
            raise ValueError(f"must list sha256 hashes (64 lower-case hex digits), got {bad!r}")
        return value

    @field_validator("capabilities")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value)) > MAX_CAPABILITIES_BYTES:
            raise ValueError(f"must be at most {MAX_CAPABILITIES_BYTES} bytes of JSON")
        return value


class SessionBody(_Body):
    nodeId: str = Field(min_length=1, max_length=64)
    sessionId: str = Field(min_length=1, max_length=64)


class ClaimBody(SessionBody):
    loaded: list[str] | None = Field(None, max_length=MAX_LOADED)
    waitS: float = Field(MAX_WAIT_S, ge=0, le=MAX_WAIT_S)


class TaskBody(SessionBody):
    taskId: str = Field(min_length=1, max_length=64)


class HeartbeatBody(TaskBody):
    progress: float | None = Field(None, ge=0, le=1)
    preview: str | None = Field(None, max_length=MAX_PREVIEW_CHARS)  # base64 of a small PNG


class ResultBody(_Body):
    image_keys: list[str] = Field(default_factory=list, max_length=64)
    seeds: list[int] = Field(default_factory=list, max_length=64)
    caption: str | None = Field(None, max_length=MAX_CAPTION_CHARS)


class CompleteBody(TaskBody):
    result: ResultBody


class FailBody(TaskBody):
    error: str = Field("", max_length=100_000)


# -- answers ----------------------------------------------------------------------------------
class Registered(_Body):
    nodeId: str
    sessionId: str
    name: str
    leaseS: float
    maxWaitS: float
    slots: int


class TaskWire(_Body):
    id: str
    kind: str
    params: dict[str, Any]
    attempt: int


class Assigned(_Body):
    task: TaskWire | None = None
    pull: list[str] = Field(default_factory=list)


class Beat(_Body):
    held: bool
    cancelRequested: bool


def result_key(task_id: str, attempt: int, index: int) -> str:
    """Where result image ``index`` of try ``attempt`` of a task is uploaded: a late worker
    whose lease was lost can never overwrite the result of the try that replaced it."""
    return f"{task_id}/a{attempt}-{index}.png"


def parse_result_key(task_id: str, key: str) -> tuple[int, int] | None:
    """(attempt, index) of a result key of ``task_id``, or None if it is not one."""
    match = re.fullmatch(rf"{re.escape(task_id)}/a(\d{{1,3}})-(\d{{1,2}})\.png", key)
    return None if match is None else (int(match[1]), int(match[2]))
