"""Domain values shared by every layer: frozen dataclasses and enums, no I/O, no torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

# The six sampler names of the reference, in its order (AUTOMATIC1111 names).
SAMPLERS: tuple[str, ...] = ("DPM++ SDE Karras", "Euler a", "Euler", "DPM++ SDE", "LMS", "DDIM")

SEED_MAX = 2**32 - 1


class TaskStatus(IntEnum):
    """Task status numbers of the reference."""

    PENDING = 0
    PROCESSING = 1
    SUCCESS = 2
    FAILURE = 3

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.SUCCESS, TaskStatus.FAILURE)


class TaskKind(StrEnum):
    TXT2IMG = "txt2img"


class ModelKind(StrEnum):
    CHECKPOINT = "checkpoint"
    LORA = "lora"
    CONTROLNET = "controlnet"
    UPSCALER = "upscaler"

    @property
    def folder(self) -> str:
        """Sub-folder of the models directory holding this kind."""
        return {"checkpoint": "checkpoints", "lora": "loras", "upscaler": "upscalers"}.get(
            self.value, self.value
        )


@dataclass(frozen=True)
class ModelRef:
    """A model as a task names it: the sha256 of its file, and the name it had when resolved."""

    sha256: str
    name: str

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's short model hash: the first 10 hex digits of the sha256."""
        return self.sha256[:10]


@dataclass(frozen=True)
class InstalledModel:
    """A model file found in the models directory."""

    kind: ModelKind
    name: str
    sha256: str
    path: Path
    size: int

    @property
    def ref(self) -> ModelRef:
        return ModelRef(sha256=self.sha256, name=self.name)


@dataclass(frozen=True)
class GenerationRequest:
    """A txt2img request after validation: every value is explicit, the seed is resolved."""

    prompt: str
    negative_prompt: str
    seed: int
    sampler_name: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    model: ModelRef

    def to_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerationRequest:
        values = dict(params)
        values["model"] = ModelRef(**values["model"])
        return cls(**values)


@dataclass(frozen=True)
class TaskResult:
    """What a finished task produced: keys of its images in the blob store, and their seeds."""

    image_keys: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored. ``queue_position`` is filled in only by reads that compute it."""

    id: str
    account: str
    kind: TaskKind
    status: TaskStatus
    params: dict[str, Any]
    created_at: float  # UNIX seconds
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    error: str | None = None
    result: TaskResult = field(default_factory=TaskResult)
    attempts: int = 0
    cancel_requested: bool = False
    expired: bool = False
    queue_position: int = 0


@dataclass(frozen=True)
class ClaimedTask:
    """A task a worker holds a lease on."""

    id: str
    kind: TaskKind
    params: dict[str, Any]
    attempt: int


# Called by the engine after every denoising step with (steps done, steps in all).
# It raises dan.errors.TaskCancelled to stop the run.
ProgressCallback = Callable[[int, int], None]
