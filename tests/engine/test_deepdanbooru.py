"""The DeepDanbooru tagger on tiny random-weight copies written like the published file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from PIL.Image import Image

from dan.engine.interrogation.deepdanbooru import (
    HEAD_KEY,
    TAGS_KEY,
    DeepDanbooru,
    UnsupportedTagger,
    build_network,
    format_caption,
    format_tag,
    image_tensor,
)
from dan.errors import EngineError
from tests.engine.conftest import CPU
from tests.fixtures.tiny_deepdanbooru import TAGS, tiny_state_dict, write_tagger, write_tiny_tagger

REAL_TAG_COUNT = 9176
REAL_PARAMETERS = 160_956_544  # x 4 bytes = 644 MB, the size of model-resnet_custom_v3.pt


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run the tiny networks on one thread: their layers are too small to share out, and on a
    busy machine the threads wait on each other (20x slower with two threads than with one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tagger_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tagger(tmp_path_factory.mktemp("taggers") / "model-tiny.pt")


@pytest.fixture(scope="module")
def tagger(tagger_file: Path) -> DeepDanbooru:
    return DeepDanbooru.load(tagger_file, CPU, torch.float32)


@pytest.fixture(scope="module")
def image() -> Image:
    """A 96 x 64 RGB noise image (seed 0): not square, so the fill bands are exercised."""
    rng = np.random.default_rng(0)
    return PILImage.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))


def without_ratings(predictions: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(tag, p) for tag, p in predictions if not tag.startswith("rating:")]


# --- the architecture ------------------------------------------------------------------------


def test_full_width_network_has_the_published_layers_and_size() -> None:
    network = build_network(REAL_TAG_COUNT, device="meta")
    state = network.state_dict()
    assert sum(p.numel() for p in network.parameters()) == REAL_PARAMETERS
    assert {key.split(".")[0] for key in state} == {f"n_Conv_{n}" for n in range(179)}
    assert HEAD_KEY == "n_Conv_178.weight" and "n_Conv_178.bias" not in state
    assert state["n_Conv_0.weight"].shape == (64, 3, 7, 7)
    assert state[HEAD_KEY].shape == (REAL_TAG_COUNT, 4096, 1, 1)
    # The one block whose projection shortcut comes after its bottleneck convolutions.
    assert state["n_Conv_97.weight"].shape == (256, 1024, 1, 1)
    assert state["n_Conv_100.weight"].shape == (1024, 1024, 1, 1)


def test_a_narrow_network_keeps_the_layer_names() -> None:
    narrow = build_network(len(TAGS), base_width=2, device="meta").state_dict()
    full = build_network(REAL_TAG_COUNT, device="meta").state_dict()
    assert list(narrow) == list(full)
    assert narrow["n_Conv_0.weight"].shape == (2, 3, 7, 7)


# --- predictions -----------------------------------------------------------------------------


def test_predict_scores_every_tag_in_tag_order(tagger: DeepDanbooru, image: Image) -> None:
    predictions = tagger.predict(image)
    assert tagger.tags == TAGS
    assert [tag for tag, _ in predictions] == list(TAGS)
    assert all(0.0 <= p <= 1.0 for _, p in predictions)
    assert len({p for _, p in predictions}) == len(TAGS)  # the fixture's scores are spread out


def test_predictions_are_deterministic(
    tagger_file: Path, tagger: DeepDanbooru, image: Image
) -> None:
    first = tagger.predict(image)
    assert tagger.predict(image) == first
    assert DeepDanbooru.load(tagger_file, CPU, torch.float32).predict(image) == first


def test_predictions_depend_on_the_image(tagger: DeepDanbooru, image: Image) -> None:
    grey = PILImage.new("RGB", (64, 64), (128, 128, 128))
    assert tagger.predict(grey) != tagger.predict(image)


@pytest.mark.parametrize("base_width", [1, 4])
def test_the_width_is_read_from_the_file(tmp_path: Path, image: Image, base_width: int) -> None:
    path = write_tiny_tagger(tmp_path / "w.pt", base_width=base_width)
    tagger = DeepDanbooru.load(path, CPU, torch.float32)
    assert tagger.network.base_width == base_width
    assert len(tagger.predict(image)) == len(TAGS)


def test_loads_in_the_requested_dtype(tagger_file: Path, image: Image) -> None:
    tagger = DeepDanbooru.load(tagger_file, CPU, torch.bfloat16)
    assert {p.dtype for p in tagger.network.parameters()} == {torch.bfloat16}
    assert all(0.0 <= p <= 1.0 for _, p in tagger.predict(image))


# --- captions --------------------------------------------------------------------------------


def test_caption_by_confidence_lists_every_tag_most_confident_first(
    tagger: DeepDanbooru, image: Image
) -> None:
    predictions = without_ratings(tagger.predict(image))
    caption = tagger.caption(image, threshold=0.0, sort_alpha=False)
    expected = sorted(predictions, key=lambda item: -item[1])
    assert caption.split(", ") == [format_tag(tag) for tag, _ in expected]
    assert "hatsune miku \\(cosplay\\)" in caption.split(", ")
    assert "red \\(color\\)" in caption.split(", ")
    assert "\\\\m/" in caption.split(", ")
    assert "_" not in caption and "rating" not in caption


def test_caption_defaults_to_alphabetical_order(tagger: DeepDanbooru, image: Image) -> None:
    tags = sorted(tag for tag, _ in without_ratings(tagger.predict(image)))
    assert tagger.caption(image, threshold=0.0) == ", ".join(format_tag(tag) for tag in tags)


def test_a_higher_threshold_keeps_fewer_tags(tagger: DeepDanbooru, image: Image) -> None:
    scores = sorted(p for _, p in without_ratings(tagger.predict(image)))
    everything = tagger.caption(image, threshold=0.0).split(", ")
    fewer = tagger.caption(image, threshold=scores[len(scores) // 2]).split(", ")
    # A1111 keeps a tag whose score equals the threshold: only the top one survives here.
    top = tagger.caption(image, threshold=scores[-1])
    assert len(fewer) == len(scores) - len(scores) // 2 < len(everything)
    assert top and ", " not in top
    assert tagger.caption(image, threshold=min(1.0, scores[-1] + 1e-6)) == ""


def test_format_caption_follows_a1111_tag_multi() -> None:
    scores = [("b_tag", 0.9), ("rating:safe", 0.99), ("a_(x)", 0.9), ("c", 0.95), ("d", 0.1)]
    assert format_caption(scores, 0.5) == "a \\(x\\), b tag, c"
    assert format_caption(scores, 0.5, sort_alpha=False) == "c, b tag, a \\(x\\)"  # ties: tag order
    assert format_caption(scores, 0.96) == ""
    with pytest.raises(ValueError, match="between 0 and 1"):
        format_caption(scores, 1.5)


# --- preprocessing ---------------------------------------------------------------------------


def test_images_are_fitted_into_512_with_edge_bands() -> None:
    stripes = np.zeros((128, 256, 3), dtype=np.uint8)
    stripes[:64] = (255, 0, 0)
    stripes[64:] = (0, 0, 255)
    pixels = image_tensor(PILImage.fromarray(stripes).convert("RGBA"))
    assert pixels.shape == (1, 3, 512, 512) and pixels.dtype == torch.float32
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    # 256 x 128 scales to 512 x 256 centred; the bands above and below repeat the edge rows.
    assert torch.equal(pixels[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(pixels[0, :, 511, 0], torch.tensor([0.0, 0.0, 1.0]))


# --- bad files -------------------------------------------------------------------------------


def test_a_file_without_tags_is_refused(tmp_path: Path) -> None:
    path = write_tagger(dict(tiny_state_dict()), tmp_path / "no-tags.pt")
    with pytest.raises(EngineError, match=r"no-tags\.pt has no 'tags' entry"):
        DeepDanbooru.load(path, CPU, torch.float32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({TAGS_KEY: "1girl, solo"}, "has no 'tags' entry"),
        ({TAGS_KEY: list(TAGS), "epoch": 30}, "has entries that are not tensors: epoch"),
    ],
)
def test_entries_of_the_wrong_kind_are_refused(
    tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    path = write_tagger({**tiny_state_dict(), **extra}, tmp_path / "odd.pt")
    with pytest.raises(UnsupportedTagger, match=rf"odd\.pt {message}"):
        DeepDanbooru.load(path, CPU, torch.float32)


def test_a_missing_layer_is_named(tmp_path: Path) -> None:
    state: dict[str, object] = dict(tiny_state_dict())
    del state["n_Conv_50.weight"], state["n_Conv_50.bias"]
    state[TAGS_KEY] = list(TAGS)
    path = write_tagger(state, tmp_path / "holed.pt")
    with pytest.raises(UnsupportedTagger, match=r"holed\.pt .*missing n_Conv_50\.bias, n_Conv_50"):
        DeepDanbooru.load(path, CPU, torch.float32)


def test_unexpected_and_misshapen_layers_are_named(tmp_path: Path) -> None:
    state: dict[str, object] = dict(tiny_state_dict())
    state[TAGS_KEY] = list(TAGS)
    state["n_MatMul_0.weight"] = torch.zeros(3, 3)
    with pytest.raises(UnsupportedTagger, match=r"unexpected n_MatMul_0\.weight"):
        DeepDanbooru.load(write_tagger(state, tmp_path / "extra.pt"), CPU, torch.float32)
    del state["n_MatMul_0.weight"]
    state["n_Conv_13.weight"] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(UnsupportedTagger, match=r"n_Conv_13\.weight is \(4, 4, 1, 1\)"):
        DeepDanbooru.load(write_tagger(state, tmp_path / "shape.pt"), CPU, torch.float32)


def test_a_tag_list_that_does_not_fit_the_head_is_refused(tmp_path: Path) -> None:
    state: dict[str, object] = dict(tiny_state_dict())
    state[TAGS_KEY] = list(TAGS[:-1])
    with pytest.raises(UnsupportedTagger, match="lists 11 tags but its last layer scores 12"):
        DeepDanbooru.load(write_tagger(state, tmp_path / "short.pt"), CPU, torch.float32)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all"])
def test_an_unreadable_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(EngineError, match=r"cannot read tagger file broken\.pt"):
        DeepDanbooru.load(path, CPU, torch.float32)
    with pytest.raises(EngineError, match=r"cannot read tagger file missing\.pt"):
        DeepDanbooru.load(tmp_path / "missing.pt", CPU, torch.float32)
