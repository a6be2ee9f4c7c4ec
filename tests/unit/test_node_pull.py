"""A node pulls the catalog models an admin asks for: verified by sha256, then registered."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dan.domain import ModelKind
from dan.errors import ChecksumMismatch
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.registry import ModelRegistry
from dan.models.sources import DownloadSources
from dan.workers.node import Puller
from tests.fixtures.file_server import SHA, Serve


def registry_with(tmp_path: Path, url: str) -> ModelRegistry:
    checkpoint = CatalogEntry(ModelKind.CHECKPOINT, "base", "0" * 64, url, "base.safetensors")
    lora = CatalogEntry(ModelKind.LORA, "tiny", SHA, url, "tiny.safetensors")
    catalog = Catalog([checkpoint, lora], default_checkpoint="base")
    return ModelRegistry(tmp_path / "models", tmp_path / "cache", allow_ckpt=False, catalog=catalog)


def test_a_requested_model_is_downloaded_and_the_node_registers_again(
    serve: Serve, tmp_path: Path
) -> None:
    registry = registry_with(tmp_path, serve("ok").url)
    installed = threading.Event()
    puller = Puller(registry, installed.set)
    puller.request(("tiny",))
    assert installed.wait(30)
    assert [model.sha256 for model in registry.list(ModelKind.LORA)] == [SHA]


def test_a_corrupt_download_installs_nothing(serve: Serve, tmp_path: Path) -> None:
    registry = registry_with(tmp_path, serve("wrong").url)
    called: list[bool] = []
    with pytest.raises(ChecksumMismatch):
        Puller(registry, lambda: called.append(True)).pull_one("tiny")
    registry.scan()
    assert registry.list(ModelKind.LORA) == [] and called == []


def test_a_node_pulls_hugging_face_files_through_its_mirror(serve: Serve, tmp_path: Path) -> None:
    server = serve("ok")
    hub_url = "https://huggingface.co/org/repo/resolve/main/tiny.safetensors"
    registry = registry_with(tmp_path, hub_url)
    sources = DownloadSources(hf_endpoint=f"http://{server.netloc}")
    Puller(registry, lambda: None, sources).pull_one("tiny")
    assert [seen.path for seen in server.seen] == ["/org/repo/resolve/main/tiny.safetensors"]
    assert [model.sha256 for model in registry.list(ModelKind.LORA)] == [SHA]
