"""The HTTP API of an AUTOMATIC1111 instance (or Forge, or a DAN server's ``/sdapi/v1``).

Errors are sorted once, here, by what they mean for the task:

- the instance cannot be reached (connection refused or cut, a proxy's 502), or refuses the
  node's credentials: :class:`A1111Unreachable`, a FatalEngineError, so the worker loop stops,
  the node hands its task back to the server (one try of the task) and waits for the instance;
- any other refusal or error answer (a 404 "Model not found", a 422, a 500 out of memory):
  :class:`A1111Refused`, an EngineError with the instance's own message, which fails that
  task alone.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from dan.errors import EngineError, FatalEngineError

log = logging.getLogger(__name__)

# Quick calls (listings, progress, interrupt) and the blocking generation calls, which answer
# only when the images are done: no read timeout there (the server's time limit and cancel end
# a run that takes too long, through the engine's interrupt).
QUICK_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
GENERATION_TIMEOUT = httpx.Timeout(None, connect=10.0, write=60.0)
_DOWN_STATUSES = frozenset({401, 403, 502})


class A1111Refused(EngineError):
    """The AUTOMATIC1111 instance refused the request, or answered it with an error."""


class A1111Unreachable(FatalEngineError):
    """The AUTOMATIC1111 instance cannot be reached; the task goes back to the server and the
    node waits until the instance answers again."""


class A1111Client:
    """The endpoints of one instance at ``url``, with HTTP Basic credentials (what A1111's
    ``--api-auth`` checks) or a DAN API key (when the instance is a DAN server), or neither.
    Thread-safe (one httpx client, whose pool serves concurrent calls)."""

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        auth = httpx.BasicAuth(user, password or "") if user else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._own_http = http is None
        self._http = http or httpx.Client(
            base_url=self.url, auth=auth, headers=headers, timeout=QUICK_TIMEOUT, trust_env=False
        )

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> A1111Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """The JSON answer to ``GET path``; raises as the module docstring says."""
        return self._send("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any], *, timeout: httpx.Timeout | None = None) -> Any:
        """The JSON answer to ``POST path`` with ``body``; raises as the module docstring says."""
        return self._send("POST", path, json=body, timeout=timeout or QUICK_TIMEOUT)

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise A1111Unreachable(
                f"the AUTOMATIC1111 instance at {self.url} does not answer {method} {path} "
                f"({exc!r}); is it running, started with --api?"
            ) from exc
        if response.status_code in _DOWN_STATUSES:
            raise A1111Unreachable(_down_message(self.url, path, response))
        if response.status_code >= 400:
            raise A1111Refused(
                f"the AUTOMATIC1111 instance refused {method} {path}: "
                f"HTTP {response.status_code}: {_detail(response)}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise EngineError(
                f"the AUTOMATIC1111 instance answered {method} {path} with something that is "
                f"not JSON: {response.text[:200]!r}"
            ) from exc


def _down_message(url: str, path: str, response: httpx.Response) -> str:
    if response.status_code == 502:
        return f"the proxy in front of {url} answered 502 for {path}: the instance is down"
    return (
        f"the AUTOMATIC1111 instance at {url} refused this node's credentials "
        f"(HTTP {response.status_code} for {path}: {_detail(response)}); give the user and "
        "password of its --api-auth with --a1111-user and --a1111-password, or a DAN server's "
        "key with --a1111-api-key"
    )


def _detail(response: httpx.Response) -> str:
    """The instance's own words: A1111's ``detail`` or ``errors``, a DAN ``message``, or the
    start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "message", "errors", "error"):
            if body.get(key):
                return str(body[key])[:500]
    return str(body)[:300]
