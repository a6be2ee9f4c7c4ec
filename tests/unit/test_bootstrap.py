"""First start: the default checkpoint is pulled when none is installed, and offline is fine."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dan.config import Settings
from dan.domain import ModelKind
from dan.models.bootstrap import ensure_default_checkpoint
from dan.models.catalog import Catalog, CatalogEntry
from dan.models.registry import ModelRegistry
from tests.fixtures.file_server import SHA, Serve


def registry_with_default(tmp_path: Path, url: str) -> tuple[ModelRegistry, Settings]:
    entry = CatalogEntry(ModelKind.CHECKPOINT, "tiny_default", SHA, url, "tiny_default.safetensors")
    settings = Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data")  # type: ignore[call-arg]
    registry = ModelRegistry(
        settings.models_dir,
        settings.cache_dir,
        allow_ckpt=False,
        catalog=Catalog([entry], "tiny_default"),
    )
    registry.scan()
    return registry, settings


def test_pulls_the_default_when_nothing_is_installed(tmp_path: Path, serve: Serve) -> None:
    registry, settings = registry_with_default(tmp_path, serve("ok").url)
    ensure_default_checkpoint(registry, settings)
    model = registry.default_checkpoint(None)
    assert model is not None and (model.name, model.sha256) == ("tiny_default", SHA)


def test_offline_start_keeps_serving_and_says_how(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    registry, settings = registry_with_default(tmp_path, serve("missing").url)
    with caplog.at_level(logging.WARNING):
        ensure_default_checkpoint(registry, settings)  # must not raise
    assert registry.default_checkpoint(None) is None
    assert "dan models pull tiny_default" in caplog.text


def test_no_download_when_told_not_to(tmp_path: Path, serve: Serve) -> None:
    server = serve("ok")
    registry, settings = registry_with_default(tmp_path, server.url)
    settings.download = False
    ensure_default_checkpoint(registry, settings)
    assert server.ranges == [] and registry.default_checkpoint(None) is None


def test_the_default_comes_from_the_mirror_when_one_is_set(
    tmp_path: Path, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve("ok")
    hub_url = "https://huggingface.co/org/repo/resolve/main/tiny_default.safetensors"
    registry, settings = registry_with_default(tmp_path, hub_url)
    settings.hf_endpoint = f"http://{server.netloc}"
    with caplog.at_level(logging.INFO):
        ensure_default_checkpoint(registry, settings)
    assert registry.default_checkpoint(None) is not None
    assert [seen.path for seen in server.seen] == [
        "/org/repo/resolve/main/tiny_default.safetensors"
    ]
    assert f"from http://{server.netloc}/org/repo" in caplog.text
