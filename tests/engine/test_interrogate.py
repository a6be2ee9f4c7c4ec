"""Interrogate end to end in the engine: the real BLIP, CLIP and DeepDanbooru code on tiny
random-weight models, with the packaged term lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL.Image import Image

from dan.domain import InstalledModel, InterrogateRequest, ModelKind, ModelRef
from dan.engine.interrogation.clip_ranker import packaged_term_lists
from dan.engine.interrogation.deepdanbooru import DeepDanbooru, format_tag
from dan.engine.interrogation.interrogate import Interrogators
from dan.errors import EngineError
from dan.models.hashing import sha256_file
from tests.fixtures.tiny_blip import blip_state_dict, write_blip_checkpoint, write_vocabulary
from tests.fixtures.tiny_clip import clip_state_dict, write_torchscript
from tests.fixtures.tiny_deepdanbooru import write_tiny_tagger

CPU = torch.device("cpu")


def installed(path: Path) -> InstalledModel:
    return InstalledModel(
        ModelKind.INTERROGATOR, path.stem, sha256_file(path), path, path.stat().st_size
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, InstalledModel]:
    """The tiny interrogator files by role, named as the catalog names the real ones."""
    folder = tmp_path_factory.mktemp("interrogators")
    paths = {
        "blip": write_blip_checkpoint(
            blip_state_dict(), folder / "model_base_caption_capfilt_large.pth"
        ),
        "blip_vocab": write_vocabulary(folder / "bert-base-uncased-vocab.txt"),
        "clip": write_torchscript(clip_state_dict(), folder / "ViT-L-14.pt"),
        "tagger": write_tiny_tagger(folder / "model-resnet_custom_v3.pt"),
    }
    return {role: installed(path) for role, path in paths.items()}


@pytest.fixture(scope="module")
def interrogators(tmp_path_factory: pytest.TempPathFactory) -> Interrogators:
    return Interrogators(CPU, torch.float32, tmp_path_factory.mktemp("cache"))


def request(model: str, files: dict[str, InstalledModel], *roles: str) -> InterrogateRequest:
    refs = {role: ModelRef(files[role].sha256, files[role].name) for role in roles}
    return InterrogateRequest("task/input.png", model, refs)


def by_hash(files: dict[str, InstalledModel]) -> dict[str, InstalledModel]:
    return {model.sha256: model for model in files.values()}


@pytest.fixture
def image() -> Image:
    rng = np.random.default_rng(3)
    return PILImage.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB")


def test_clip_caption_is_blip_text_then_one_ranked_term_per_packaged_list(
    interrogators: Interrogators, files: dict[str, InstalledModel], image: Image
) -> None:
    steps: list[tuple[int, int]] = []
    clip = request("clip", files, "blip", "blip_vocab", "clip")
    caption = interrogators.interrogate(clip, image, by_hash(files), lambda *s: steps.append(s))
    blip_text, *terms = caption.split(", ")
    assert blip_text.strip()
    # A1111's lists: artists ("by ..."), flavors, mediums, movements, one term each.
    lists = packaged_term_lists()
    assert len(terms) >= len(lists)
    assert terms[-4].startswith("by ") and terms[-4][3:] in lists[0].terms
    assert terms[-1] in lists[3].terms
    assert steps[-1] == (2, 2)
    assert interrogators.interrogate(clip, image, by_hash(files), lambda *s: None) == caption


def test_deepdanbooru_lists_tags_by_confidence_in_a1111_format(
    interrogators: Interrogators, files: dict[str, InstalledModel], image: Image
) -> None:
    tagging = request("deepdanbooru", files, "tagger")
    caption = interrogators.interrogate(tagging, image, by_hash(files), lambda *s: None)
    scores = DeepDanbooru.load(files["tagger"].path, CPU, torch.float32).predict(image)
    kept = sorted(
        ((p, tag) for tag, p in scores if p >= 0.5 and not tag.startswith("rating:")),
        key=lambda pair: -pair[0],
    )
    assert len(kept) >= 2  # the tiny tagger is sure of some tags for this image
    assert caption == ", ".join(format_tag(tag) for _, tag in kept)


def test_a_request_without_its_files_fails_the_task_clearly(
    interrogators: Interrogators, files: dict[str, InstalledModel], image: Image
) -> None:
    clip = request("clip", files, "blip", "clip")  # no vocabulary
    with pytest.raises(EngineError, match="no blip_vocab file"):
        interrogators.interrogate(clip, image, by_hash(files), lambda *s: None)
