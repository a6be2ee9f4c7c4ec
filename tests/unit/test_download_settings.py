"""The download settings: DAN_ names first, then the hub's standard HF_ENDPOINT and HF_TOKEN;
tokens kept secret, yet handed whole to child processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dan.cli import settings_env
from dan.config import Settings
from dan.models.sources import HF_ENDPOINT, DownloadSources

NAMES = ("DAN_HF_ENDPOINT", "HF_ENDPOINT", "DAN_HF_TOKEN", "HF_TOKEN", "DAN_CIVITAI_API_KEY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_hub_and_no_tokens() -> None:
    sources = DownloadSources.from_settings(Settings())  # type: ignore[call-arg]
    assert sources == DownloadSources(HF_ENDPOINT, None, None)


def test_the_standard_hf_variables_apply_when_the_dan_ones_are_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    monkeypatch.setenv("HF_TOKEN", "standard-token")
    monkeypatch.setenv("DAN_CIVITAI_API_KEY", "civitai-key")
    sources = DownloadSources.from_settings(Settings())  # type: ignore[call-arg]
    assert sources.hf_endpoint == "https://hf-mirror.example"
    assert sources.hf_token is not None and sources.hf_token.get_secret_value() == "standard-token"
    assert sources.civitai_api_key is not None
    assert sources.civitai_api_key.get_secret_value() == "civitai-key"
    monkeypatch.setenv("DAN_HF_ENDPOINT", "https://dan-mirror.example")
    monkeypatch.setenv("DAN_HF_TOKEN", "dan-token")
    settings = Settings()  # type: ignore[call-arg]
    assert settings.hf_endpoint == "https://dan-mirror.example"
    assert settings.hf_token is not None and settings.hf_token.get_secret_value() == "dan-token"
    # Arguments by field name (the CLI's way) still win over the environment.
    by_argument = Settings(hf_endpoint="http://127.0.0.1:9/hf")  # type: ignore[call-arg]
    assert by_argument.hf_endpoint == "http://127.0.0.1:9/hf"


def test_the_endpoint_must_be_an_http_url() -> None:
    with pytest.raises(ValidationError, match="DAN_HF_ENDPOINT must be an http"):
        Settings(hf_endpoint="hf-mirror.example")  # type: ignore[call-arg]


def test_tokens_are_hidden_but_child_processes_get_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DAN_HF_TOKEN", "hf-secret")
    monkeypatch.setenv("DAN_CIVITAI_API_KEY", "civitai-secret")
    settings = Settings(data_dir=tmp_path)  # type: ignore[call-arg]
    assert "hf-secret" not in repr(settings) and "civitai-secret" not in repr(settings)
    env = settings_env(settings)
    assert (env["DAN_HF_TOKEN"], env["DAN_CIVITAI_API_KEY"]) == ("hf-secret", "civitai-secret")
