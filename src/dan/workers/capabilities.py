"""What a worker tells the server about itself: its device, the model files it has installed
(as sha256 for the queue's filter, and by kind and name so that the API can resolve requests
against them) and the checkpoints its engine holds loaded (for scheduling with affinity)."""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, runtime_checkable

from dan.domain import ModelKind, TaskKind
from dan.engine.base import Engine
from dan.models.registry import ModelRegistry

MAX_PIXELS = 2048 * 2048  # the largest image the API accepts
# The most capabilities JSON the server takes at registration (MAX_CAPABILITIES_BYTES of
# dan.api.routes.nodes, which workers may not import); a remote node's model list is cut to fit.
REGISTER_CAPABILITIES_BYTES = 1024 * 1024


@runtime_checkable
class _LoadedCheckpoints(Protocol):
    def loaded(self) -> list[str]: ...


def installed_hashes(registry: ModelRegistry) -> frozenset[str]:
    """The sha256 of every usable installed model file, of every kind (blocked pickles are
    left out: the worker would refuse to load them)."""
    return frozenset(model.sha256 for kind in ModelKind for model in registry.list(kind))


def loaded_checkpoints(engine: Engine) -> frozenset[str]:
    """The sha256 of the checkpoints the engine keeps loaded; empty for engines that do not
    say (the diffusers engine does, through its pipeline cache)."""
    pipelines = getattr(engine, "pipelines", None)
    if isinstance(pipelines, _LoadedCheckpoints):
        return frozenset(pipelines.loaded())
    return frozenset()


def model_report(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Every usable installed model as ``{kind, name, file, sha256, size}`` (``file`` is the
    file name, so the API matches ``name.safetensors`` as the registry does), checkpoints
    first, then LoRAs, ControlNets, upscalers and the rest, each kind by name. Blocked pickles
    are left out, as from :func:`installed_hashes`."""
    return [
        {
            "kind": model.kind.value,
            "name": model.name,
            "file": model.path.name,
            "sha256": model.sha256,
            "size": model.size,
        }
        for kind in ModelKind
        for model in registry.list(kind)
    ]


def capabilities(
    engine: Engine, registry: ModelRegistry, *, max_bytes: int | None = None
) -> dict[str, Any]:
    """Device and versions (the engine's own description), memory, limits, task kinds, and
    under ``"models"`` the :func:`model_report` of ``registry``.

    With ``max_bytes`` the model list is cut (from its end: checkpoints are kept longest) so
    that the whole JSON fits, and ``"models_left_out"`` says how many entries were dropped;
    the queue still sees every file through ``installed``, but the API can only resolve the
    reported ones by name."""
    described: dict[str, Any] = {
        **engine.describe(),
        "memory_bytes": _host_memory(),
        "max_pixels": MAX_PIXELS,
        "features": [kind.value for kind in TaskKind],
        "models": model_report(registry),
    }
    if max_bytes is not None:
        _fit(described, max_bytes)
    return described


def _fit(described: dict[str, Any], max_bytes: int) -> None:
    """Keep the longest head of ``described["models"]`` with which it is at most ``max_bytes``
    of JSON (a binary search: a node may have thousands of LoRAs)."""
    models: list[dict[str, Any]] = described["models"]
    if len(json.dumps(described)) <= max_bytes:
        return

    def size(kept: int) -> int:
        cut = {**described, "models": models[:kept], "models_left_out": len(models) - kept}
        return len(json.dumps(cut))

    low, high = 0, len(models)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if size(middle) <= max_bytes else (low, middle - 1)
    described["models"] = models[:low]
    described["models_left_out"] = len(models) - low


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
