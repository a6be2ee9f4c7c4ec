"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from dan import __version__
from dan.api.a1111 import listings as a1111_listings
from dan.api.a1111 import routes as a1111_routes
from dan.api.errors import install_error_handlers
from dan.api.generation import ApiContext, webhook_body
from dan.api.limits import BodySizeLimit
from dan.api.metrics import RequestMetrics
from dan.api.metrics import router as metrics_router
from dan.api.routes import accounts, nodes, sd, signin, system, v0
from dan.api.signin import install_sign_in
from dan.db.notify import PROGRESS, QUEUED, NotifyListener
from dan.services import Services
from dan.tasks.live import PUBLISH_S, LiveProgress
from dan.tasks.watcher import TaskWatcher, running
from dan.webhooks.sender import WebhookSender, sending

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 5.0
WEB = Path(__file__).resolve().parents[1] / "web"


async def _sweep_forever(services: Services) -> None:
    """End overdue runs and silent node sessions, settle result checks, delete expired
    results, forever; errors are logged."""
    while True:
        try:
            await asyncio.to_thread(services.tasks.sweep, time.time())
            await asyncio.to_thread(services.nodes.expire_sessions)
            await asyncio.to_thread(services.checks.settle_open)
        except Exception:
            log.exception("sweep failed; will retry")
        await asyncio.sleep(SWEEP_INTERVAL_S)


async def _publish_progress_forever(live: LiveProgress) -> None:
    """Send the other replicas what nodes' heartbeats said here, in batches (dan.tasks.live)."""
    while True:
        await asyncio.sleep(PUBLISH_S)
        await asyncio.to_thread(live.flush)


def _listen(
    services: Services, watcher: TaskWatcher, webhooks: WebhookSender
) -> list[NotifyListener]:
    """On PostgreSQL: wake ``watcher`` and the ``webhooks`` sender when any process finishes a
    task, and the nodes' waiting claims when one queues a task (see tasks.notify); polling
    stays as the fallback; and take in the progress other replicas heard (dan.tasks.live)."""
    if services.db.dialect.name != "postgresql":
        return []
    loop = asyncio.get_running_loop()
    live = services.live

    def on_finished(task_id: str) -> None:
        if live is not None:
            live.forget(task_id)
        loop.call_soon_threadsafe(watcher.poke, task_id)
        loop.call_soon_threadsafe(webhooks.wake)

    url = services.settings.db_url
    nodes = services.nodes
    queued = NotifyListener(url, nodes.task_queued, channel=QUEUED, ready=nodes.notified)
    listeners = [NotifyListener(url, on_finished).start(), queued.start()]
    if live is not None:
        listeners.append(NotifyListener(url, live.receive, channel=PROGRESS).start())
    return listeners


def create_app(services: Services) -> FastAPI:
    """The DAN HTTP API over ``services``; OpenAPI docs at /docs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = TaskWatcher(services.store, interval_s=services.settings.poll_interval_s)
        ctx = app.state.ctx = ApiContext(services=services, watcher=watcher)
        webhooks = WebhookSender(services.webhooks, functools.partial(webhook_body, ctx))
        sweeper = asyncio.create_task(_sweep_forever(services), name="sweeper")
        background = [sweeper]
        listeners = _listen(services, watcher, webhooks)
        if listeners and services.live is not None:
            publish = _publish_progress_forever(services.live)
            background.append(asyncio.create_task(publish, name="progress"))
        async with running(watcher), sending(webhooks):
            yield
        for listener in listeners:
            listener.stop()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="DAN",
        version=__version__,
        description="Stable Diffusion image generation: the DAN API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(sd.router)
    app.include_router(v0.router)
    app.include_router(system.router)
    app.include_router(accounts.router)
    app.include_router(nodes.router)
    app.include_router(signin.router)
    if services.settings.metrics:
        app.include_router(metrics_router)
    for router in (a1111_routes, a1111_listings):  # the AUTOMATIC1111 facade
        app.include_router(router.router)
        app.include_router(router.controlnet_router)
    install_sign_in(app, services)
    if WEB.is_dir():  # the playground (dan/web, in the package) answers what no route took
        app.mount("/", StaticFiles(directory=WEB, html=True), name="web")
    app.add_middleware(BodySizeLimit, max_bytes=services.settings.max_body_bytes)
    origins = services.settings.cors_origin_list
    if origins:  # other sites' browser clients
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Content-Type"],
        )
    if services.settings.metrics:  # outermost: it counts what the others answer too
        app.add_middleware(RequestMetrics, metrics=services.metrics)
    return app
