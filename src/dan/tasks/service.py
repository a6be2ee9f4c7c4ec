"""TaskService: the business rules of the queue (submit, status, cancel, upkeep)."""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import replace

from dan.config import Settings
from dan.domain import TaskKind, TaskRecord
from dan.errors import InvalidArgument, ResourceUnavailable, TaskNotFound, TooManyPendingTasks
from dan.storage import BlobStore
from dan.tasks.needs import Needs
from dan.tasks.orders import (
    DetectOrder,
    Img2ImgOrder,
    InterrogateOrder,
    ModelLookup,
    Prepared,
    RequestBuilder,
    Txt2ImgOrder,
    UpscaleOrder,
)
from dan.tasks.store import NewTask, Statistics, TaskStore, pending_message

log = logging.getLogger(__name__)


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
        weight_of: Callable[[str], float] = lambda account: 1.0,
        local_files: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self._weight_of = weight_of
        self._local_files = local_files
        self._store = store
        self._blobs = blobs
        self._settings = settings
        self._build = RequestBuilder(models, settings, random_seed=random_seed)

    def submit_txt2img(self, account: str, order: Txt2ImgOrder) -> TaskRecord:
        """Queue a txt2img task; raises InvalidArgument, ModelNotFound, TooManyPendingTasks."""
        return self._submit(account, TaskKind.TXT2IMG, lambda tid: self._build.txt2img(order, tid))

    def submit_img2img(self, account: str, order: Img2ImgOrder) -> TaskRecord:
        """Queue an img2img or inpaint task; the input images are checked and stored first."""
        return self._submit(account, TaskKind.IMG2IMG, lambda tid: self._build.img2img(order, tid))

    def submit_upscale(self, account: str, order: UpscaleOrder) -> TaskRecord:
        """Queue a standalone upscale of an image."""
        return self._submit(account, TaskKind.UPSCALE, lambda tid: self._build.upscale(order, tid))

    def submit_detect(self, account: str, order: DetectOrder) -> TaskRecord:
        """Queue a ControlNet preprocessor run (it needs the worker's packages, not torch)."""
        return self._submit(account, TaskKind.DETECT, lambda tid: self._build.detect(order, tid))

    def submit_interrogate(self, account: str, order: InterrogateOrder) -> TaskRecord:
        """Queue a caption (clip) or tagging (deepdanbooru) of an image; raises
        ResourceUnavailable at once when the interrogator's weights are not installed."""
        kind = TaskKind.INTERROGATE
        return self._submit(account, kind, lambda tid: self._build.interrogate(order, tid))

    def _submit(self, account: str, kind: TaskKind, build: Callable[[str], Prepared]) -> TaskRecord:
        """Refuse at once an account at its pending limit (before any image is decoded),
        build and check the request, store its inputs, and queue it. The limit counts images:
        a task of more images than it is refused as invalid, since it could never be queued."""
        limit = self._settings.max_pending_per_account
        pending = self._store.pending_count(account)
        if pending >= limit:
            raise TooManyPendingTasks(pending_message(pending, limit))
        task_id = str(uuid.uuid4())
        prepared = build(task_id)
        needs = prepared.needs
        if needs.images > limit:
            raise InvalidArgument(
                f"Invalid batch_size x n_iter: this task makes {needs.images} images, more "
                f"than the {limit} an account may have pending on this server; ask for fewer"
            )
        warning = self._check_served(needs)
        for key, data in prepared.inputs.items():
            self._blobs.put(key, data)
        try:
            new = NewTask(
                task_id,
                account,
                kind,
                dict(prepared.params),
                cost=needs.cost,
                weight=self._weight_of(account),
                checkpoint=needs.checkpoint,
                requires=needs.requires,
                expects=needs.expects,
                images=needs.images,
            )
            record = self._store.submit(new, max_pending=limit)
        except BaseException:
            self._blobs.delete_group(task_id)  # a refused task leaves nothing behind
            raise
        return replace(record, warning=warning) if warning else record

    def _check_served(self, needs: Needs) -> str | None:
        """Refuse (or warn about, by setting) a task that no single online node can run: one
        node must have every file it needs, or it would wait at the head of the queue forever.

        Nothing is refused while no node at all is online: the task waits for the first; nor
        when this server runs a local worker that has every file itself."""
        if self._settings.worker and set(needs.requires) <= self._local_files():
            return None
        if self._store.runnable_somewhere(needs.requires) is not False:
            return None
        files = ", ".join(sha[:10] for sha in needs.requires)
        text = (
            f"no online worker has all the model files this task needs ({files}) installed, "
            "so the task waits until one that has them all connects"
        )
        if self._settings.unserved_models == "reject":
            raise ResourceUnavailable(f"{text}; it was not queued")
        return text

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

    def history(self, account: str, *, limit: int, before: int | None = None) -> list[TaskRecord]:
        """The account's tasks, newest first (a page of ``limit``, before seq ``before``)."""
        return self._store.history(account, limit=limit, before=before)

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
        """End overdue runs (lost leases, time limits, ignored cancels); delete results (and
        forget prompts) older than the retention."""
        self._store.requeue_expired()
        old = self._store.finished_before(now - self._settings.result_ttl_s, limit=500)
        for record in old:
            self._blobs.delete_group(record.id)
        self._store.mark_expired([record.id for record in old])
