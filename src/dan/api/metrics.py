"""GET /metrics (Prometheus text) and the middleware that counts requests by route.

What each metric means is in dan.metrics and the README. /metrics asks for no API key, as a
Prometheus scrape expects; ``metrics_token`` makes it ask for ``Authorization: Bearer <token>``
and ``metrics = false`` takes it (and the request counting) away.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import APIRouter, Request, Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dan.api.generation import context
from dan.errors import PermissionDenied
from dan.metrics.families import Metrics
from dan.metrics.scrape import CONTENT_TYPE, exposition

router = APIRouter(tags=["system"])
UNMATCHED = "unmatched"  # no route took the request: its raw path would make labels unbounded


@router.get("/metrics", summary="Prometheus metrics of this server (text format)")
async def metrics(request: Request) -> Response:
    services = context(request).services
    token = services.settings.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise PermissionDenied("/metrics asks for Authorization: Bearer <metrics_token>")
    body = await asyncio.to_thread(exposition, services.metrics, services.store)
    return Response(body, media_type=CONTENT_TYPE)


class RequestMetrics:
    """Counts each HTTP request by method, route template (``/api/task/{task_id}``, never the
    path itself) and status, and times it (a streamed answer until its stream ends). Pure ASGI:
    the router writes the route it matched into the scope this middleware passed down."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            elapsed = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.request_answered(method, route_of(scope), status, elapsed)


# The methods counted by name: the server parses any token as a method, and a label per
# invented one would grow the metrics without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(scope: Scope) -> str:
    """The template of the route that took the request; a mount (the playground's files) is
    one route, ``<its path>/{path}``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    if isinstance(route, Mount):
        return f"{path}/{{path}}"
    return path
