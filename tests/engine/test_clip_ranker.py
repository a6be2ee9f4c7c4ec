"""The CLIP ranker on a tiny random OpenAI-layout CLIP: term lists, ranking, composition, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip  # type: ignore[import-untyped]
import pytest
import torch
from PIL import Image as PILImage
from PIL.Image import Image
from safetensors.torch import load_file

from dan.engine.interrogation.clip_ranker import ClipRanker, TermList, packaged_term_lists
from dan.errors import EngineError
from tests.fixtures.tiny_clip import clip_state_dict, write_state_dict, write_torchscript

CPU = torch.device("cpu")
ARTISTS = TermList("artists", ("Alice Smith", "Bob Jones", "Carol White", "Dan Brown"), 1, "by ")
FLAVORS = TermList(
    "flavors",
    ("highly detailed", "sharp focus", "trending on artstation", "soft light", "moody",
     "vibrant colors", "pastel", "grainy", "cinematic", "very " * 100 + "long"),
    3,
)  # fmt: skip
MEDIUMS = TermList("mediums", ("a photograph", "an oil painting", "a watercolor"), 1)
LISTS = (ARTISTS, FLAVORS, MEDIUMS)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip-weights")


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return clip_state_dict(seed=0)


@pytest.fixture(scope="module")
def weights(weights_dir: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """The tiny CLIP as a plain state-dict file."""
    return write_state_dict(state_dict, weights_dir / "tiny-clip.pt")


@pytest.fixture(scope="module")
def archive(weights_dir: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """The same tensors as a TorchScript archive, like OpenAI's ViT-L-14.pt."""
    return write_torchscript(state_dict, weights_dir / "tiny-clip-jit.pt")


@pytest.fixture(scope="module")
def ranker(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipRanker:
    return ClipRanker.load(
        weights, tmp_path_factory.mktemp("clip-cache"), CPU, torch.float32, LISTS
    )


def noise(seed: int, size: tuple[int, int] = (56, 40)) -> Image:
    """An RGB noise image, not square so that the centre crop matters."""
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --- term lists ------------------------------------------------------------------------------


def test_packaged_lists_are_a1111_categories_in_order() -> None:
    full = packaged_term_lists(limit=None)
    assert [(t.name, len(t.terms), t.top_count, t.prefix) for t in full] == [
        ("artists", 5265, 1, "by "),
        ("flavors", 100969, 1, ""),  # 100,970 lines, one of them blank
        ("mediums", 95, 1, ""),
        ("movements", 200, 1, ""),
    ]
    assert all(term == term.strip() and term for t in full for term in t.terms)
    assert full[0].terms[0] == "A. B. Jackson"


def test_packaged_lists_are_truncated_to_a1111_dict_limit_by_default() -> None:
    limited = packaged_term_lists()
    full = packaged_term_lists(limit=None)
    assert [len(t.terms) for t in limited] == [1500, 1500, 95, 200]
    assert all(a.terms == b.terms[: len(a.terms)] for a, b in zip(limited, full, strict=True))


def test_term_list_validates_its_values() -> None:
    with pytest.raises(ValueError, match="empty"):
        TermList("x", (), 1)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        TermList("x", ("a",), 0)


# --- ranking and composition -----------------------------------------------------------------


def test_rank_returns_every_term_best_first(ranker: ClipRanker) -> None:
    ranked = ranker.rank(noise(0), FLAVORS)
    assert sorted(text for text, _ in ranked) == sorted(FLAVORS.terms)
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert {text for text, _ in ranker.rank(noise(0), ARTISTS)} == {
        "by " + name for name in ARTISTS.terms
    }


def test_rank_matches_open_clips_own_loader_and_openai_preprocessing(
    ranker: ClipRanker, weights: Path
) -> None:
    reference = open_clip.load_openai_model(str(weights), precision="fp32", device="cpu")
    image = noise(1)
    # OpenAI's preprocessing by hand: shortest side to 32 (bicubic), centre crop, mean/std.
    resized = image.resize((int(32 * 56 / 40), 32), PILImage.Resampling.BICUBIC)
    left = round((resized.width - 32) / 2)
    pixels = torch.from_numpy(np.asarray(resized.crop((left, 0, left + 32, 32)), np.float32))
    mean, std = (
        torch.tensor(open_clip.OPENAI_DATASET_MEAN),
        torch.tensor(open_clip.OPENAI_DATASET_STD),
    )
    pixels = ((pixels / 255 - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        image_features = reference.encode_image(pixels, normalize=True)
        text_features = reference.encode_text(open_clip.tokenize(FLAVORS.texts), normalize=True)
    expected = (100 * image_features @ text_features.T).softmax(dim=-1)[0]
    by_text = dict(ranker.rank(image, FLAVORS))
    actual = torch.tensor([by_text[text] for text in FLAVORS.texts])
    assert torch.allclose(actual, expected, atol=1e-5)


def test_describe_appends_each_lists_best_terms_to_the_caption(ranker: ClipRanker) -> None:
    image = noise(2)
    description = ranker.describe(image, "a cat sitting on a sofa")
    best = [text for terms in LISTS for text, _ in ranker.rank(image, terms)[: terms.top_count]]
    assert description == "a cat sitting on a sofa, " + ", ".join(best)
    parts = description.split(", ")
    assert len(parts) == 1 + 1 + 3 + 1
    assert parts[1].startswith("by ") and parts[1][3:] in ARTISTS.terms
    assert set(parts[2:5]) <= set(FLAVORS.terms) and parts[5] in MEDIUMS.terms


def test_results_are_deterministic(ranker: ClipRanker, weights: Path, tmp_path: Path) -> None:
    image = noise(3)
    again = ClipRanker.load(weights, tmp_path, CPU, torch.float32, LISTS)
    assert ranker.describe(image, "x") == ranker.describe(image, "x") == again.describe(image, "x")
    assert ranker.rank(image, FLAVORS) == again.rank(image, FLAVORS)
    assert ranker.describe(noise(4), "x") != ranker.describe(image, "x")


def test_torchscript_archive_ranks_like_the_state_dict(
    ranker: ClipRanker, archive: Path, tmp_path: Path
) -> None:
    from_archive = ClipRanker.load(archive, tmp_path, CPU, torch.float32, [FLAVORS])
    assert from_archive.rank(noise(5), FLAVORS) == ranker.rank(noise(5), FLAVORS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ranks_like_float32(
    dtype: torch.dtype, ranker: ClipRanker, weights: Path, tmp_path: Path
) -> None:
    half = ClipRanker.load(weights, tmp_path, CPU, dtype, [FLAVORS])
    ranked = half.rank(noise(6), FLAVORS)
    assert sorted(text for text, _ in ranked) == sorted(FLAVORS.terms)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert ranked[0][0] == ranker.rank(noise(6), FLAVORS)[0][0]  # a clear winner survives


# --- the embedding cache ---------------------------------------------------------------------


def test_embeddings_are_cached_on_disk_and_reused(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ClipRanker.load(weights, tmp_path, CPU, torch.float32, LISTS)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert first.encoded_lists == len(files) == len(LISTS)
    cached = {f.name: load_file(f)["embeddings"] for f in files}
    assert sorted(t.shape[0] for t in cached.values()) == sorted(len(t.terms) for t in LISTS)
    stamps = {f: f.stat().st_mtime_ns for f in files}

    def refuse(*_: object) -> torch.Tensor:
        raise AssertionError("a cached list was encoded again")

    monkeypatch.setattr(ClipRanker, "encode_texts", refuse)
    second = ClipRanker.load(weights, tmp_path, CPU, torch.float32, LISTS)
    assert second.encoded_lists == 0
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert second.rank(noise(7), FLAVORS) == first.rank(noise(7), FLAVORS)


def test_a_changed_list_or_dtype_gets_its_own_cache_entry(weights: Path, tmp_path: Path) -> None:
    ClipRanker.load(weights, tmp_path, CPU, torch.float32, [MEDIUMS])
    changed = TermList("mediums", (*MEDIUMS.terms, "a charcoal drawing"), 1)
    assert ClipRanker.load(weights, tmp_path, CPU, torch.float32, [changed]).encoded_lists == 1
    assert ClipRanker.load(weights, tmp_path, CPU, torch.bfloat16, [MEDIUMS]).encoded_lists == 1
    assert ClipRanker.load(weights, tmp_path, CPU, torch.float32, [MEDIUMS]).encoded_lists == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_corrupt_cache_file_is_recomputed(weights: Path, tmp_path: Path) -> None:
    first = ClipRanker.load(weights, tmp_path, CPU, torch.float32, [FLAVORS])
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"not safetensors")
    second = ClipRanker.load(weights, tmp_path, CPU, torch.float32, [FLAVORS])
    assert second.encoded_lists == 1
    assert load_file(path)["embeddings"].shape[0] == len(FLAVORS.terms)
    assert second.rank(noise(8), FLAVORS) == first.rank(noise(8), FLAVORS)


# --- bad weights -----------------------------------------------------------------------------


def test_corrupt_weights_raise_an_engine_error_naming_the_file(
    archive: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "ViT-L-14.pt"
    corrupt.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(EngineError, match=r"ViT-L-14\.pt"):
        ClipRanker.load(corrupt, tmp_path, CPU, torch.float32, LISTS)


def test_missing_weights_raise_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"not found: .*absent\.pt"):
        ClipRanker.load(tmp_path / "absent.pt", tmp_path, CPU, torch.float32, LISTS)


def test_weights_of_another_layout_raise_an_engine_error(
    state_dict: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    wrong = {k: v for k, v in state_dict.items() if k != "text_projection"}
    path = write_state_dict(wrong, tmp_path / "not-clip.pt")
    with pytest.raises(EngineError, match=r"not-clip\.pt is not an OpenAI CLIP"):
        ClipRanker.load(path, tmp_path, CPU, torch.float32, LISTS)
    path = write_state_dict({"model": [1, 2]}, tmp_path / "list.pt")  # type: ignore[dict-item]
    with pytest.raises(EngineError, match=r"list\.pt"):
        ClipRanker.load(path, tmp_path, CPU, torch.float32, LISTS)
