"""TaskService: the business rules of the queue (submit, status, cancel, upkeep)."""

from __future__ import annotations

import functools
import logging
import secrets
import uuid
from collections.abc import Callable
from dataclasses import replace

from dan.config import Settings
from dan.domain import ModelFamily, TaskKind, TaskRecord, TaskStatus
from dan.errors import InvalidArgument, ResourceUnavailable, TaskNotFound, TooManyPendingTasks
from dan.storage import BlobStore
from dan.tasks.live import LiveProgress
from dan.tasks.needs import Needs
from dan.tasks.order_models import OrderModels
from dan.tasks.orders import (
    DetectOrder,
    Img2ImgOrder,
    InterrogateOrder,
    Txt2ImgOrder,
    UpscaleOrder,
)
from dan.tasks.requests import Prepared, RequestBuilder
from dan.tasks.store import NewTask, Statistics, TaskStore, pending_message
from dan.webhooks import WebhookService

log = logging.getLogger(__name__)


class TaskService:
    """Submit, inspect and cancel tasks; expire old results and re-queue lost ones."""

    def __init__(
        self,
        store: TaskStore,
        blobs: BlobStore,
        models: OrderModels,
        settings: Settings,
        *,
        random_seed: Callable[[], int] = lambda: secrets.randbelow(2**32),
        weight_of: Callable[[str], float] = lambda account: 1.0,
        local_files: Callable[[], frozenset[str]] = frozenset,
        local_families: Callable[[], frozenset[ModelFamily]] = frozenset,
        webhooks: WebhookService | None = None,
        on_queued: Callable[[], None] = lambda: None,
        live: LiveProgress | None = None,
    ) -> None:
        # Called after a task is queued or re-queued, to wake an idle worker that no NOTIFY
        # reaches (the worker child of a server on SQLite).
        self._on_queued = on_queued
        self._webhooks = webhooks
        # Progress fresher than the rows (nodes' heartbeats write them only now and then).
        self._live = live
        self._weight_of = weight_of
        self._local_files = local_files
        self._local_families = local_families
        self._store = store
        self._blobs = blobs
        self._settings = settings
        self._build = RequestBuilder(models, settings, random_seed=random_seed)

    # Every submit takes an optional ``callback_url``: the task's webhook goes there when it
    # ends (checked first: see dan.webhooks.addresses).
    def submit_txt2img(
        self, account: str, order: Txt2ImgOrder, *, callback_url: str | None = None
    ) -> TaskRecord:
        """Queue a txt2img task; raises InvalidArgument, ModelNotFound, TooManyPendingTasks."""
        build = functools.partial(self._build.txt2img, order)
        return self._submit(account, TaskKind.TXT2IMG, build, callback_url)

    def submit_img2img(
        self, account: str, order: Img2ImgOrder, *, callback_url: str | None = None
    ) -> TaskRecord:
        """Queue an img2img or inpaint task; the input images are checked and stored first."""
        build = functools.partial(self._build.img2img, order)
        return self._submit(account, TaskKind.IMG2IMG, build, callback_url)

    def submit_upscale(
        self, account: str, order: UpscaleOrder, *, callback_url: str | None = None
    ) -> TaskRecord:
        """Queue a standalone upscale of an image."""
        build = functools.partial(self._build.upscale, order)
        return self._submit(account, TaskKind.UPSCALE, build, callback_url)

    def submit_detect(
        self, account: str, order: DetectOrder, *, callback_url: str | None = None
    ) -> TaskRecord:
        """Queue a ControlNet preprocessor run (it needs the worker's packages, not torch)."""
        build = functools.partial(self._build.detect, order)
        return self._submit(account, TaskKind.DETECT, build, callback_url)

    def submit_interrogate(
        self, account: str, order: InterrogateOrder, *, callback_url: str | None = None
    ) -> TaskRecord:
        """Queue a caption (clip) or tagging (deepdanbooru) of an image; raises
        ResourceUnavailable at once when the interrogator's weights are not installed."""
        build = functools.partial(self._build.interrogate, order)
        return self._submit(account, TaskKind.INTERROGATE, build, callback_url)

    def _submit(
        self,
        account: str,
        kind: TaskKind,
        build: Callable[[str], Prepared],
        callback_url: str | None = None,
    ) -> TaskRecord:
        """Refuse at once an account at its pending limit (before any image is decoded),
        check the callback URL, build and check the request, store its inputs, and queue it.
        The limit counts images: a task of more images than it is refused as invalid, since it
        could never be queued."""
        limit = self._settings.max_pending_per_account
        pending = self._store.pending_count(account)
        if pending >= limit:
            raise TooManyPendingTasks(pending_message(pending, limit))
        if callback_url is not None:
            self._check_callback(account, callback_url)
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
                callback_url=callback_url,
                images=needs.images,
                family=needs.family,
                batch_key=needs.batch_key,
            )
            record = self._store.submit(new, max_pending=limit)
        except BaseException:
            self._blobs.delete_group(task_id)  # a refused task leaves nothing behind
            raise
        self._on_queued()
        return replace(record, warning=warning) if warning else record

    def _check_callback(self, account: str, url: str) -> None:
        if self._webhooks is None:
            raise InvalidArgument("Invalid callback_url: this server sends no webhooks")
        self._webhooks.check_callback(account, url)

    def _check_served(self, needs: Needs) -> str | None:
        """Refuse (or warn about, by setting) a task that no single online node can run: one
        node must have every file it needs and run its checkpoint's family, or it would wait
        at the head of the queue forever.

        Nothing is refused while no node at all is online: the task waits for the first; nor
        when this server runs a local worker that has every file itself and runs the family
        (or has not said yet which it runs)."""
        if self._settings.worker and self._runs_locally(needs):
            return None
        if self._store.runnable_somewhere(needs.requires, family=needs.family) is not False:
            return None
        files = ", ".join(sha[:10] for sha in needs.requires)
        text = (
            f"no online worker has all the model files this task needs ({files}) installed, "
            "so the task waits until one that has them all connects"
        )
        if needs.family is not None and self._store.runnable_somewhere(needs.requires):
            text = (
                f"no online worker that has this task's model files ({files}) runs "
                f"{needs.family.value} checkpoints (or has the memory for them), so the task "
                f"waits until one that does connects"
            )
        if self._settings.unserved_models == "reject":
            raise ResourceUnavailable(f"{text}; it was not queued")
        return text

    def _runs_locally(self, needs: Needs) -> bool:
        if not set(needs.requires) <= self._local_files():
            return False
        families = self._local_families()
        return needs.family is None or not families or needs.family in families

    def get(self, task_id: str, account: str | None = None) -> TaskRecord:
        """The task; TaskNotFound if it does not exist or belongs to another account."""
        record = self._store.get(task_id)
        if record is None or (account is not None and record.account != account):
            raise TaskNotFound(f"no task with taskId {task_id!r}")
        return self._shown(record)

    def cancel(self, task_id: str, account: str | None = None) -> TaskRecord:
        """Cancel the task: a pending one never runs, a running one stops within a step."""
        self.get(task_id, account)
        record = self._store.cancel(task_id)
        if record is None:
            raise TaskNotFound(f"no task with taskId {task_id!r}")
        return record

    def active(self, account: str) -> list[TaskRecord]:
        """The account's running tasks, then its pending ones in the order they will run."""
        return [self._shown(record) for record in self._store.active(account)]

    def _shown(self, record: TaskRecord) -> TaskRecord:
        return record if self._live is None else self._live.show(record)

    def interrupt(self, account: str) -> None:
        """Cancel the account's running tasks, or, when none runs yet, the one that runs
        next (A1111's interrupt: whatever is current)."""
        active = self.active(account)
        running = [r for r in active if r.status == TaskStatus.PROCESSING] or active[:1]
        for record in running:
            self.cancel(record.id, account)

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
        if self._store.requeue_expired():
            self._on_queued()  # lost runs went back to the queue (or ended: a needless look)
        old = self._store.finished_before(now - self._settings.result_ttl_s, limit=500)
        for record in old:
            self._blobs.delete_group(record.id)
        self._store.mark_expired([record.id for record in old])
