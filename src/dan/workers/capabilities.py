"""What a worker tells the server about itself: its device, the model families it can run, the
model files it has installed (by sha256 for the queue's filter, with their kind, name and family
so that the API can resolve requests against them) and the checkpoints its engine holds loaded
(for scheduling with affinity)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from dan.domain import InstalledModel, ModelFamily, ModelKind, TaskKind
from dan.engine.base import Engine
from dan.nodes.protocol import MAX_FILES
from dan.nodes.store import NodeFile

log = logging.getLogger(__name__)
MAX_PIXELS = 2048 * 2048  # the largest image the API accepts
GIB = 1024**3
# The least memory a family's pipeline runs in. On a GPU the weights are fp16: SDXL's UNet and
# two text encoders are ~3.5 G parameters (~7 GB), so 8 GiB cards are the floor it runs on.
# On the CPU they are fp32, twice that, next to the OS. SD 1.x (~1 G parameters) is what every
# node ran before families were reported, so it is never held back.
GPU_MEMORY_NEEDED: dict[ModelFamily, int] = {ModelFamily.SD15: 0, ModelFamily.SDXL: 8 * GIB}
HOST_MEMORY_NEEDED: dict[ModelFamily, int] = {ModelFamily.SD15: 0, ModelFamily.SDXL: 16 * GIB}


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
        NodeFile(model.sha256, model.kind, model.name, model.path.name, model.size, model.family)
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


def capabilities(
    engine: Engine,
    features: Iterable[TaskKind] = tuple(TaskKind),
    families: Iterable[ModelFamily] | None = None,
) -> dict[str, Any]:
    """Device and versions (the engine's own description), memory, limits, the task kinds
    it runs and (for people reading the node list) the model families it serves."""
    described = {
        **engine.describe(),
        "memory_bytes": _host_memory(),
        "max_pixels": MAX_PIXELS,
        "features": [kind.value for kind in features],
    }
    if families is not None:
        described["families"] = sorted(family.value for family in families)
    return described


def runnable_families(
    engine: Engine, only: Iterable[str] = (), *, host_memory: int | None = None
) -> frozenset[ModelFamily]:
    """The families the engine's device has the memory for (GPU_MEMORY_NEEDED on a GPU, what
    the engine describes as ``device_memory_bytes``; HOST_MEMORY_NEEDED on the CPU, which it
    describes as 0), narrowed to ``only`` (family names) when given. An engine that does not
    describe its memory, or a host whose memory cannot be read, is not held back: it knows
    its limits better than DAN."""
    wanted = {ModelFamily(name) for name in only} or set(ModelFamily)
    device = _device_memory(engine)
    if device is None:
        return frozenset(wanted)
    needed, available = GPU_MEMORY_NEEDED, device
    if device == 0:  # on the CPU
        needed, available = HOST_MEMORY_NEEDED, host_memory or _host_memory() or 0
        if not available:
            return frozenset(wanted)
    return frozenset(family for family in wanted if available >= needed[family])


def checkpoint_families(models: InstalledModels) -> frozenset[ModelFamily]:
    """The families of the installed checkpoints (a backend that runs what it has, like an
    AUTOMATIC1111 instance, runs the families of its checkpoints)."""
    return frozenset(
        model.family or ModelFamily.SD15 for model in models.list(ModelKind.CHECKPOINT)
    )


def _device_memory(engine: Engine) -> int | None:
    try:
        return int(engine.describe()["device_memory_bytes"])
    except (KeyError, TypeError, ValueError):
        return None


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
