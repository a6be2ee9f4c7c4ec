"""A1111's generation options on both families: clip skip, a VAE file instead of the
checkpoint's own, and textual-inversion embeddings named in the prompt. Each test would fail if
the engine ignored the option; tiny checkpoints, VAEs and embeddings are built at test time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from dan.config import Settings
from dan.domain import GenerationRequest, InstalledModel, ModelKind, ModelRef
from dan.engine.diffusers_engine import DiffusersEngine
from dan.engine.generation.prompts import encode_prompts
from dan.engine.loading.architecture.sd15 import VAE
from dan.engine.loading.checkpoint import load_sd_pipeline
from dan.errors import EngineError
from tests.fixtures.tiny_options import (
    embedding_vectors,
    tiny_vae_state_dict,
    write_sd15_embedding,
    write_sdxl_embedding,
)
from tests.fixtures.tiny_sd import write_checkpoint
from tests.fixtures.tiny_sdxl import build_tiny_sdxl

pytestmark = pytest.mark.slow
SD15, SDXL = "a" * 64, "c" * 64


def installed(path: Path, sha: str, kind: ModelKind = ModelKind.CHECKPOINT) -> InstalledModel:
    return InstalledModel(kind, path.stem, sha, path, path.stat().st_size)


def request(model: ModelRef, **fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "a red fox",
        "negative_prompt": "",
        "seed": 1,
        "sampler_name": "Euler",
        "steps": 2,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": model,
    }
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def no_progress(done: int, total: int) -> None:
    pass


def pixels(images: list[Any]) -> np.ndarray[Any, Any]:
    return np.stack([np.asarray(image, dtype=int) for image in images])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    data = tmp_path_factory.mktemp("options-engine")
    return DiffusersEngine(Settings(data_dir=data, device="cpu", dtype="float32"))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def sd15(tiny_checkpoint: Path) -> InstalledModel:
    return installed(tiny_checkpoint, SD15)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> InstalledModel:
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    write_checkpoint(build_tiny_sdxl(seed=0).state_dict, path, fmt="safetensors")
    return installed(path, SDXL)


def txt2img(engine: DiffusersEngine, files: list[InstalledModel], **fields: object) -> Any:
    """The request's images, as an array; ``files[0]`` is the checkpoint."""
    checkpoint = files[0]
    by_sha = {model.sha256: model for model in files}
    return pixels(engine.txt2img(request(checkpoint.ref, **fields), by_sha, no_progress))


# --- clip skip -------------------------------------------------------------------------------


def test_clip_skip_reads_the_encoder_as_if_its_last_layers_were_cut_off(
    tiny_checkpoint: Path, engine_cache_dir: Path
) -> None:
    # A1111's clip skip k: the output of layer -k through the final layer norm, which is what
    # the same text encoder with its last k - 1 layers removed returns.
    pipeline, _ = load_sd_pipeline(
        tiny_checkpoint,
        cache_dir=engine_cache_dir,
        dtype=torch.float32,
        device="cpu",
        allow_ckpt=False,
    )
    encoder = pipeline.text_encoder
    config = CLIPTextConfig.from_dict({**encoder.config.to_dict(), "num_hidden_layers": 1})
    cut = CLIPTextModel(config).eval()
    missing = cut.load_state_dict(encoder.state_dict(), strict=False)
    assert not missing.missing_keys
    args = (pipeline.tokenizer, "a red fox", "")
    kwargs: dict[str, Any] = {"device": "cpu", "dtype": torch.float32}
    ours, _ = encode_prompts(args[0], encoder, *args[1:], clip_skip=2, **kwargs)
    theirs, _ = encode_prompts(args[0], cut, *args[1:], **kwargs)
    last, _ = encode_prompts(args[0], encoder, *args[1:], **kwargs)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, last)


def test_clip_skip_changes_an_sd15_image(engine: DiffusersEngine, sd15: InstalledModel) -> None:
    base = txt2img(engine, [sd15])
    skipped = txt2img(engine, [sd15], clip_skip=2)
    assert np.abs(base - skipped).mean() > 1
    assert np.array_equal(txt2img(engine, [sd15]), base)  # nothing stays behind


def test_clip_skip_beyond_the_text_encoder_fails_the_task(
    engine: DiffusersEngine, sd15: InstalledModel
) -> None:
    with pytest.raises(EngineError, match="clip_skip 3 is more than the 2 layers"):
        txt2img(engine, [sd15], clip_skip=3)


def test_clip_skip_leaves_sdxl_as_a1111_does(engine: DiffusersEngine, sdxl: InstalledModel) -> None:
    # A1111 reads both SDXL encoders' penultimate layer whatever clip skip says (its
    # sdxl_clip_l_skip option is off by default); the value is still recorded in the infotext.
    assert np.array_equal(txt2img(engine, [sdxl], clip_skip=2), txt2img(engine, [sdxl]))


# --- VAE files -------------------------------------------------------------------------------


def vae_file(path: Path, state_dict: dict[str, torch.Tensor], sha: str) -> InstalledModel:
    save_file(state_dict, path)
    return installed(path, sha, ModelKind.VAE)


def own_vae(checkpoint: InstalledModel) -> dict[str, torch.Tensor]:
    """The checkpoint's own VAE tensors, as a standalone A1111 VAE file holds them."""
    tensors = load_file(checkpoint.path)
    return {k.removeprefix(VAE): v for k, v in tensors.items() if k.startswith(VAE)}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_vae_file_decodes_instead_of_the_checkpoints_own(
    engine: DiffusersEngine,
    sd15: InstalledModel,
    sdxl: InstalledModel,
    family: str,
    tmp_path: Path,
) -> None:
    checkpoint = sd15 if family == "sd15" else sdxl
    same = vae_file(tmp_path / "same.safetensors", own_vae(checkpoint), "1" * 64)
    other = vae_file(tmp_path / "other.safetensors", tiny_vae_state_dict(seed=5), "2" * 64)
    base = txt2img(engine, [checkpoint])
    # The checkpoint's own tensors from a file give its pixels: the file is read right...
    assert np.array_equal(txt2img(engine, [checkpoint, same], vae=same.ref), base)
    # ...and another VAE decodes the same latents into other pixels.
    assert np.abs(txt2img(engine, [checkpoint, other], vae=other.ref) - base).mean() > 1
    assert np.array_equal(txt2img(engine, [checkpoint]), base)  # the own VAE is back


def test_a_vae_file_of_another_architecture_fails_the_task_naming_it(
    engine: DiffusersEngine, sd15: InstalledModel, tmp_path: Path
) -> None:
    tensors = tiny_vae_state_dict(seed=5)
    tensors["encoder.conv_in.weight"] = torch.zeros(7, 3, 3, 3)
    wrong = vae_file(tmp_path / "wrong.safetensors", tensors, "3" * 64)
    with pytest.raises(EngineError, match=r"wrong\.safetensors"):
        txt2img(engine, [sd15, wrong], vae=wrong.ref)
    assert engine.pipelines.get(sd15).pipeline.vae is not None


# --- embeddings ------------------------------------------------------------------------------


def token_vectors(pipeline: Any, encoder: str, words: str) -> torch.Tensor:
    """The token embeddings of ``words`` in ``encoder``'s table: an embedding made of them
    must encode exactly as the words do."""
    ids = pipeline.tokenizer(words, add_special_tokens=False)["input_ids"]
    table = getattr(pipeline, encoder).get_input_embeddings().weight
    return table[ids].detach().clone()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_an_sd15_embedding_encodes_as_the_words_it_was_made_of(
    engine: DiffusersEngine, sd15: InstalledModel, tmp_path: Path, suffix: str
) -> None:
    base = engine.pipelines.get(sd15).pipeline
    path = write_sd15_embedding(
        tmp_path / f"foxlike{suffix}", token_vectors(base, "text_encoder", "red fox")
    )
    foxlike = installed(path, "4" * 64, ModelKind.EMBEDDING)
    words = txt2img(engine, [sd15], prompt="a (red fox:1.2), night")
    used = txt2img(
        engine, [sd15, foxlike], prompt="a (FoxLike:1.2), night", embeddings=(foxlike.ref,)
    )
    assert np.array_equal(used, words)
    ignored = txt2img(engine, [sd15], prompt="a (FoxLike:1.2), night")
    assert np.abs(ignored - words).mean() > 1  # without it the name is just letters
    assert np.array_equal(txt2img(engine, [sd15], prompt="a (FoxLike:1.2), night"), ignored)


def test_an_sdxl_embedding_feeds_both_encoders(
    engine: DiffusersEngine, sdxl: InstalledModel, tmp_path: Path
) -> None:
    base = engine.pipelines.get(sdxl).pipeline
    clip_l = token_vectors(base, "text_encoder", "red fox")
    clip_g = token_vectors(base, "text_encoder_2", "red fox")
    path = write_sdxl_embedding(tmp_path / "foxlike.safetensors", clip_l, clip_g)
    foxlike = installed(path, "5" * 64, ModelKind.EMBEDDING)
    words = txt2img(engine, [sdxl], prompt="a red fox", negative_prompt="blurry")
    used = txt2img(
        engine,
        [sdxl, foxlike],
        prompt="a foxlike",
        negative_prompt="blurry",
        embeddings=(foxlike.ref,),
    )
    assert np.array_equal(used, words)
    # Only the clip_g half changed: the second encoder reads it too.
    half = write_sdxl_embedding(tmp_path / "half.safetensors", clip_l, torch.zeros_like(clip_g))
    halfway = installed(half, "6" * 64, ModelKind.EMBEDDING)
    other = txt2img(
        engine,
        [sdxl, halfway],
        prompt="a half",
        negative_prompt="blurry",
        embeddings=(halfway.ref,),
    )
    assert not np.array_equal(other, words)
    assert len(base.tokenizer) == len(engine.pipelines.get(sdxl).pipeline.tokenizer)


def test_an_embedding_of_another_family_fails_the_task_naming_it(
    engine: DiffusersEngine, sdxl: InstalledModel, tmp_path: Path
) -> None:
    path = write_sd15_embedding(tmp_path / "sd1only.safetensors", embedding_vectors(1, 32, seed=1))
    sd1only = installed(path, "7" * 64, ModelKind.EMBEDDING)
    with pytest.raises(EngineError, match=r"sd1only\.safetensors has no clip_g"):
        txt2img(engine, [sdxl, sd1only], prompt="sd1only", embeddings=(sd1only.ref,))
