"""TaskService: the business rules of the queue (submit, status, cancel, upkeep)."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dan.config import Settings
from dan.domain import (
    GenerationRequest,
    InstalledModel,
    ModelKind,
    TaskKind,
    TaskRecord,
)
from dan.errors import InvalidArgument, ModelNotFound, ResourceUnavailable, TaskNotFound
from dan.storage import BlobStore
from dan.tasks.store import NewTask, Statistics, TaskStore

log = logging.getLogger(__name__)


class ModelLookup(Protocol):
    """What the service needs of the model registry."""

    def resolve(self, kind: ModelKind, ref: str) -> InstalledModel: ...

    def default_checkpoint(self, preferred: str | None) -> InstalledModel | None: ...


@dataclass(frozen=True)
class Txt2ImgOrder:
    """A txt2img request as the client sent it (validated for types and ranges)."""

    prompt: str
    negative_prompt: str
    seed: int  # -1: pick one
    sampler_name: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    model: str | None


class TaskService:
    """Submit, inspect and cancel tasks; expire old results and re-queue lost ones."""

    def __init__(
        self,
        store: TaskStore,
        blobs: BlobStore,
        models: ModelLookup,
        settings: Settings,
        *,
        random_seed: Callable[[], int] = lambda: secrets.randbelow(2**32),
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._models = models
        self._settings = settings
        self._random_seed = random_seed

    def submit_txt2img(self, account: str, order: Txt2ImgOrder) -> TaskRecord:
        """Queue a txt2img task; raises InvalidArgument, ModelNotFound, TooManyPendingTasks."""
        self._check_prompt("prompt", order.prompt)
        self._check_prompt("negative_prompt", order.negative_prompt)
        request = GenerationRequest(
            prompt=order.prompt,
            negative_prompt=order.negative_prompt,
            # Resolved now, so a task that is re-run after a crash makes the same image.
            seed=order.seed if order.seed >= 0 else self._random_seed(),
            sampler_name=order.sampler_name,
            steps=order.steps,
            cfg_scale=order.cfg_scale,
            width=order.width,
            height=order.height,
            model=self._checkpoint(order.model).ref,
        )
        new = NewTask(str(uuid.uuid4()), account, TaskKind.TXT2IMG, request.to_params())
        return self._store.submit(new, max_pending=self._settings.max_pending_per_account)

    def get(self, task_id: str, account: str | None = None) -> TaskRecord:
        """The task; TaskNotFound if it does not exist or belongs to another account."""
        record = self._store.get(task_id)
        if record is None or (account is not None and record.account != account):
            raise TaskNotFound(f"no task with taskId {task_id!r}")
        return record

    def cancel(self, task_id: str, account: str | None = None) -> TaskRecord:
        """Cancel the task: a pending one never runs, a running one stops within a step."""
        self.get(task_id, account)
        record = self._store.cancel(task_id)
        if record is None:
            raise TaskNotFound(f"no task with taskId {task_id!r}")
        return record

    def images(self, record: TaskRecord) -> list[bytes]:
        """The PNG files of a successful task (empty once its results have expired)."""
        if record.expired:
            return []
        try:
            return [self._blobs.get(key) for key in record.result.image_keys]
        except KeyError:
            return []

    def statistics(self) -> Statistics:
        return self._store.statistics()

    def sweep(self, now: float) -> None:
        """Re-queue tasks whose worker vanished; delete results older than the retention."""
        self._store.requeue_expired(max_attempts=self._settings.max_attempts)
        old = self._store.finished_before(now - self._settings.result_ttl_s, limit=500)
        for record in old:
            self._blobs.delete_group(record.id)
        self._store.mark_expired([record.id for record in old])

    def _checkpoint(self, ref: str | None) -> InstalledModel:
        if ref is not None:
            try:
                return self._models.resolve(ModelKind.CHECKPOINT, ref)
            except ModelNotFound as exc:
                raise ModelNotFound(f"Invalid model: {exc.message}") from exc
        model = self._models.default_checkpoint(self._settings.default_model)
        if model is None:
            raise ResourceUnavailable(
                "no checkpoint is installed; put a .safetensors file in the models/checkpoints "
                "folder or run `dan models pull chillout_mix`"
            )
        return model

    def _check_prompt(self, field: str, text: str) -> None:
        limit = self._settings.max_prompt_chars
        if len(text) > limit:
            raise InvalidArgument(
                f"Invalid {field}: at most {limit} characters are accepted, got {len(text)}"
            )
