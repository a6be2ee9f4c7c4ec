"""The error hierarchy. Each class's docstring is its default message.

Errors are raised where they arise and translated once, at the HTTP edge (``dan.api.errors``),
into the DAN envelope ``{code, message}`` and a matching HTTP status. ``code`` is the DAN error
code of the reference; ``http_status`` is what we answer with.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DanError(Exception):
    """Unknown error."""

    code: ClassVar[int] = -1
    http_status: ClassVar[int] = 500

    def __init__(self, message: str | None = None, **data: Any) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.data = data
        super().__init__(self.message)


class InvalidArgument(DanError):
    """Invalid argument."""

    code = 3000
    http_status = 400


class ModelNotFound(InvalidArgument):
    """No installed model matches that name or hash."""


class TaskNotFound(DanError):
    """No task with that taskId."""

    code = 3000
    http_status = 404


class PermissionDenied(DanError):
    """Permission denied."""

    code = 1000
    http_status = 403


class SignInOff(DanError):
    """Sign-in is off on this server: no provider is configured (an operator sets
    DAN_GITHUB_CLIENT_ID and DAN_GITHUB_CLIENT_SECRET, or DAN_OIDC_ISSUER, DAN_OIDC_CLIENT_ID
    and DAN_OIDC_CLIENT_SECRET); ask its admin for an API key."""

    code = 3000
    http_status = 404


class SignInFailed(InvalidArgument):
    """Signing in failed; start again from the sign-in button."""


class TooManyKeys(DanError):
    """This account has as many active API keys as the server allows; revoke one first."""

    code = 3000
    http_status = 409


class ResourceUnavailable(DanError):
    """The resource is unavailable right now."""

    code = 2000
    http_status = 503


class SyncTimeout(ResourceUnavailable):
    """The task did not finish in time; it keeps running, poll it by taskId."""

    http_status = 504


class TooManyPendingTasks(DanError):
    """Too many pending images for this account; wait for some to finish."""

    code = 3002
    http_status = 429


class NodeError(DanError):
    """The task failed on the worker."""

    code = 4001
    http_status = 500


class NodeNotFound(DanError):
    """No node with that id; register it again."""

    code = 3000
    http_status = 404


class SessionEnded(NodeNotFound):
    """This node process's session is over (it stopped, or was silent too long); register
    again."""


class TooManyNodes(DanError):
    """This account has as many nodes, node processes or waiting claims as it may."""

    code = 3002
    http_status = 429


class NodeSuspect(PermissionDenied):
    """A result of this node failed its check; an admin must clear the node before it works
    again."""


class ResultRefused(InvalidArgument):
    """The result is not what the task asks for; the task went back to the queue."""


class TaskNotHeld(NodeError):
    """This node no longer holds the task (its lease ran out and the task went back to the
    queue, or it was finished elsewhere); the result was not recorded."""

    http_status = 409


class TaskCancelled(DanError):
    """The task was cancelled."""

    code = 2000
    http_status = 409


class TaskAbandoned(TaskCancelled):
    """The worker stops and leaves the task to run again (its server is gone)."""


# Errors of the model store and downloads (raised by dan.models, shown by the CLI).
class DownloadError(DanError):
    """The download failed."""

    code = 2000
    http_status = 502


class ChecksumMismatch(DownloadError):
    """The downloaded file's sha256 does not match the catalog; it was not installed."""


class DownloadUnauthorized(DownloadError):
    """The source refused the download without a valid token; ``data["setting"]`` names the
    setting that holds its token."""


# Errors of the engine, raised inside a worker.
class EngineError(DanError):
    """The engine could not run this task; the worker keeps serving."""

    code = 4001
    http_status = 500


class UnsupportedCheckpoint(EngineError):
    """This checkpoint is not a Stable Diffusion 1.x single-file checkpoint DAN can load."""


class FatalEngineError(EngineError):
    """The engine is broken (e.g. a CUDA error); the worker must exit and be restarted."""
