"""Interrogate: describe an image as AUTOMATIC1111 does.

- ``clip``: a BLIP caption (:mod:`dan.engine.interrogation.blip`) followed by the artist,
  medium, movement and flavour terms CLIP ViT-L/14 ranks best for the image
  (:mod:`dan.engine.interrogation.clip_ranker`).
- ``deepdanbooru``: the tags DeepDanbooru scores at least 0.5, most confident first
  (:mod:`dan.engine.interrogation.deepdanbooru`; A1111 sorts them alphabetically by default, but
  a caption that leads with the surest tags is what the reference's users get from the service).

Each part stays loaded on the worker's device until a task needs a different file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL.Image import Image

from dan.domain import InstalledModel, InterrogateRequest, ModelFiles, ProgressCallback
from dan.engine.interrogation.blip import BlipCaptioner
from dan.engine.interrogation.clip_ranker import ClipRanker
from dan.engine.interrogation.deepdanbooru import DeepDanbooru
from dan.engine.loading.cache import WarmModel
from dan.errors import EngineError


class Interrogators:
    """The interrogator models of one worker, loaded on first use."""

    def __init__(self, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> None:
        self._blip = WarmModel(
            lambda blip, vocab: BlipCaptioner.load(blip.path, vocab.path, device, dtype)
        )
        self._clip = WarmModel(
            lambda m: ClipRanker.load(
                m.path, cache_dir / "clip-terms", device, dtype, weights_sha256=m.sha256
            )
        )
        self._tagger = WarmModel(lambda m: DeepDanbooru.load(m.path, device, dtype))

    def interrogate(
        self,
        request: InterrogateRequest,
        image: Image,
        files: ModelFiles,
        progress: ProgressCallback,
    ) -> str:
        """The description of ``image``; raises EngineError for an unknown model or files the
        request does not carry, and what the models raise."""
        part = {role: files[ref.sha256] for role, ref in request.files.items()}
        with torch.inference_mode():
            if request.model == "clip":
                return self._clip_caption(image, part, progress)
            if request.model == "deepdanbooru":
                tagger = self._tagger.get(_part(part, "tagger"))
                tags = tagger.caption(image, sort_alpha=False)
                progress(1, 1)
                return tags
        raise EngineError(f"unknown interrogate model {request.model!r}")

    def _clip_caption(
        self, image: Image, part: dict[str, InstalledModel], progress: ProgressCallback
    ) -> str:
        captioner = self._blip.get(_part(part, "blip"), _part(part, "blip_vocab"))
        caption = captioner.caption(image)
        progress(1, 2)
        described = self._clip.get(_part(part, "clip")).describe(image, caption)
        progress(2, 2)
        return described


def _part(parts: dict[str, InstalledModel], role: str) -> InstalledModel:
    try:
        return parts[role]
    except KeyError:
        raise EngineError(f"this interrogate task names no {role} file") from None
