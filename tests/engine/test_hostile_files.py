"""Hostile and broken model files: absurd shapes give an error naming the file and what is
wrong (the engine's error type, which fails the task with its message), never a raw torch error,
a crash or an attempt to allocate what the file does not hold. Each file is built in the real
format: safetensors written by safetensors (or by hand, for headers it would never write),
pickles by torch.save."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, ModelKind, ModelRef
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.families import load_checkpoint
from dan.engine.loading.architecture.sd15 import UNET
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.engine.loading.embeddings import embeddings_applied
from dan.errors import EngineError, UnsupportedCheckpoint
from tests.fixtures.tiny_sd import CLIP, TinySd, write_checkpoint

CONV_IN = UNET + "input_blocks.0.0.weight"
RES_CONV = UNET + "input_blocks.1.0.in_layers.2.weight"
# The last conv of level 0's two res blocks: the level's width is read from them.
LEVEL_0_OUT = [UNET + f"input_blocks.{i}.0.out_layers.3.weight" for i in (1, 2)]


def write_header(path: Path, header: dict[str, Any], data: bytes) -> Path:
    """A .safetensors file with exactly this header, as a hostile tool would write it."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def load(path: Path, cache_dir: Path, *, allow_ckpt: bool = False) -> None:
    load_checkpoint(
        path, cache_dir=cache_dir, dtype=torch.float32, device="cpu", allow_ckpt=allow_ckpt
    )


# --- checkpoints ----------------------------------------------------------------------------


def changed(tiny_sd: TinySd, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**tiny_sd.state_dict, **tensors}


@pytest.mark.parametrize(
    ("name", "tensors", "message"),
    [
        ("conv-0d", {CONV_IN: torch.tensor(1.0)}, r"input_blocks\.0\.0\.weight has shape \[\]"),
        (
            "conv-5d",
            {RES_CONV: torch.zeros(32, 32, 3, 3, 1)},
            r"in_layers\.2\.weight' has 5 dimensions .*no tensor of an SD 1\.x or SDXL "
            r"checkpoint, LoRA or VAE has more than 4",
        ),
        (
            "wrong-channels",
            {RES_CONV: torch.zeros(32, 35, 3, 3)},
            r"UNet tensors do not fit the architecture .*\[32, 35, 3, 3\] where the "
            r"architecture has \[32, 32, 3, 3\]",
        ),
        (
            # An empty tensor holds no bytes, whatever its other side: a config read from it
            # would ask for a terabyte-sized position table.
            "huge-empty",
            {CLIP + "embeddings.position_embedding.weight": torch.zeros(10**12, 0)},
            r"shape \[1000000000000, 0\]; no tensor of an SD 1\.x or SDXL checkpoint, LoRA "
            r"or VAE has a side longer than 131072",
        ),
        (
            # Within every bound, but a UNet that wide would be 600 GB of convolutions: it
            # is refused before it is built, since the file holds none of them.
            "wide-level",
            dict.fromkeys(LEVEL_0_OUT, torch.zeros(131072, 0, 3, 3)),
            r"UNet tensors do not fit the architecture .* where the architecture has \[131072",
        ),
    ],
)
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_absurd_checkpoint_shapes_are_refused_naming_the_file(
    tiny_sd: TinySd,
    tmp_path: Path,
    engine_cache_dir: Path,
    name: str,
    tensors: dict[str, torch.Tensor],
    message: str,
    fmt: str,
) -> None:
    path = write_checkpoint(changed(tiny_sd, **tensors), tmp_path / f"{name}.{fmt}", fmt=fmt)
    with pytest.raises(UnsupportedCheckpoint, match=rf"{name}\.{fmt}.*{message}"):
        load(path, engine_cache_dir, allow_ckpt=True)


@pytest.mark.parametrize(
    ("shape", "offsets", "message"),
    [
        ([10**6, 10**6], [0, 16], r"declares shape \[1000000, 1000000\] of F32 "),
        ([2**62, 2**62, 16], [0, 0], r"declares shape \[4611686018427387904, "),  # overflows u64
        ([4, 4], [0, 64], r"data offsets \[0, 64\] outside the file's 16 data bytes"),
        ([-1, 4], [0, 16], r"no valid shape \(\[-1, 4\]\)"),
    ],
)
def test_a_safetensors_header_is_checked_before_anything_is_loaded(
    tmp_path: Path,
    engine_cache_dir: Path,
    shape: list[int],
    offsets: list[int],
    message: str,
) -> None:
    header = {CONV_IN: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    path = write_header(tmp_path / "lying.safetensors", header, bytes(16))
    with pytest.raises(UnsupportedCheckpoint, match=rf"lying\.safetensors .*{message}"):
        load(path, engine_cache_dir)


def test_a_header_longer_than_the_file_is_refused(tmp_path: Path, engine_cache_dir: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 90_000_000) + b'{"a": ')
    with pytest.raises(UnsupportedCheckpoint, match=r"short\.safetensors .*90000000-byte header"):
        load(path, engine_cache_dir)


def test_the_engine_fails_the_task_with_that_message(tiny_sd: TinySd, tmp_path: Path) -> None:
    """The worker fails a task with the message of the EngineError the engine raises."""
    tensors = changed(tiny_sd, **{CONV_IN: torch.tensor(1.0)})
    path = write_checkpoint(tensors, tmp_path / "scalar.safetensors", fmt="safetensors")
    model = InstalledModel(ModelKind.CHECKPOINT, "scalar", "a" * 64, path, path.stat().st_size)
    engine = DiffusersEngine(
        Settings(data_dir=tmp_path / "data", device="cpu", dtype="float32")  # type: ignore[call-arg]
    )
    request = GenerationRequest(
        "a fox", "", 1, "Euler", 2, 7.0, 64, 64, model=ModelRef(model.sha256, model.name)
    )
    with pytest.raises(UnsupportedCheckpoint, match=r"scalar\.safetensors: tensor .* has shape"):
        engine.txt2img(request, {model.sha256: model}, lambda done, total: None)


# --- embeddings -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path, engine_cache_dir: Path) -> Any:
    loaded, _ = load_sd_pipeline(
        tiny_checkpoint,
        cache_dir=engine_cache_dir,
        dtype=torch.float32,
        device="cpu",
        allow_ckpt=False,
    )
    return loaded


def embedding(path: Path) -> InstalledModel:
    return InstalledModel(ModelKind.EMBEDDING, path.stem, "e" * 64, path, path.stat().st_size)


def a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    """A1111's .pt layout (what its training writes)."""
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem},
        path,
    )
    return path


def apply(pipeline: Any, path: Path) -> None:
    with embeddings_applied(pipeline, [embedding(path)]):
        pass


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (
            "wide.safetensors",
            r"wide\.safetensors has clip_l vectors 48 wide but this "
            r"checkpoint's text encoder takes 32",
        ),
        ("scalar.pt", r"scalar\.pt: its clip_l vectors have shape \[\]"),
        (
            "deep.safetensors",
            r"deep\.safetensors: its clip_l vectors have shape \[1, 1, 1, 2, 32\]",
        ),
        ("many.pt", r"many\.pt has 1000000000 clip_l vectors; an embedding has 1 to 75"),
        ("lying.safetensors", r"lying\.safetensors .*declares shape \[1000000000, 32\] of F32"),
    ],
)
def test_absurd_embeddings_are_refused_naming_the_file(
    pipeline: Any, tmp_path: Path, file: str, message: str
) -> None:
    path = tmp_path / file
    if file == "wide.safetensors":
        save_file({"emb_params": torch.zeros(2, 48)}, path)
    elif file == "scalar.pt":
        a1111_pt(path, torch.tensor(1.0))
    elif file == "deep.safetensors":
        save_file({"emb_params": torch.zeros(1, 1, 1, 2, 32)}, path)
    elif file == "many.pt":
        # A billion vectors over one stored float: a view torch.save keeps as it is.
        a1111_pt(path, torch.zeros(1).expand(10**9, 32))
    else:
        header = {"emb_params": {"dtype": "F32", "shape": [10**9, 32], "data_offsets": [0, 8]}}
        write_header(path, header, bytes(8))
    tokens = len(pipeline.tokenizer)
    with pytest.raises(EngineError, match=message):
        apply(pipeline, path)
    assert len(pipeline.tokenizer) == tokens


def test_a_sound_embedding_still_applies(pipeline: Any, tmp_path: Path) -> None:
    # A legacy (pre-1.6) file too: its storages are checked against the file before torch
    # allocates them (see test_pickled_files.py).
    old = tmp_path / "old.pt"
    torch.save({"emb_params": torch.randn(2, 32)}, old, _use_new_zipfile_serialization=False)
    fine = a1111_pt(tmp_path / "fine.pt", torch.randn(3, 32))
    for path in (fine, old, tmp_path / "one.safetensors"):
        if path.suffix == ".safetensors":
            save_file({"emb_params": torch.randn(32)}, path)  # one vector, diffusers' way
        with embeddings_applied(pipeline, [embedding(path)]) as words:
            assert words(f"a {path.stem}").startswith("a <dan-ti-0-0>")
