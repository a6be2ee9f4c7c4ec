"""What a worker tells the server about itself: its device, the model files it has installed
(by sha256 for the queue's filter, with their kind and name so that the API can resolve requests
against them) and the checkpoints its engine holds loaded (for scheduling with affinity)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from dan.domain import InstalledModel, ModelKind, TaskKind
from dan.engine.base import Engine
from dan.nodes.protocol import MAX_FILES
from dan.nodes.store import NodeFile

log = logging.getLogger(__name__)
MAX_PIXELS = 2048 * 2048  # the largest image the API accepts


@runtime_checkable
class _LoadedCheckpoints(Protocol):
    def loaded(self) -> list[str]: ...


class InstalledModels(Protocol):
    """What is installed, by kind: a ModelRegistry, or what an AUTOMATIC1111 instance has."""

    def list(self, kind: ModelKind) -> list[InstalledModel]: ...


def installed_files(registry: InstalledModels, *, limit: int = MAX_FILES) -> tuple[NodeFile, ...]:
    """Every usable installed model file, described (kind, name, file name, size): checkpoints
    first, then LoRAs, ControlNets, upscalers and the rest, each kind by name; blocked
    pickles are left out (the worker would refuse to load them). At most ``limit`` (what the
    server takes from one node): beyond it the last ones are left out, with a warning."""
    files = [
        NodeFile(model.sha256, model.kind, model.name, model.path.name, model.size)
        for kind in ModelKind
        for model in registry.list(kind)
    ]
    first: dict[str, NodeFile] = {}
    for file in files:  # a file copied under two names is reported once
        first.setdefault(file.sha256, file)
    unique = tuple(first.values())
    if len(unique) > limit:
        log.warning(
            "%d model files are installed; the server takes %d, so the last %d are left out",
            len(unique),
            limit,
            len(unique) - limit,
        )
    return unique[:limit]


def loaded_checkpoints(engine: Engine) -> frozenset[str]:
    """The sha256 of the checkpoints the engine keeps loaded; empty for engines that do not
    say (the diffusers engine does, through its pipeline cache; the AUTOMATIC1111 one itself)."""
    if isinstance(engine, _LoadedCheckpoints):
        return frozenset(engine.loaded())
    pipelines = getattr(engine, "pipelines", None)
    if isinstance(pipelines, _LoadedCheckpoints):
        return frozenset(pipelines.loaded())
    return frozenset()


def capabilities(engine: Engine, features: Iterable[TaskKind] = tuple(TaskKind)) -> dict[str, Any]:
    """Device and versions (the engine's own description), memory, limits and the task kinds
    it runs."""
    return {
        **engine.describe(),
        "memory_bytes": _host_memory(),
        "max_pixels": MAX_PIXELS,
        "features": [kind.value for kind in features],
    }


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
