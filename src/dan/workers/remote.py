"""A node's connection to a DAN server: the WorkQueue and the task files, over HTTP(S).

The node connects out (it works behind NAT) with its owner's API key and never touches the
database. ``NodeClient`` has one method per ``/api/node/...`` endpoint; requests that a network
cut or a server restart breaks (connection errors, 5xx answers) are retried with exponential
backoff until they get through or the node is stopping, so a cut never kills the node.

``RemoteQueue`` is what the worker loop (dan.workers.loop) runs on. Heartbeats do not go over
the network in the engine's step callback: a beat thread sends the latest progress a few times
a second and keeps the server's last answer, which is what the step callback reads, so a
cancelled task stops at the first step after the server said so, and a slow or cut network
never slows the engine. While the network is cut the last answer stands and the task runs on;
if the lease ran out meanwhile, the first answer after the cut says so and the task is dropped
(its result would be refused anyway: the server only takes results from the holder).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from dan.domain import ClaimedTask, TaskKind, TaskResult
from dan.errors import (
    DanError,
    InvalidArgument,
    NodeNotFound,
    PermissionDenied,
    TaskCancelled,
    TaskNotHeld,
)
from dan.nodes.service import NodeDescription
from dan.tasks.store import Heartbeat

log = logging.getLogger(__name__)

MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
CLAIM_WAIT_S = 20.0  # the long-poll the node asks for
BEAT_S = 0.3  # how often a running task's progress is sent (and its cancel flag read)
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
HEARTBEAT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


class ServerUnreachable(DanError):
    """The server could not be reached (or answered with a server error), and the node is
    stopping or the request is not one to retry."""

    code = 2000
    http_status = 503


@dataclass(frozen=True)
class Registration:
    node_id: str
    lease_s: float


@dataclass(frozen=True)
class ClaimAnswer:
    task: ClaimedTask | None
    pull: tuple[str, ...]


class NodeClient:
    """The ``/api/node/...`` endpoints of one server, as one node's owner (``api_key``).

    Every method retries connection errors and 5xx answers until ``stop`` is set (then
    ServerUnreachable), except ``heartbeat`` and ``offline``, which try once. A definitive
    answer is raised as the DanError the server named: NodeNotFound (register again),
    TaskNotHeld (the task went elsewhere), PermissionDenied (the key may not run this node),
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
        body = {
            "name": description.name,
            "capabilities": description.capabilities,
            "installed": sorted(description.installed),
            "loaded": sorted(description.loaded),
        }
        data = self._post("/api/node/register", body)
        return Registration(str(data["nodeId"]), float(data["leaseS"]))

    def claim(self, node_id: str, loaded: frozenset[str], wait_s: float) -> ClaimAnswer:
        body = {"nodeId": node_id, "loaded": sorted(loaded), "waitS": wait_s}
        timeout = httpx.Timeout(wait_s + 30.0, connect=10.0)
        data = self._post("/api/node/claim", body, timeout=timeout)
        raw = data.get("task")
        task = None
        if raw is not None:
            task = ClaimedTask(
                id=raw["id"],
                kind=TaskKind(raw["kind"]),
                params=raw["params"],
                attempt=raw["attempt"],
            )
        return ClaimAnswer(task, tuple(data.get("pull") or ()))

    def heartbeat(self, node_id: str, task_id: str, progress: float | None) -> Heartbeat:
        body = {"nodeId": node_id, "taskId": task_id, "progress": progress}
        data = self._post("/api/node/heartbeat", body, retry=False, timeout=HEARTBEAT_TIMEOUT)
        return Heartbeat(held=bool(data["held"]), cancel_requested=bool(data["cancelRequested"]))

    def get_input(self, node_id: str, task_id: str, key: str) -> bytes:
        params = {"nodeId": node_id, "taskId": task_id, "key": key}
        return self._request("GET", "/api/node/input", params=params).content

    def put_result(self, node_id: str, task_id: str, key: str, data: bytes) -> None:
        params = {"nodeId": node_id, "taskId": task_id, "key": key}
        headers = {"Content-Type": "image/png"}
        self._request("PUT", "/api/node/result", params=params, content=data, headers=headers)

    def complete(self, node_id: str, task_id: str, result: TaskResult) -> None:
        payload: dict[str, Any] = {
            "image_keys": list(result.image_keys),
            "seeds": list(result.seeds),
            "caption": result.caption,
        }
        self._post("/api/node/complete", {"nodeId": node_id, "taskId": task_id, "result": payload})

    def fail(self, node_id: str, task_id: str, error: str) -> None:
        self._post("/api/node/fail", {"nodeId": node_id, "taskId": task_id, "error": error})

    def offline(self, node_id: str) -> int:
        data = self._post("/api/node/offline", {"nodeId": node_id}, retry=False)
        return int(data.get("released", 0))

    # -- helpers -----------------------------------------------------------------------------
    def _post(
        self, path: str, body: dict[str, Any], *, retry: bool = True, timeout: Any = None
    ) -> dict[str, Any]:
        return _data(self._request("POST", path, json=body, retry=retry, timeout=timeout))

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


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message") or response.text[:200])
    except ValueError:
        return response.text[:200]


def _checked(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded, else the DanError the server answered with."""
    status = response.status_code
    if status < 400:
        return response
    message = _message(response)
    if status == 409:
        raise TaskNotHeld(message)
    if status == 404 and _data(response).get("nodeId"):
        raise NodeNotFound(message)
    if status in (401, 403):
        raise PermissionDenied(message)
    if status == 404:
        path = response.request.url.path
        raise DanError(f"{path}: {message}; is this a DAN server that takes nodes?")
    raise InvalidArgument(message)


def _data(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json().get("data")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


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
        beat_s: float = BEAT_S,
    ) -> None:
        self._client, self._describe = client, describe
        self._stop, self._loaded, self._on_pull = stop, loaded, on_pull
        self._wait_s, self._beat_s = wait_s, beat_s
        self.node_id: str | None = None
        self.lease_s = 30.0
        self.fatal: DanError | None = None  # why the node had to stop, if it had to
        self._registered = threading.Event()
        self._cond = threading.Condition()
        self._current: str | None = None  # the task being run
        self._progress: float | None = None
        self._answer = Heartbeat(held=True, cancel_requested=False)
        self._beats = threading.Thread(target=self._beat_forever, name="beats", daemon=True)
        self._poller: threading.Thread | None = None  # the latest claim's request

    # -- registration ------------------------------------------------------------------------
    def register(self) -> str:
        """Register (or refresh) the node on the server; retried until it gets through."""
        registration = self._client.register(self._describe())
        self.node_id, self.lease_s = registration.node_id, registration.lease_s
        self._registered.set()
        log.info("registered as node %s", self.node_id)
        return self.node_id

    def refresh(self) -> None:
        """Register again before the next claim (what the node has installed changed)."""
        self._registered.clear()

    def close(self, *, wait_s: float = 0.0) -> None:
        """Stop sending heartbeats; wait up to ``wait_s`` for a claim still in flight."""
        with self._cond:
            self._current = None
            self._cond.notify_all()
        poller = self._poller
        if poller is not None and wait_s > 0:
            poller.join(wait_s)

    # -- WorkQueue ---------------------------------------------------------------------------
    def claim(self, worker_id: str, *, lease_s: float) -> ClaimedTask | None:
        try:
            if not self._registered.is_set() or self.node_id is None:
                self.register()
            answer = self._long_poll(self.node_id)
            if answer is None:
                return None
        except NodeNotFound:
            log.warning("the server forgot this node; registering again")
            self._registered.clear()
            return None
        except PermissionDenied as exc:
            log.error("the server refuses this node: %s", exc.message)
            self.fatal = exc
            self._stop.set()
            return None
        except ServerUnreachable:
            return None  # only when stopping
        if answer.pull:
            self._on_pull(answer.pull)
        if answer.task is not None:
            self._start_beats(answer.task.id)
        return answer.task

    def heartbeat(
        self, task_id: str, worker_id: str, *, lease_s: float, progress: float | None = None
    ) -> Heartbeat:
        with self._cond:
            if task_id != self._current:
                return Heartbeat(held=False, cancel_requested=True)
            if progress is not None:
                self._progress = progress
            return self._answer

    def complete(self, task_id: str, worker_id: str, result: TaskResult) -> bool:
        self._stop_beats()
        return self._finish(task_id, lambda node: self._client.complete(node, task_id, result))

    def fail(self, task_id: str, worker_id: str, error: str) -> bool:
        self._stop_beats()
        return self._finish(task_id, lambda node: self._client.fail(node, task_id, error))

    # -- helpers -----------------------------------------------------------------------------
    def _long_poll(self, node_id: str | None) -> ClaimAnswer | None:
        """The claim's answer; None as soon as the node is stopping (the request is left to
        end by itself: a stopping node does not wait out a long-poll)."""
        assert node_id is not None
        outcome: list[ClaimAnswer | BaseException] = []
        done = threading.Event()

        def poll() -> None:
            try:
                outcome.append(self._client.claim(node_id, self._loaded(), self._wait_s))
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

    def _finish(self, task_id: str, send: Callable[[str], None]) -> bool:
        if self.node_id is None:
            return False
        try:
            send(self.node_id)
            return True
        except TaskNotHeld:
            return False
        except DanError as exc:
            log.error("could not report task %s to the server: %s", task_id, exc.message)
            return False

    def _start_beats(self, task_id: str) -> None:
        with self._cond:
            self._current, self._progress = task_id, None
            self._answer = Heartbeat(held=True, cancel_requested=False)
            self._cond.notify_all()
        if not self._beats.is_alive():
            self._beats.start()

    def _stop_beats(self) -> None:
        with self._cond:
            self._current = None

    def _beat_forever(self) -> None:
        delay = self._beat_s
        while True:
            with self._cond:
                while self._current is None:
                    self._cond.wait()
                task_id, progress = self._current, self._progress
            answer = self._beat(task_id, progress)
            delay = self._beat_s if answer is not None else min(delay * 2, 5.0)
            with self._cond:
                if answer is not None and self._current == task_id:
                    self._answer = answer
                self._cond.wait(delay)

    def _beat(self, task_id: str, progress: float | None) -> Heartbeat | None:
        node_id = self.node_id
        if node_id is None:
            return None
        try:
            return self._client.heartbeat(node_id, task_id, progress)
        except DanError as exc:
            log.warning("heartbeat of task %s failed (%s); the task runs on", task_id, exc.message)
            return None


class RemoteFiles:
    """The TaskFiles of a remote node: input images are fetched from the server and results
    uploaded to it, while the node holds the task (else TaskCancelled: the task was lost)."""

    def __init__(self, client: NodeClient, node_id: Callable[[], str | None]) -> None:
        self._client, self._node_id = client, node_id

    def get(self, key: str) -> bytes:
        try:
            return self._client.get_input(self._node(), _task_of(key), key)
        except InvalidArgument as exc:
            raise KeyError(key) from exc
        except TaskNotHeld as exc:
            raise TaskCancelled("the lease was lost") from exc

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_result(self._node(), _task_of(key), key, data)
        except TaskNotHeld as exc:
            raise TaskCancelled("the lease was lost") from exc

    def _node(self) -> str:
        node_id = self._node_id()
        if node_id is None:
            raise TaskCancelled("the node is not registered")
        return node_id


def _task_of(key: str) -> str:
    return key.split("/", 1)[0]
