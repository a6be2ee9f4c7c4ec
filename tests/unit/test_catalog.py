"""The packaged catalog: its facts match the reference, and lookups find entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dan.domain import ModelKind
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
        ModelKind.CHECKPOINT: 15,
        ModelKind.LORA: 22,
        ModelKind.CONTROLNET: 2,
        ModelKind.UPSCALER: 6,
        ModelKind.INTERROGATOR: 4,
        ModelKind.ANNOTATOR: 1,
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
    assert len(catalog_module.entries()) == 50
    with pytest.raises(ModelNotFound, match="known: meinamix_meinaV10"):
        catalog_module.find("nope")


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
