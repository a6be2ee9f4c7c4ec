"""In-process API fixtures: the real app, store and registry on temporary folders.

The engine behind the worker here is the FakeEngine (these tests are about the HTTP contract,
the queue and the worker loop); tests/api/test_server_e2e.py drives the real engine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from dan.api.app import create_app
from dan.config import Settings
from dan.domain import ModelKind
from dan.engine.fake import FakeEngine
from dan.services import Services, build_services
from dan.workers.loop import Worker


@dataclass
class Api:
    client: TestClient | httpx.Client
    services: Services
    checkpoint_sha256: str

    def post(self, path: str, body: object, **kwargs: object) -> dict:  # type: ignore[type-arg]
        response = self.client.post(path, json=body, **kwargs)  # type: ignore[arg-type]
        payload = response.json()
        payload["_http"] = response.status_code
        return payload  # type: ignore[no-any-return]


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "models_dir": tmp_path / "models",
        "download": False,
        "worker": False,
        "sync_timeout_s": 10.0,
        "poll_interval_s": 0.01,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def install_dummy_checkpoint(models_dir: Path, name: str = "dummy") -> Path:
    # The registry identifies files by hash and never parses them, so any bytes will do here.
    path = models_dir / "checkpoints" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(256))
    return path


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    install_dummy_checkpoint(tmp_path / "models")
    return make_settings(tmp_path)


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    services = build_services(settings)
    sha = services.registry.list(ModelKind.CHECKPOINT)[0].sha256
    with TestClient(create_app(services)) as client:
        yield Api(client, services, sha)
    services.close()


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def worker(api: Api, fake_engine: FakeEngine) -> Iterator[Worker]:
    """A worker thread on the FakeEngine, serving the api fixture's queue."""
    services = api.services
    worker = Worker(
        services.store,
        fake_engine,
        services.registry,
        services.blobs,
        worker_id="test-worker",
        lease_s=services.settings.lease_s,
        idle_sleep_s=0.01,
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield worker
    stop.set()
    thread.join(10)


# The live network server of tests/fixtures/network.py, for the node and check suites.
from tests.fixtures.network import start as start  # noqa: E402
