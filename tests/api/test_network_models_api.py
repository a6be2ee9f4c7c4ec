"""A server without model files serves the models its online nodes report: requests naming
them are accepted (and run on a node that has them), supportedModelInfo lists them, and an
unknown one is refused naming the field."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dan.api.app import create_app
from dan.domain import ModelKind, TaskStatus
from dan.engine.fake import FakeEngine
from dan.models.registry import ModelRegistry
from dan.services import build_services
from dan.workers.loop import Worker
from dan.workers.node import Node
from dan.workers.remote import NodeClient, RemoteFiles, RemoteQueue
from tests.api.conftest import Api, install_dummy_checkpoint, make_settings
from tests.api.test_nodes_api import SMALL, call, key_for, wait_until
from tests.fixtures.live import serving
from tests.fixtures.scripted_node import ScriptedNode

REMOTE_SHA = hashlib.sha256(b"remote_mix").hexdigest()
STYLE_SHA = hashlib.sha256(b"style").hexdigest()


@pytest.fixture
def empty(tmp_path: Path) -> Iterator[Api]:
    """A server that requires keys and has no model file at all."""
    services = build_services(make_settings(tmp_path, auth="required"))
    assert services.registry.list(ModelKind.CHECKPOINT) == []
    with serving(create_app(services)) as client:
        yield Api(client, services, "")
    services.close()


def model(kind: str, name: str, sha: str) -> dict[str, Any]:
    return {"kind": kind, "name": name, "file": f"{name}.safetensors", "sha256": sha, "size": 9}


def register_reporting(api: Api, key: str) -> ScriptedNode:
    """A node that has ``remote_mix`` (a checkpoint) and ``style`` (a LoRA)."""
    models = [model("checkpoint", "remote_mix", REMOTE_SHA), model("lora", "style", STYLE_SHA)]
    node = ScriptedNode(api.client, key, "gpu")  # type: ignore[arg-type]
    reply = node.register(models, capabilities={"device": "fake"}, slots=8)
    assert reply.status == 200, reply
    return node


def test_a_checkpoint_only_a_node_has_is_accepted_and_listed(empty: Api) -> None:
    donor = key_for(empty, "donor", can_run_nodes=True)
    user = key_for(empty, "user")
    node = register_reporting(empty, donor)
    info = call(empty, "GET", "/api/sd/supportedModelInfo", user)["data"]
    assert info["Models"] == [{"name": "remote_mix", "hash": REMOTE_SHA, "family": "sd15"}]
    assert info["LoRAs"] == [{"name": "style", "hash": STYLE_SHA, "family": "sd15"}]
    task_ids = []
    for ref in ("remote_mix", REMOTE_SHA[:10]):
        body = {**SMALL, "prompt": "a fox <lora:style:0.5>", "model": ref}
        reply = call(empty, "POST", "/api/sd/txt2img/async", user, json=body)
        assert reply["_http"] == 200, reply
        assert not reply["data"].get("warning")  # an online node serves it
        task_ids.append(reply["data"]["taskId"])
    for task_id in task_ids:
        record = empty.services.tasks.get(task_id)
        assert record.params["model"]["sha256"] == REMOTE_SHA
        assert record.params["loras"][0]["model"]["sha256"] == STYLE_SHA
        assert node.take()["id"] == task_id  # type: ignore[index]
    # A checkpoint a node merely names never becomes everyone's default: it could be anything.
    default = call(empty, "POST", "/api/sd/txt2img/async", user, json=SMALL)
    assert (default["_http"], default["code"]) == (503, 2000)
    assert "DAN_DEFAULT_MODEL" in default["message"]


def test_an_unknown_checkpoint_is_refused_naming_the_field(empty: Api) -> None:
    register_reporting(empty, key_for(empty, "donor", can_run_nodes=True))
    user = key_for(empty, "user")
    reply = call(empty, "POST", "/api/sd/txt2img/async", user, json={**SMALL, "model": "nope"})
    assert (reply["_http"], reply["code"]) == (400, 3000)
    assert reply["message"].startswith("Invalid model: no checkpoint matches 'nope'")
    assert "remote_mix" in reply["message"]  # what the network has
    body = {**SMALL, "model": "remote_mix", "loras": [["other", 1]]}
    lora = call(empty, "POST", "/api/sd/txt2img/async", user, json=body)
    assert lora["_http"] == 400 and lora["message"].startswith("Invalid loras: entry 0:")


def test_a_real_node_reports_its_files_and_runs_what_names_them(empty: Api, tmp_path: Path) -> None:
    """Node.describe() over HTTP: the server resolves the node's checkpoint by name, and the
    node's worker (on its own registry) runs the task."""
    donor = key_for(empty, "donor", can_run_nodes=True)
    user = key_for(empty, "user")
    node_root = tmp_path / "node"
    install_dummy_checkpoint(node_root / "models", "node_mix")
    settings = make_settings(node_root)
    stop = threading.Event()
    client = NodeClient(str(empty.client.base_url), donor, stop=stop)
    node = Node(settings, "gpu", FakeEngine(), client, stop=stop)
    queue = RemoteQueue(client, node.describe, stop=stop, wait_s=0.2)
    session = queue.register()
    registry = ModelRegistry(settings.models_dir, settings.cache_dir, allow_ckpt=False)
    files = RemoteFiles(client, lambda: queue.session)
    worker = Worker(
        queue, FakeEngine(), registry, files, worker_id=session.worker_id, lease_s=30, beat_s=0.02
    )
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        reply = call(
            empty, "POST", "/api/sd/txt2img/async", user, json={**SMALL, "model": "node_mix"}
        )
        assert reply["_http"] == 200, reply
        wait_until(empty, reply["data"]["taskId"], {TaskStatus.SUCCESS})
    finally:
        stop.set()
        thread.join(10)
        queue.close(wait_s=10)
        client.close()
    (mine,) = call(empty, "GET", "/api/nodes/mine", donor)["data"]
    (installed,) = mine["installed"]
    listed = call(empty, "GET", "/api/sd/supportedModelInfo", user)["data"]["Models"]
    assert listed == [{"name": "node_mix", "hash": installed, "family": "sd15"}]
