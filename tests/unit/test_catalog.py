"""The packaged catalog: its facts match the reference, and lookups find entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dan.domain import ModelFamily, ModelKind
from dan.errors import ModelNotFound
from dan.models import catalog as catalog_module
from dan.models.catalog import Catalog, CatalogEntry, load_catalog

# The brief's facts, in the shared folder next to the checkout (present in CI as well).
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "model-catalog.json"
CHILLOUT_SHA = "fc2511737a54c5e80b89ab03e0ab4b98d051ab187f92860f3cd664dc9d08b271"
CHILLOUT_OLD_SHA = "3a17d0deffa4592fd91c711a798031a258ab44041809ade8b4591c0225ea9401"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def test_default_checkpoint_is_chillout_mix(catalog: Catalog) -> None:
    default = catalog.default_checkpoint
    assert default.name == "chilloutmix_NiPrunedFp32Fix"
    assert default.kind is ModelKind.CHECKPOINT
    assert default.sha256 == CHILLOUT_SHA
    assert default.file_name == "chilloutmix_NiPrunedFp32Fix.safetensors"


def test_chillout_mix_alias_and_old_hash_resolve_to_one_entry(catalog: Catalog) -> None:
    default = catalog.default_checkpoint
    assert catalog.get("chillout_mix") is default
    assert catalog.get("CHILLOUT_MIX", ModelKind.CHECKPOINT) is default
    assert catalog.get(CHILLOUT_OLD_SHA) is default
    assert catalog.get(CHILLOUT_OLD_SHA.upper()) is default
    assert catalog.get(CHILLOUT_SHA) is default


def test_counts_per_kind(catalog: Catalog) -> None:
    # The reference lists 23 LoRAs, two of them the same file (merged into one entry).
    counts = {kind: len(catalog.of_kind(kind)) for kind in ModelKind}
    assert counts == {
        ModelKind.CHECKPOINT: 16,  # the reference's 15 and SDXL base
        ModelKind.LORA: 22,
        ModelKind.CONTROLNET: 4,  # the reference's 2 and SDXL canny and openpose
        ModelKind.UPSCALER: 6,
        ModelKind.INTERROGATOR: 4,
        ModelKind.ANNOTATOR: 1,
        ModelKind.VAE: 1,
        ModelKind.EMBEDDING: 0,  # embeddings are the user's own files
    }


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference catalog not available")
def test_every_reference_model_is_findable_with_its_hash(catalog: Catalog) -> None:
    reference = json.loads(REFERENCE.read_text())
    for kind in ModelKind:
        for raw in reference.get(kind.value, []):
            entry = catalog.find(raw["name"], kind)
            assert entry.sha256 == raw["sha256"]
            assert catalog.get(raw["sha256"], kind) is entry


def test_file_names_keep_the_url_extension_or_default_to_safetensors(catalog: Catalog) -> None:
    civitai = catalog.find("meinamix_meinaV10")
    assert civitai.url.startswith("https://civitai.com/")
    assert civitai.file_name == "meinamix_meinaV10.safetensors"
    assert catalog.find("clarity").file_name == "clarity.ckpt"
    assert catalog.find("ESRGAN 4x", ModelKind.UPSCALER).file_name == "ESRGAN_4x.pth"
    assert all(e.file_name.startswith(e.name) for e in catalog)


def test_wire_names_are_aliases(catalog: Catalog) -> None:
    assert catalog.find("sd15_canny", ModelKind.CONTROLNET).name == "control_sd15_canny"
    assert catalog.find("okingjo-Honkai-Elysia").name == "elysia5in1Lora_v20"


def test_kind_filter_and_not_found_message(catalog: Catalog) -> None:
    assert catalog.get("chillout_mix", ModelKind.LORA) is None
    with pytest.raises(ModelNotFound, match=r"no catalog lora named or hashed 'nope'.*kobeni_v10"):
        catalog.find("nope", ModelKind.LORA)


def test_module_functions_use_the_packaged_catalog() -> None:
    assert catalog_module.find("chillout_mix").name == "chilloutmix_NiPrunedFp32Fix"
    assert len(catalog_module.entries()) == 54
    with pytest.raises(ModelNotFound, match="known: meinamix_meinaV10"):
        catalog_module.find("nope")


SDXL = {  # name: (kind, sha256, alias), each sha256 confirmed as its sha256_source says
    "sd_xl_base_1.0": (
        ModelKind.CHECKPOINT,
        "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
        "sdxl_base",
    ),
    "sdxl_vae_fp16_fix": (
        ModelKind.VAE,
        "235745af8d86bf4a4c1b5b4f529868b37019a10f7c0b2e79ad0abca3a22bc6e1",
        "sdxl-vae-fp16-fix",
    ),
    "diffusers_xl_canny_full": (
        ModelKind.CONTROLNET,
        "80664d80e3f233371cb6921110d0a6b7a40c01571905463f9dde5637e7894ed3",
        "sdxl_canny",
    ),
    "xinsir_controlnet_openpose_sdxl_1.0": (
        ModelKind.CONTROLNET,
        "b8524e557a7df60d081f5d4a0eb109967d107df217943bf88c2d99b9ebcc06c5",
        "sdxl_openpose",
    ),
}


def test_sdxl_entries_are_single_safetensors_files_from_the_hub(catalog: Catalog) -> None:
    for name, (kind, sha256, alias) in SDXL.items():
        entry = catalog.find(alias, kind)
        assert (entry.name, entry.sha256, entry.family) == (name, sha256, ModelFamily.SDXL)
        assert entry.url.startswith("https://huggingface.co/")
        assert entry.url.endswith(".safetensors") and entry.file_name == f"{name}.safetensors"


def test_every_sdxl_entry_says_where_its_sha256_was_confirmed() -> None:
    raw = json.loads(Path(catalog_module.__file__).with_name("catalog.json").read_text())
    sdxl = [m for m in raw["models"] if m.get("family") == "sdxl"]
    assert sorted(m["name"] for m in sdxl) == sorted(SDXL)
    for model in sdxl:
        assert "SHA256" in model["sha256_source"] and "GitHub" in model["sha256_source"]


def test_family_defaults_to_sd15_where_a_kind_has_one(catalog: Catalog) -> None:
    assert catalog.default_checkpoint.family is ModelFamily.SD15
    assert catalog.find("sd15_canny").family is ModelFamily.SD15
    assert catalog.find("kobeni_v10").family is ModelFamily.SD15
    assert catalog.find("ESRGAN_4x").family is None
    assert catalog.find("ViT-L-14").family is None


def test_a_bad_family_is_rejected(tmp_path: Path) -> None:
    base = _raw("a", "a" * 64)
    with pytest.raises(ValueError, match="family must be one of sd15, sdxl, got 'sd3'"):
        load_catalog(_write(tmp_path, [base | {"family": "sd3"}], "a"))
    upscaler = _raw("u", "b" * 64, kind="upscaler") | {"family": "sdxl"}
    with pytest.raises(ValueError, match="'u': upscaler entries have no family"):
        load_catalog(_write(tmp_path, [base, upscaler], "a"))


def _write(tmp_path: Path, models: list[dict[str, Any]], default: str) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"version": 1, "default_checkpoint": default, "models": models}))
    return path


def _raw(name: str, sha: str, kind: str = "checkpoint") -> dict[str, Any]:
    return {"kind": kind, "name": name, "sha256": sha, "url": "http://x/y", "file_name": name}


def test_duplicate_alias_is_rejected(tmp_path: Path) -> None:
    first = _raw("a", "a" * 64) | {"aliases": ["same"]}
    second = _raw("b", "b" * 64) | {"aliases": ["SAME"]}
    with pytest.raises(ValueError, match="same"):
        load_catalog(_write(tmp_path, [first, second], "a"))


def test_bad_hash_and_bad_default_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a sha256"):
        load_catalog(_write(tmp_path, [_raw("a", "abc")], "a"))
    with pytest.raises(ValueError, match="default_checkpoint"):
        load_catalog(_write(tmp_path, [_raw("l", "c" * 64, kind="lora")], "l"))


def test_entries_are_frozen(catalog: Catalog) -> None:
    entry = catalog.default_checkpoint
    assert isinstance(entry, CatalogEntry)
    with pytest.raises(AttributeError):
        entry.name = "x"  # type: ignore[misc]
