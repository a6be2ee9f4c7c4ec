"""First start: make sure there is a checkpoint to serve, or say how to add one."""

from __future__ import annotations

import logging

from dan.config import Settings
from dan.errors import DanError
from dan.models.download import pull
from dan.models.registry import ModelRegistry
from dan.models.sources import DownloadSources

log = logging.getLogger(__name__)


def ensure_default_checkpoint(registry: ModelRegistry, settings: Settings) -> None:
    """Pull the catalog's default checkpoint when none is installed and downloads are allowed.

    Never raises: offline, the server keeps serving and the log says how to add a model.
    """
    if registry.default_checkpoint(settings.default_model) is not None:
        return
    folder = registry.folder(registry.catalog.default_checkpoint.kind)
    how = (
        f"put a Stable Diffusion 1.x .safetensors file into {folder} "
        f"or run `dan models pull {registry.catalog.default_checkpoint.name}`"
    )
    if not settings.download:
        log.warning("no checkpoint is installed; %s", how)
        return
    entry = registry.catalog.default_checkpoint
    sources = DownloadSources.from_settings(settings)
    url = sources.url_for(entry.url)
    log.info("no checkpoint is installed; downloading %s from %s", entry.name, url)
    try:
        pull(entry, settings.models_dir, progress=False, hashes=registry.hashes, sources=sources)
    except (DanError, OSError) as exc:
        log.warning("could not download %s (%s); %s", entry.name, exc, how)
        return
    registry.scan()
    log.info("installed %s", entry.name)
