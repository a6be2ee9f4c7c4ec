"""A task for a checkpoint no online node has gets an immediate answer, not an endless wait."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dan.api.app import create_app
from dan.domain import Account, ModelKind
from dan.nodes.sessions import NodeDescription
from dan.nodes.store import NodeFile
from dan.services import build_services
from tests.api.conftest import Api, install_dummy_checkpoint, make_settings

BODY = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2}
DONOR = Account("donor", "donor", can_run_nodes=True)


def add_online_node(api: Api, installed: list[str], name: str = "gpu-1") -> None:
    files = [NodeFile(sha) for sha in installed]
    api.services.nodes.register(DONOR, NodeDescription(name, {}, tuple(files)))


@pytest.fixture
def accepting_api(tmp_path: Path) -> Iterator[Api]:
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path, unserved_models="accept"))
    sha = services.registry.list(ModelKind.CHECKPOINT)[0].sha256
    with TestClient(create_app(services)) as client:
        yield Api(client, services, sha)
    services.close()


def test_with_no_node_online_the_task_waits_for_one(api: Api) -> None:
    reply = api.post("/api/sd/txt2img/async", BODY)
    assert reply["_http"] == 200 and reply["message"] == "success"


def test_a_model_no_online_node_has_is_refused_at_once(api: Api) -> None:
    add_online_node(api, ["f" * 64])
    reply = api.post("/api/sd/txt2img/async", BODY)
    assert (reply["_http"], reply["code"]) == (503, 2000)
    assert api.checkpoint_sha256[:10] in reply["message"] and "not queued" in reply["message"]


def test_a_model_an_online_node_has_is_queued(api: Api) -> None:
    add_online_node(api, [api.checkpoint_sha256])
    reply = api.post("/api/sd/txt2img/async", BODY)
    assert reply["_http"] == 200 and reply["data"]["queuePosition"] == 1


def test_files_spread_over_several_nodes_are_refused(api: Api, tmp_path: Path) -> None:
    # One node has the checkpoint, another the LoRA: no node could ever run the task, which
    # would sit at the head of the queue and hide the tasks behind it.
    lora = tmp_path / "models" / "loras" / "style.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(os.urandom(256))
    api.services.registry.scan()
    lora_sha = api.services.registry.resolve(ModelKind.LORA, "style").sha256
    add_online_node(api, [api.checkpoint_sha256], "has-checkpoint")
    add_online_node(api, [lora_sha], "has-lora")
    reply = api.post("/api/sd/txt2img/async", {**BODY, "loras": [["style", 1]]})
    assert (reply["_http"], reply["code"]) == (503, 2000)
    assert lora_sha[:10] in reply["message"] and "has them all" in reply["message"]
    add_online_node(api, [api.checkpoint_sha256, lora_sha], "has-both")
    assert api.post("/api/sd/txt2img/async", {**BODY, "loras": [["style", 1]]})["_http"] == 200


def test_by_setting_it_is_accepted_with_a_warning(accepting_api: Api) -> None:
    add_online_node(accepting_api, ["f" * 64])
    reply = accepting_api.post("/api/sd/txt2img/async", BODY)
    assert reply["_http"] == 200 and reply["data"]["status"] == 0
    assert reply["message"].startswith("success; no online worker has all the model files")


def test_a_server_with_a_local_worker_serves_whatever_it_resolved(tmp_path: Path) -> None:
    # A checkpoint dropped into models/ is found by the API at once; the local worker's node
    # row may not list it for a few seconds, which must not turn the request away.
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path, worker=True))
    with TestClient(create_app(services)) as client:
        api = Api(client, services, services.registry.list(ModelKind.CHECKPOINT)[0].sha256)
        add_online_node(api, ["f" * 64])
        reply = api.post("/api/sd/txt2img/async", BODY)
    services.close()
    assert reply["_http"] == 200 and reply["message"] == "success"
