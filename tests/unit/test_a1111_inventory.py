"""What an AUTOMATIC1111 instance has, identified by sha256, from its listings as A1111 writes
them: a given sha256 is used, a null one means hashing the file if it is readable here, and
what cannot be identified is left out with a warning that names it."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dan.api.app import create_app
from dan.config import Settings
from dan.domain import ModelKind
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.hashing import HashCache
from dan.services import build_services
from dan.workers.a1111.client import A1111Client
from dan.workers.a1111.inventory import A1111Inventory
from dan.workers.a1111.listings import (
    Identifier,
    catalog_files,
    checkpoints,
    controlnets,
    embeddings,
    loras,
    models_roots,
    upscalers,
    vaes,
)


def write(path: Path, size: int = 64) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ident(tmp_path: Path) -> Identifier:
    return Identifier(HashCache(tmp_path / "cache"))


def test_checkpoints_by_their_sha256_or_their_file_hashed_here(
    tmp_path: Path, ident: Identifier, caplog: pytest.LogCaptureFixture
) -> None:
    webui = tmp_path / "webui" / "models" / "Stable-diffusion"
    local = write(webui / "local.safetensors")
    given = "AB" * 32
    items: list[dict[str, Any]] = [
        {  # hashed by the instance already: its file need not be readable here
            "title": "far.safetensors [abababab]",
            "model_name": "far",
            "sha256": given,
            "filename": "C:\\webui\\models\\Stable-diffusion\\far.safetensors",
        },
        {  # not hashed yet (A1111 hashes on first load), but the file is here
            "title": "local.safetensors",
            "model_name": "local",
            "hash": None,
            "sha256": None,
            "filename": str(webui / "local.safetensors"),
        },
        {  # neither: left out, by name
            "title": "elsewhere.safetensors",
            "sha256": None,
            "filename": "/mnt/other/elsewhere.safetensors",
        },
    ]
    with caplog.at_level(logging.WARNING):
        found = list(checkpoints(items, ident))
    by_sha = {f.model.sha256: f for f in found}
    assert set(by_sha) == {given.lower(), local}
    far = by_sha[given.lower()]
    assert (far.call_name, far.model.name, far.model.path.name) == (
        "far.safetensors [abababab]",
        "far",
        "far.safetensors",  # a plain file name, as the node protocol wants, from a Windows path
    )
    assert by_sha[local].model.kind == ModelKind.CHECKPOINT
    assert by_sha[local].model.size == 64 and by_sha[local].call_name == "local.safetensors"
    assert "'elsewhere.safetensors' left out" in caplog.text


def test_loras_by_a_sha256_key_or_their_path(tmp_path: Path, ident: Identifier) -> None:
    ink = write(tmp_path / "Lora" / "ink_v2.safetensors")
    items: list[dict[str, Any]] = [
        {
            "name": "ink_v2",
            "alias": "ink",
            "path": str(tmp_path / "Lora" / "ink_v2.safetensors"),
            # kohya's hash of the tensors, not of the file: it must not be taken for one
            "metadata": {"sshs_model_hash": "f" * 64},
        },
        # a sha256 key (DAN's facade could give one; it writes the bare file name as path)
        {"name": "given", "alias": "given", "path": "given.safetensors", "sha256": "9" * 64},
        {"name": "missing", "alias": "missing", "path": "/nowhere/missing.safetensors"},
    ]
    found = {f.model.sha256: f for f in loras(items, ident)}
    assert set(found) == {ink, "9" * 64}
    assert found[ink].call_name == "ink_v2" and found[ink].model.kind == ModelKind.LORA
    given = found["9" * 64].model
    assert (given.name, given.path.name, given.size) == ("given", "given.safetensors", 0)


def test_upscalers_only_with_a_file_here(tmp_path: Path, ident: Identifier) -> None:
    esrgan = write(tmp_path / "ESRGAN" / "4x_foolhardy.pth")
    items: list[dict[str, Any]] = [
        {"name": "None", "model_name": None, "model_path": None, "scale": 4},
        {"name": "Lanczos", "model_name": None, "model_path": None, "scale": 4},
        {
            "name": "R-ESRGAN 4x+",
            "model_name": "R-ESRGAN 4x+",
            "model_path": "https://example.invalid/RealESRGAN_x4plus.pth",
            "scale": 4,
        },
        {
            "name": "4x_foolhardy",
            "model_name": "ESRGAN_4x",
            "model_path": str(tmp_path / "ESRGAN" / "4x_foolhardy.pth"),
            "scale": 4,
        },
    ]
    [found] = upscalers(items, ident)
    assert (found.model.sha256, found.call_name) == (esrgan, "4x_foolhardy")


def test_controlnet_models_are_found_next_to_the_checkpoints(
    tmp_path: Path, ident: Identifier
) -> None:
    models = tmp_path / "webui" / "models"
    write(models / "Stable-diffusion" / "base.safetensors")
    canny = write(models / "ControlNet" / "control_sd15_canny.pth")
    pose = write(tmp_path / "webui/extensions/sd-webui-controlnet/models/control_sd15_openpose.pth")
    found_checkpoints = list(
        checkpoints(
            [{"title": "base", "filename": str(models / "Stable-diffusion/base.safetensors")}],
            ident,
        )
    )
    roots = models_roots(found_checkpoints)
    assert roots == [models]
    given = "ab" * 32
    names = [
        ("control_sd15_canny [fef5e48e]", None),
        ("control_sd15_openpose [cab727d4]", None),
        ("control_v11p_sd15_lineart [43d4be0d]", None),  # listed, but its file is not here
        ("control_sd15_depth [abababab]", given),  # a DAN instance gives the sha256
    ]
    found = {f.call_name: f.model.sha256 for f in controlnets(names, roots, ident)}
    assert found == {
        "control_sd15_canny [fef5e48e]": canny,
        "control_sd15_openpose [cab727d4]": pose,
        "control_sd15_depth [abababab]": given,
    }


def test_catalog_interrogator_files_in_the_instances_folders(
    tmp_path: Path, ident: Identifier
) -> None:
    models = tmp_path / "webui" / "models"
    tagger = write(models / "torch_deepdanbooru" / "model-resnet_custom_v3.pt")
    write(models / "BLIP" / "model_base_caption_capfilt_large.pth")  # not the catalog's bytes
    pose = write(
        tmp_path / "webui/extensions/sd-webui-controlnet/annotator/downloads/openpose/"
        "body_pose_model.pth"
    )

    def entry(kind: ModelKind, name: str, sha256: str, suffix: str) -> CatalogEntry:
        return CatalogEntry(kind, name, sha256, "https://example.invalid/x", name + suffix)

    catalog = Catalog(
        [
            entry(ModelKind.CHECKPOINT, "base", "0" * 64, ".safetensors"),
            entry(ModelKind.INTERROGATOR, "model-resnet_custom_v3", tagger, ".pt"),
            entry(ModelKind.INTERROGATOR, "model_base_caption_capfilt_large", "1" * 64, ".pth"),
            entry(ModelKind.ANNOTATOR, "body_pose_model", pose, ".pth"),
        ],
        "base",
    )
    found = {f.model.name: f.model for f in catalog_files(catalog, [models], ident)}
    assert set(found) == {"model-resnet_custom_v3", "body_pose_model"}
    assert found["model-resnet_custom_v3"].kind == ModelKind.INTERROGATOR
    assert found["body_pose_model"].sha256 == pose


def test_vaes_by_a_sha256_key_or_their_filename(tmp_path: Path, ident: Identifier) -> None:
    fix = write(tmp_path / "webui" / "models" / "VAE" / "sdxl_vae_fix.safetensors")
    items: list[dict[str, Any]] = [
        {
            "model_name": "sdxl_vae_fix.safetensors",
            "filename": str(tmp_path / "webui/models/VAE/sdxl_vae_fix.safetensors"),
        },
        {"model_name": "far.safetensors", "filename": "far.safetensors", "sha256": "C" * 64},
        {"model_name": "gone.safetensors", "filename": "/nowhere/gone.safetensors"},
    ]
    found = {f.model.sha256: f for f in vaes(items, ident)}
    assert set(found) == {fix, "c" * 64}
    assert found[fix].call_name == "sdxl_vae_fix.safetensors"  # what sd_vae takes
    assert (found[fix].model.kind, found[fix].model.name) == (ModelKind.VAE, "sdxl_vae_fix")


def test_embeddings_by_a_sha256_key_or_their_file_beside_the_models_folder(
    tmp_path: Path, ident: Identifier, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "webui" / "models"
    hands = write(tmp_path / "webui" / "embeddings" / "goodhands.pt")
    named: dict[str, Any] = {
        "goodhands": {"step": None, "shape": 768, "vectors": 2},  # A1111 names no file
        "xl_only": {"sha256": "D" * 64},  # a DAN server gives the sha256
        "lost": {"vectors": 1},
    }
    with caplog.at_level(logging.WARNING):
        found = {f.model.sha256: f for f in embeddings(named, [models], ident)}
    assert set(found) == {hands, "d" * 64}
    assert found[hands].call_name == "goodhands" and found[hands].model.size == 64
    assert found["d" * 64].model.kind == ModelKind.EMBEDDING
    assert "embedding 'lost' left out" in caplog.text


def test_a_dan_server_as_the_instance_reports_its_vaes_and_embeddings(tmp_path: Path) -> None:
    models = tmp_path / "models"
    files = ["checkpoints/base.safetensors", "vaes/clear.safetensors"]
    files += ["embeddings/goodhands.safetensors"]
    sha = {name: write(models / name, 128) for name in files}
    settings = Settings(data_dir=tmp_path / "data", models_dir=models, download=False, worker=False)
    services = build_services(settings)
    try:
        with TestClient(create_app(services)) as http:
            client = A1111Client(str(http.base_url), http=http)
            inventory = A1111Inventory(client, HashCache(tmp_path / "hashes"))
            inventory.refresh()
            [vae] = inventory.list(ModelKind.VAE)
            [embedding] = inventory.list(ModelKind.EMBEDDING)
    finally:
        services.close()
    assert vae.sha256 == sha["vaes/clear.safetensors"]
    assert inventory.call_name(ModelKind.VAE, vae.sha256) == "clear.safetensors"
    assert embedding.sha256 == sha["embeddings/goodhands.safetensors"]
    assert inventory.call_name(ModelKind.EMBEDDING, embedding.sha256) == "goodhands"
