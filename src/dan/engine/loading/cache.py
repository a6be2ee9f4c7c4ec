"""Loaded models kept warm: checkpoints in an LRU cache with a memory budget, auxiliary
models one at a time."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from dan.domain import InstalledModel
from dan.engine.generation.preview import LatentPreviewer

if TYPE_CHECKING:
    from dan.engine.families import Architecture, Family

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class LoadedCheckpoint:
    pipeline: Any  # the family's txt2img pipeline, only read: tasks build their own around it
    architecture: Architecture
    model_bytes: int  # its models' weights
    previewer: LatentPreviewer  # step previews from its latents
    family: Family
    fast_unet: Any | None = None  # the UNet of plain requests, compiled per shape (or None)

    @property
    def size_bytes(self) -> int:
        """The memory it holds: its models, and the compiled forms of its UNet."""
        compiled = self.fast_unet.compiler.held_bytes if self.fast_unet is not None else 0
        return self.model_bytes + compiled

    def close(self) -> None:
        """It was unloaded: free what its fast path holds and stop compiling for it."""
        if self.fast_unet is not None:
            self.fast_unet.compiler.close()


class PipelineCache:
    """Loaded checkpoints by sha256, least recently used evicted beyond a memory budget.

    The entry in use is never evicted, so one checkpoint larger than the budget still loads.
    """

    def __init__(
        self, budget_bytes: int, load: Callable[[InstalledModel], LoadedCheckpoint]
    ) -> None:
        self._budget = budget_bytes
        self._load = load
        self._entries: OrderedDict[str, LoadedCheckpoint] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, model: InstalledModel) -> LoadedCheckpoint:
        with self._lock:
            entry = self._entries.get(model.sha256)
            if entry is None:
                entry = self._load(model)
                self.loads += 1
                self._entries[model.sha256] = entry
            self._entries.move_to_end(model.sha256)
            self._evict()
            return entry

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def _evict(self) -> None:
        while len(self._entries) > 1 and self._total() > self._budget:
            sha, entry = self._entries.popitem(last=False)
            entry.close()
            log.info("unloaded checkpoint %s (memory budget)", sha[:10])

    def _total(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())


def pipeline_bytes(pipeline: Any) -> int:
    """The bytes of every model of ``pipeline`` (UNet, VAE, each text encoder)."""
    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    return sum(module_bytes(m) for m in modules)


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of ``module``'s parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


class WarmModel(Generic[T]):
    """The model last loaded from a file, kept warm until a task asks for another file.

    For the auxiliary models one worker uses one of at a time (an interrogator part, the
    OpenPose body model): only the latest is held, so they never pile up in memory.
    """

    def __init__(self, load: Callable[..., T]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[str, ...], T] | None = None

    def get(self, *models: InstalledModel) -> T:
        """``load(*models)``, kept until other files are asked for (the previous model is
        dropped before the new one loads)."""
        key = tuple(model.sha256 for model in models)
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # free the old one before loading the new one
                self._loaded = (key, self._load(*models))
                log.info("loaded %s", ", ".join(f"{m.name} ({m.sha256[:10]})" for m in models))
            return self._loaded[1]
