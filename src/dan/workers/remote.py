"""A node's connection to a DAN server: the WorkQueue and the task files, over HTTP(S).

The node connects out (it works behind NAT) with its owner's API key and never touches the
database. ``NodeClient`` has one method per ``/api/node/...`` endpoint, with the bodies of
dan.nodes.protocol; requests that a network cut or a server restart breaks (connection errors,
5xx answers) are retried with exponential backoff until they get through or the node is
stopping, so a cut never kills the node. A refusal is raised as the error its protocol reason
names (dan.nodes.protocol.error_for), never guessed from the HTTP status.

``RemoteQueue`` is what the worker loop (dan.workers.loop) runs on: its heartbeats go out from
the loop's Lease thread (the engine's step callback only reads the last answer), so a slow or
cut network never slows the engine, and a cancelled task stops at the first step after the
server said so.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from dan.domain import ClaimedTask, TaskKind, TaskResult
from dan.errors import (
    DanError,
    InvalidArgument,
    NodeNotFound,
    PermissionDenied,
    ResultRefused,
    TaskCancelled,
    TaskNotHeld,
    TooManyNodes,
)
from dan.nodes import protocol
from dan.nodes.sessions import NodeDescription
from dan.tasks.base import Heartbeat

log = logging.getLogger(__name__)

MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
CLAIM_WAIT_S = 20.0  # the long-poll the node asks for
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
HEARTBEAT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class ServerUnreachable(DanError):
    """The server could not be reached (or answered with a server error), and the node is
    stopping or the request is not one to retry."""

    code = 2000
    http_status = 503


@dataclass(frozen=True)
class Registration:
    """What the server answered to a registration: the node, this process's session."""

    node_id: str
    session_id: str
    lease_s: float

    @property
    def worker_id(self) -> str:
        return f"node:{self.node_id}:{self.session_id}"


@dataclass(frozen=True)
class ClaimAnswer:
    task: ClaimedTask | None
    pull: tuple[str, ...]


class NodeClient:
    """The ``/api/node/...`` endpoints of one server, as one node's owner (``api_key``).

    Every method retries connection errors and 5xx answers until ``stop`` is set (then
    ServerUnreachable), except ``heartbeat`` and ``offline``, which try once. A refusal is
    raised as the DanError of its protocol reason: SessionEnded / NodeNotFound (register
    again), TaskNotHeld (the task went elsewhere), ResultRefused (the result was not what the
    task asks for), NodeSuspect / PermissionDenied (the node may not work), TooManyNodes, or
    InvalidArgument (a bug on one side)."""

    def __init__(
        self,
        server: str,
        api_key: str,
        *,
        stop: threading.Event,
        http: httpx.Client | None = None,
    ) -> None:
        self._stop = stop
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._own_http = http is None
        self._http = http or httpx.Client(
            base_url=server.rstrip("/"), timeout=TIMEOUT, follow_redirects=True
        )

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def register(self, description: NodeDescription) -> Registration:
        body = protocol.RegisterBody(
            name=description.name,
            capabilities=description.capabilities,
            files=[
                protocol.FileBody(
                    sha256=f.sha256,
                    kind=f.kind,
                    name=f.name,
                    file=f.file,
                    size=f.size,
                    family=f.family,
                )
                for f in description.files
            ],
            families=None if description.families is None else sorted(description.families),
            loaded=sorted(description.loaded),
            slots=description.slots,
        )
        answer = _parse(protocol.Registered, self._post("/api/node/register", body))
        return Registration(answer.nodeId, answer.sessionId, answer.leaseS)

    def claim(self, session: Registration, loaded: frozenset[str], wait_s: float) -> ClaimAnswer:
        body = protocol.ClaimBody(**_ids(session), loaded=sorted(loaded), waitS=wait_s)
        timeout = httpx.Timeout(wait_s + 30.0, connect=10.0)
        answer = _parse(protocol.Assigned, self._post("/api/node/claim", body, timeout=timeout))
        task = None
        if answer.task is not None:
            raw = answer.task
            task = ClaimedTask(
                id=raw.id, kind=TaskKind(raw.kind), params=raw.params, attempt=raw.attempt
            )
        return ClaimAnswer(task, tuple(answer.pull))

    def heartbeat(
        self,
        session: Registration,
        task_id: str,
        progress: float | None,
        preview: bytes | None = None,
    ) -> Heartbeat:
        encoded = base64.b64encode(preview).decode("ascii") if preview is not None else None
        body = protocol.HeartbeatBody(
            **_ids(session), taskId=task_id, progress=progress, preview=encoded
        )
        data = self._post("/api/node/heartbeat", body, retry=False, timeout=HEARTBEAT_TIMEOUT)
        beat = _parse(protocol.Beat, data)
        return Heartbeat(held=beat.held, cancel_requested=beat.cancelRequested)

    def get_input(self, session: Registration, task_id: str, key: str) -> bytes:
        params = {**_ids(session), "taskId": task_id, "key": key}
        return self._request("GET", "/api/node/input", params=params).content

    def put_result(self, session: Registration, task_id: str, key: str, data: bytes) -> None:
        params = {**_ids(session), "taskId": task_id, "key": key}
        headers = {"Content-Type": "image/png"}
        self._request("PUT", "/api/node/result", params=params, content=data, headers=headers)

    def complete(self, session: Registration, task_id: str, result: TaskResult) -> None:
        payload = protocol.ResultBody(
            image_keys=list(result.image_keys), seeds=list(result.seeds), caption=result.caption
        )
        body = protocol.CompleteBody(**_ids(session), taskId=task_id, result=payload)
        self._post("/api/node/complete", body)

    def fail(self, session: Registration, task_id: str, error: str) -> None:
        body = protocol.FailBody(**_ids(session), taskId=task_id, error=error)
        self._post("/api/node/fail", body)

    def offline(self, session: Registration) -> int:
        body = protocol.SessionBody(**_ids(session))
        return int(self._post("/api/node/offline", body, retry=False).get("released", 0))

    # -- helpers -----------------------------------------------------------------------------
    def _post(
        self, path: str, body: BaseModel, *, retry: bool = True, timeout: Any = None
    ) -> dict[str, Any]:
        json = body.model_dump(mode="json")
        return _data(self._request("POST", path, json=json, retry=retry, timeout=timeout))

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool = True,
        timeout: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """The answer to a request, retried while it fails for the network or the server."""
        delay = MIN_BACKOFF_S
        headers = {**self._headers, **(headers or {})}
        while True:
            try:
                response = self._http.request(
                    method, path, timeout=timeout or TIMEOUT, headers=headers, **kwargs
                )
                if response.status_code < 500:
                    return _checked(response)
                problem = f"HTTP {response.status_code}: {_message(response)}"
            except httpx.TransportError as exc:
                problem = repr(exc)
            if not retry or self._stop.is_set():
                raise ServerUnreachable(f"{method} {path} failed: {problem}")
            log.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
            if self._stop.wait(delay):
                raise ServerUnreachable(f"{method} {path} failed: {problem}; the node stops")
            delay = min(delay * 2, MAX_BACKOFF_S)


def _ids(session: Registration) -> dict[str, str]:
    return {"nodeId": session.node_id, "sessionId": session.session_id}


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message") or response.text[:200])
    except ValueError:
        return response.text[:200]


def _checked(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded, else the DanError its protocol reason names."""
    if response.status_code < 400:
        return response
    message = _message(response)
    reason = _data(response).get("reason")
    if reason is None:  # not an answer of DAN's node protocol
        path = response.request.url.path
        message = f"{path}: HTTP {response.status_code}: {message}; is this a DAN server?"
    raise protocol.error_for(reason, message)


def _data(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"the server's answer is not DAN's node protocol: {exc}") from exc


class RemoteQueue:
    """The WorkQueue of a remote node (see the module docstring). ``describe`` says what the
    node is and has, read again at each registration; ``on_pull`` receives the catalog
    models an admin asked this node to download."""

    def __init__(
        self,
        client: NodeClient,
        describe: Callable[[], NodeDescription],
        *,
        stop: threading.Event,
        loaded: Callable[[], frozenset[str]] = frozenset,
        on_pull: Callable[[tuple[str, ...]], None] = lambda names: None,
        wait_s: float = CLAIM_WAIT_S,
    ) -> None:
        self._client, self._describe = client, describe
        self._stop, self._loaded, self._on_pull = stop, loaded, on_pull
        self._wait_s = wait_s
        self.session: Registration | None = None
        self.fatal: DanError | None = None  # why the node had to stop, if it had to
        self._registered = threading.Event()
        self._poller: threading.Thread | None = None  # the latest claim's request

    @property
    def node_id(self) -> str | None:
        return None if self.session is None else self.session.node_id

    @property
    def lease_s(self) -> float:
        return 30.0 if self.session is None else self.session.lease_s

    # -- registration ------------------------------------------------------------------------
    def register(self) -> Registration:
        """Register (or refresh) the node on the server, opening a session for this
        process; retried until it gets through."""
        self.session = self._client.register(self._describe())
        self._registered.set()
        log.info(
            "registered as node %s (session %s)", self.session.node_id, self.session.session_id
        )
        return self.session

    def refresh(self) -> None:
        """Register again before the next claim (what the node has installed changed)."""
        self._registered.clear()

    def close(self, *, wait_s: float = 0.0) -> None:
        """Wait up to ``wait_s`` for a claim still in flight."""
        poller = self._poller
        if poller is not None and wait_s > 0:
            poller.join(wait_s)

    # -- WorkQueue ---------------------------------------------------------------------------
    def claim(
        self, worker_id: str, *, lease_s: float, like: str | None = None
    ) -> ClaimedTask | None:
        if like is not None:
            return None  # the node protocol hands out one task at a time: no batches yet
        try:
            if not self._registered.is_set() or self.session is None:
                self._end_old_session()
                self.register()
            assert self.session is not None
            answer = self._long_poll(self.session)
            if answer is None:
                return None
        except NodeNotFound:  # SessionEnded too
            log.warning("the server ended this node's session; registering again")
            self._registered.clear()
            return None
        except PermissionDenied as exc:  # NodeSuspect too
            log.error("the server refuses this node: %s", exc.message)
            self.fatal = exc
            self._stop.set()
            return None
        except TooManyNodes as exc:
            log.warning("the server turned this claim away: %s", exc.message)
            self._stop.wait(MAX_BACKOFF_S)
            return None
        except ServerUnreachable:
            return None  # only when stopping
        if answer.pull:
            self._on_pull(answer.pull)
        return answer.task

    def heartbeat(
        self,
        task_id: str,
        worker_id: str,
        *,
        lease_s: float,
        progress: float | None = None,
        preview: bytes | None = None,
    ) -> Heartbeat:
        session = self.session
        if session is None:
            return Heartbeat(held=False, cancel_requested=True)
        try:
            return self._client.heartbeat(session, task_id, progress, preview)
        except NodeNotFound:
            return Heartbeat(held=False, cancel_requested=True)

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        return self._finish(task_id, lambda s: self._client.complete(s, task_id, result))

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        return self._finish(task_id, lambda s: self._client.fail(s, task_id, error))

    # -- helpers -----------------------------------------------------------------------------
    def _end_old_session(self) -> None:
        """Before registering again, end this process's old session, so that what it may
        still hold goes back to the queue at once (one try each)."""
        if self.session is None:
            return
        with contextlib.suppress(DanError):  # already over, or unreachable: leases run out
            self._client.offline(self.session)

    def _long_poll(self, session: Registration) -> ClaimAnswer | None:
        """The claim's answer; None as soon as the node is stopping (the request is left to
        end by itself: a stopping node does not wait out a long-poll)."""
        outcome: list[ClaimAnswer | BaseException] = []
        done = threading.Event()

        def poll() -> None:
            try:
                outcome.append(self._client.claim(session, self._loaded(), self._wait_s))
            except BaseException as exc:
                outcome.append(exc)
            finally:
                done.set()

        self._poller = threading.Thread(target=poll, name="claim", daemon=True)
        self._poller.start()
        while not done.wait(0.1):
            if self._stop.is_set():
                return None
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _finish(self, task_id: str, send: Callable[[Registration], None]) -> bool:
        if self.session is None:
            return False
        try:
            send(self.session)
            return True
        except (TaskNotHeld, NodeNotFound):
            return False
        except ResultRefused as exc:
            log.error("the server refused the result of task %s: %s", task_id, exc.message)
            return False
        except ServerUnreachable:
            raise  # the worker loop tries again for a while
        except DanError as exc:
            log.error("could not report task %s to the server: %s", task_id, exc.message)
            return False


class RemoteFiles:
    """The TaskFiles of a remote node: input images are fetched from the server and results
    uploaded to it, while the node holds the task (else TaskCancelled: the task was lost)."""

    def __init__(self, client: NodeClient, session: Callable[[], Registration | None]) -> None:
        self._client, self._session = client, session

    def get(self, key: str) -> bytes:
        try:
            return self._client.get_input(self._current(), _task_of(key), key)
        except InvalidArgument as exc:
            raise KeyError(key) from exc
        except (TaskNotHeld, NodeNotFound) as exc:
            raise TaskCancelled("the lease was lost") from exc

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_result(self._current(), _task_of(key), key, data)
        except (TaskNotHeld, NodeNotFound, ResultRefused) as exc:
            raise TaskCancelled(f"the result was not taken: {exc.message}") from exc

    def _current(self) -> Registration:
        session = self._session()
        if session is None:
            raise TaskCancelled("the node is not registered")
        return session


def _task_of(key: str) -> str:
    return key.split("/", 1)[0]
