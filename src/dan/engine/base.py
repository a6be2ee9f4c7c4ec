"""The Engine seam: what a worker asks of an image-generation backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from dan.domain import GenerationRequest, InstalledModel, ProgressCallback

if TYPE_CHECKING:
    from PIL.Image import Image

    from dan.config import Settings


class Engine(Protocol):
    """Runs one task at a time on one device.

    Implementations raise :class:`dan.errors.EngineError` for a task that cannot run (the
    worker fails that task and goes on), :class:`dan.errors.FatalEngineError` when the device is
    unusable (the worker exits), and let :class:`dan.errors.TaskCancelled` raised by
    ``progress`` propagate.
    """

    def txt2img(
        self, request: GenerationRequest, checkpoint: InstalledModel, progress: ProgressCallback
    ) -> list[Image]:
        """Images for ``request``, generated with the checkpoint file ``checkpoint``."""
        ...

    def describe(self) -> dict[str, str]:
        """Device, dtype and versions, for logs and node registration."""
        ...


def load_engine(settings: Settings) -> Engine:
    """The diffusers engine for ``settings`` (imports torch)."""
    from dan.engine.sd import DiffusersEngine

    return DiffusersEngine(settings)
