"""A node pulls the catalog models an admin asks for: verified by sha256, then registered."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dan.domain import ModelKind
from dan.errors import ChecksumMismatch
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.registry import ModelRegistry
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
