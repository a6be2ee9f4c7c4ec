"""clip_skip, vae and embeddings below the API: validation, resolution at submission, what a
node must have, what the PNG records, and old task params that have none of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dan.api.schemas import Txt2ImgBody
from dan.config import Settings
from dan.domain import GenerationRequest, ModelFamily, ModelKind, ModelRef
from dan.errors import InvalidArgument, ModelNotFound
from dan.imaging import infotext
from dan.models.registry import ModelRegistry
from dan.nodes.base import NetworkFile
from dan.nodes.models import NetworkModels
from dan.tasks.orders import GenerationOrder, Txt2ImgOrder
from dan.tasks.requests import RequestBuilder
from tests.api.conftest import install_dummy_checkpoint
from tests.fixtures.tiny_options import (
    embedding_vectors,
    write_sd15_embedding,
    write_sdxl_embedding,
)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    models = tmp_path / "models"
    install_dummy_checkpoint(models)
    for folder in ("vaes", "embeddings"):
        (models / folder).mkdir(parents=True)
    (models / "vaes" / "kl-f8.safetensors").write_bytes(b"any bytes: never parsed here")
    write_sd15_embedding(
        models / "embeddings" / "easyneg.safetensors", embedding_vectors(2, 8, seed=1)
    )
    write_sd15_embedding(models / "embeddings" / "old-style.pt", embedding_vectors(1, 8, seed=2))
    vectors = embedding_vectors(1, 8, seed=3)
    write_sdxl_embedding(models / "embeddings" / "xlonly.safetensors", vectors, vectors)
    registry = ModelRegistry(models, tmp_path / "cache", allow_ckpt=False)
    registry.scan()
    return registry


@pytest.fixture
def build(registry: ModelRegistry, tmp_path: Path) -> RequestBuilder:
    return RequestBuilder(registry, Settings(data_dir=tmp_path))  # type: ignore[call-arg]


def order(**fields: object) -> Txt2ImgOrder:
    values: dict[str, object] = {
        "prompt": "a fox",
        "negative_prompt": "",
        "seed": 7,
        "sampler_name": "Euler a",
        "steps": 20,
        "cfg_scale": 7.0,
        "width": 512,
        "height": 512,
        "model": None,
    }
    values.update(fields)
    return Txt2ImgOrder(GenerationOrder(**values))  # type: ignore[arg-type]


def submitted(build: RequestBuilder, **fields: object) -> GenerationRequest:
    return GenerationRequest.from_params(build.txt2img(order(**fields), "t").params)


@pytest.mark.parametrize("value", [0, 13, 2.5, "x"])
def test_clip_skip_out_of_range_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(ValidationError, match=r"clip_skip[\s\S]*between 1 and 12"):
        Txt2ImgBody.model_validate({"clip_skip": value})


def test_clip_skip_is_checked_below_the_api_too(build: RequestBuilder) -> None:
    with pytest.raises(InvalidArgument, match=r"Invalid clip_skip: .* between 1 and 12, got 0"):
        build.txt2img(order(clip_skip=0), "t")
    assert submitted(build, clip_skip=12).clip_skip == 12


def test_a_vae_is_resolved_by_name_and_needed_by_the_node(
    build: RequestBuilder, registry: ModelRegistry
) -> None:
    vae = registry.resolve(ModelKind.VAE, "kl-f8")
    prepared = build.txt2img(order(vae="kl-f8.safetensors"), "t")
    assert GenerationRequest.from_params(prepared.params).vae == vae.ref
    assert vae.sha256 in prepared.needs.requires
    for own in (None, "", "Automatic", "None"):
        assert submitted(build, vae=own).vae is None


def test_an_unknown_vae_is_refused_naming_the_field(build: RequestBuilder) -> None:
    with pytest.raises(ModelNotFound, match=r"Invalid vae: no vae matches 'nope'.*kl-f8"):
        build.txt2img(order(vae="nope"), "t")


def test_embeddings_are_the_installed_ones_either_prompt_names_as_a_word(
    build: RequestBuilder, registry: ModelRegistry
) -> None:
    easyneg = registry.resolve(ModelKind.EMBEDDING, "easyneg")
    old = registry.resolve(ModelKind.EMBEDDING, "old-style")
    prepared = build.txt2img(
        order(prompt="a fox, (Old-Style:1.2), xlonly", negative_prompt="easyneg"), "t"
    )
    request = GenerationRequest.from_params(prepared.params)
    # xlonly is an SDXL embedding: A1111 skips embeddings of another family, and so do we.
    assert set(request.embeddings) == {easyneg.ref, old.ref}
    assert {easyneg.sha256, old.sha256} <= set(prepared.needs.requires)
    assert submitted(build, prompt="easynegative, old_style, not-old-style").embeddings == ()


class CatNode:
    """The node store of a network where a node reports an embedding file named "cat"."""

    def find_files(self, kind: ModelKind, **query: object) -> list[NetworkFile]:
        if kind != ModelKind.EMBEDDING:
            return []
        return [NetworkFile(kind, "c" * 64, "cat", "cat.pt", 100, 1, ModelFamily.SD15)]


def test_an_embedding_only_a_node_reports_never_joins_a_prompt(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    network = NetworkModels(registry, CatNode())
    assert [m.name for m in network.list(ModelKind.EMBEDDING)].count("cat") == 1  # it is listed
    build = RequestBuilder(network, Settings(data_dir=tmp_path))  # type: ignore[call-arg]
    prepared = build.txt2img(order(prompt="a cat on a mat", negative_prompt="easyneg"), "t")
    request = GenerationRequest.from_params(prepared.params)
    # Only the local one: a prompt with "cat" must not need that node's file to run.
    assert [e.name for e in request.embeddings] == ["easyneg"]
    assert "c" * 64 not in prepared.needs.requires


def test_old_params_without_the_options_still_load(build: RequestBuilder) -> None:
    params = build.txt2img(order(), "t").params
    for key in ("clip_skip", "vae", "embeddings"):
        del params[key]
    request = GenerationRequest.from_params(params)
    assert (request.clip_skip, request.vae, request.embeddings) == (1, None, ())


def test_the_png_records_the_options_in_a1111s_words() -> None:
    model = ModelRef("a" * 64, "tiny")
    vae = ModelRef("0123456789abcdef" + "0" * 48, "kl-f8")
    embedding = ModelRef("fedcba9876543210" + "0" * 48, "easyneg")
    plain = GenerationRequest("fox", "", 1, "Euler", 2, 7, 64, 64, model)
    assert "Clip skip" not in infotext(plain, 1) and "VAE" not in infotext(plain, 1)
    request = GenerationRequest(
        "fox", "", 1, "Euler", 2, 7, 64, 64, model, clip_skip=2, vae=vae, embeddings=(embedding,)
    )
    text = infotext(request, 1)
    assert "VAE hash: 0123456789, VAE: kl-f8.safetensors, Clip skip: 2" in text
    assert 'TI hashes: "easyneg: fedcba987654"' in text


def test_embedding_files_get_their_family_from_their_tensors(registry: ModelRegistry) -> None:
    families = {m.name: m.family for m in registry.list(ModelKind.EMBEDDING)}
    assert {k: v.value if v else None for k, v in families.items()} == {
        "easyneg": "sd15",
        "old-style": "sd15",
        "xlonly": "sdxl",
    }
    assert torch.load(registry.resolve(ModelKind.EMBEDDING, "old-style").path, weights_only=True)
