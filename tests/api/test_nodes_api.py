"""Nodes over HTTP (a live server): registration and sessions, claims with Offer and affinity,
leases, inputs and results only for the holder, late results, listings, pulls, and the remote
worker loop."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dan.api.app import create_app
from dan.domain import ModelKind, TaskStatus
from dan.engine.fake import FakeEngine
from dan.nodes.sessions import NodeDescription
from dan.nodes.store import NodeFile
from dan.services import build_services
from dan.workers.loop import Worker
from dan.workers.remote import NodeClient, RemoteFiles, RemoteQueue
from tests.api.conftest import Api, install_dummy_checkpoint, make_settings
from tests.fixtures.live import serving
from tests.fixtures.scripted_node import ScriptedNode, png

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Api]:
    """A live server that requires keys, with two checkpoints, ``a`` and ``b``."""
    install_dummy_checkpoint(tmp_path / "models", "a")
    install_dummy_checkpoint(tmp_path / "models", "b")
    services = build_services(make_settings(tmp_path, auth="required", poll_interval_s=0.01))
    with serving(create_app(services)) as client:
        yield Api(client, services, "")
    services.close()


def sha(api: Api, name: str) -> str:
    return api.services.registry.resolve(ModelKind.CHECKPOINT, name).sha256


def key_for(api: Api, nickname: str, **roles: Any) -> str:
    return api.services.accounts.issue_key(nickname, **roles).key.key


def call(api: Api, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = api.client.request(method, path, headers=headers, **kwargs)
    return {**response.json(), "_http": response.status_code}


def node(api: Api, key: str, name: str, files: list[str], **body: Any) -> ScriptedNode:
    """A scripted node of ``key``'s account, registered with ``files`` installed."""
    scripted = ScriptedNode(api.client, key, name)  # type: ignore[arg-type]
    reply = scripted.register(files, **body)
    assert reply.status == 200, reply
    return scripted


def submit(api: Api, key: str, model: str, path: str = "/api/sd/txt2img/async", **body: Any) -> str:
    reply = call(api, "POST", path, key, json={**SMALL, "model": model, **body})
    assert reply["_http"] == 200, reply
    return str(reply["data"]["taskId"])


def test_registration_needs_a_key_allowed_to_run_nodes(net: Api) -> None:
    plain = key_for(net, "plain")
    donor = key_for(net, "donor", can_run_nodes=True)
    for key in ("", plain):
        refused = ScriptedNode(net.client, key, "gpu").register([])  # type: ignore[arg-type]
        assert (refused.status, refused.code, refused.reason) == (403, 1000, "forbidden")
    first = node(net, donor, "gpu", [sha(net, "a")])
    again = node(net, donor, "gpu", [sha(net, "a"), sha(net, "b")])
    assert first.node_id == again.node_id and first.session_id != again.session_id
    bad = ScriptedNode(net.client, donor, "x").register(["zz"])  # type: ignore[arg-type]
    assert (bad.status, bad.reason) == (400, "invalid") and "files.0.sha256" in bad.message


def test_a_node_speaks_only_for_its_own_account(net: Api) -> None:
    mine = key_for(net, "donor", can_run_nodes=True)
    theirs = key_for(net, "other", can_run_nodes=True)
    gpu = node(net, mine, "gpu", [sha(net, "a")])
    thief = ScriptedNode(net.client, theirs, "gpu", gpu.node_id, gpu.session_id)  # type: ignore[arg-type]
    reply = thief.claim()
    assert (reply.status, reply.code, reply.reason) == (403, 1000, "forbidden")
    unknown = ScriptedNode(net.client, mine, "gpu", "nope", "nope").claim()  # type: ignore[arg-type]
    assert (unknown.status, unknown.reason) == (404, "node_not_found")
    assert "register it again" in unknown.message
    ended = ScriptedNode(net.client, mine, "gpu", gpu.node_id, "old").claim()  # type: ignore[arg-type]
    assert (ended.status, ended.reason) == (404, "session_ended")


def test_a_node_gets_only_tasks_whose_files_it_has(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    has_a = node(net, donor, "has-a", [sha(net, "a")], slots=2)
    has_b = node(net, donor, "has-b", [sha(net, "b")])
    for_b = submit(net, user, "b")
    for_a = submit(net, user, "a")
    assert has_a.take()["id"] == for_a  # type: ignore[index]  # passes over the task for b
    assert has_a.take() is None  # a free slot, but nothing else it can run
    assert has_b.take()["id"] == for_b  # type: ignore[index]


def test_a_loaded_checkpoint_is_preferred_within_the_lookahead(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    gpu = node(net, donor, "gpu", [sha(net, "a"), sha(net, "b")], loaded=[sha(net, "b")], slots=8)
    first_a = submit(net, user, "a")
    for_b = submit(net, user, "b")
    assert gpu.take()["id"] == for_b  # type: ignore[index]  # b is loaded: it jumps one task
    assert gpu.take(loaded=[])["id"] == first_a  # type: ignore[index]
    lookahead = net.services.settings.affinity_lookahead
    queued_a = [submit(net, key_for(net, f"u{i}"), "a") for i in range(lookahead)]
    late_b = submit(net, user, "b")
    got = gpu.take(loaded=[sha(net, "b")])["id"]  # type: ignore[index]
    assert got == queued_a[0] and got != late_b  # beyond the look-ahead: order wins


def test_a_late_result_after_reassignment_is_refused_and_the_new_one_kept(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    slow = node(net, donor, "slow", [sha(net, "a")])
    fast = node(net, donor, "fast", [sha(net, "a")])
    task_id = submit(net, user, "a")
    assert slow.take()["id"] == task_id  # type: ignore[index]
    # Its lease runs out (what the sweeper does for an expired lease, done at once here).
    worker = f"node:{slow.node_id}:{slow.session_id}"
    assert net.services.store.release_worker(worker) == 1
    assert fast.take()["id"] == task_id  # type: ignore[index]
    new_image = png(colour=(200, 0, 0))
    assert fast.deliver(task_id, new_image).status == 200
    late_upload = slow.upload(task_id, slow.key_of(task_id), png(colour=(0, 0, 200)))
    late = slow.complete(task_id, [slow.key_of(task_id)])
    assert (late_upload.status, late.status, late.code, late.reason) == (
        409,
        409,
        4001,
        "task_not_held",
    )
    assert "no longer holds" in late.message
    status = call(net, "POST", "/api/sd/task/status", user, json={"taskId": task_id})["data"]
    assert status["status"] == TaskStatus.SUCCESS
    assert base64.b64decode(status["images"][0]) == new_image
    record = net.services.store.get(task_id)
    assert record is not None and record.attempts == 2


def test_inputs_and_results_are_for_the_holder_only(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    holder = node(net, donor, "holder", [sha(net, "a")])
    other = node(net, donor, "other", [sha(net, "a")])
    init = base64.b64encode(png(colour=(9, 9, 9))).decode()
    task_id = submit(net, user, "a", "/api/sd/img2img/async", init_image=init)
    task = holder.take()
    assert task is not None and task["id"] == task_id and task["kind"] == "img2img"
    key = task["params"]["init_image_key"]
    fetched = holder.input(task_id, key)
    assert fetched.status == 200 and fetched.content.startswith(b"\x89PNG")
    assert other.input(task_id, key).status == 409
    assert holder.input(task_id, "x/init.png").status == 400
    assert other.upload(task_id, f"{task_id}/a1-0.png", png()).status == 409
    bad_key = holder.upload(task_id, f"{task_id}/../0.png", png())
    assert (bad_key.status, bad_key.reason) == (400, "result_refused")
    # A refused result sends the task back to the queue: the holder has to claim it again.
    assert net.services.store.get(task_id).status == TaskStatus.PENDING  # type: ignore[union-attr]
    assert holder.take()["attempt"] == 2  # type: ignore[index]
    missing = holder.complete(task_id, [holder.key_of(task_id)])
    assert missing.status == 400 and "not uploaded" in missing.message


def test_heartbeat_renews_reports_progress_and_carries_cancel(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    gpu = node(net, donor, "gpu", [sha(net, "a")])
    task_id = submit(net, user, "a")
    gpu.take()
    assert gpu.heartbeat(task_id, 0.5).data == {"held": True, "cancelRequested": False}
    # Watchers see it through the service: a beat's progress is not a write of the row.
    assert net.services.tasks.get(task_id).progress == 0.5
    call(net, "POST", "/api/sd/task/cancel", user, json={"taskId": task_id})
    assert gpu.heartbeat(task_id, 0.5).data == {"held": True, "cancelRequested": True}
    assert gpu.fail(task_id, "cancelled by the user").status == 200
    assert gpu.fail(task_id, "cancelled by the user").status == 409


def test_going_offline_hands_tasks_back(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    gpu = node(net, donor, "gpu", [sha(net, "a")])
    task_id = submit(net, user, "a")
    gpu.take()
    assert gpu.offline().data == {"released": 1}
    record = net.services.store.get(task_id)
    assert record is not None and record.status == TaskStatus.PENDING
    listed = call(net, "GET", "/api/nodes")["data"]
    assert [n["status"] for n in listed] == ["offline"]
    assert gpu.claim().reason == "session_ended"  # the stopped process's session is over


def test_claim_waits_for_a_task_then_answers_null(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    gpu = node(net, donor, "gpu", [sha(net, "a")])
    started = time.monotonic()
    assert gpu.claim(wait_s=0.3).data == {"task": None, "pull": []}
    assert time.monotonic() - started >= 0.3


def test_node_lists_show_nicknames_never_emails(net: Api) -> None:
    donor = net.services.accounts.issue_key(
        "donor", email="donor@example.org", can_run_nodes=True
    ).key.key
    node(net, donor, "gpu-1", [sha(net, "a")])
    public = call(net, "GET", "/api/nodes")
    assert public["_http"] == 200
    (listed,) = public["data"]
    assert listed.keys() == {"id", "owner", "name", "tasksDone", "status"}
    assert (listed["owner"], listed["name"], listed["status"]) == ("donor", "gpu-1", "online")
    assert "example.org" not in str(public)
    mine = call(net, "GET", "/api/nodes/mine", donor)["data"]
    assert [n["name"] for n in mine] == ["gpu-1"] and mine[0]["installed"] == [sha(net, "a")]
    assert call(net, "GET", "/api/nodes/mine", key_for(net, "nobody"))["data"] == []


def test_an_admin_asks_a_node_to_pull_a_catalog_model(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    admin = key_for(net, "root", is_admin=True)
    gpu = node(net, donor, "gpu", [sha(net, "a")])
    path = f"/api/admin/nodes/{gpu.node_id}/pull"
    assert call(net, "POST", path, donor, json={"model": "chillout_mix"})["_http"] == 403
    unknown = call(net, "POST", path, admin, json={"model": "no-such-model"})
    assert unknown["_http"] == 400
    name = net.services.registry.catalog.find("chillout_mix").name
    reply = call(net, "POST", path, admin, json={"model": "chillout_mix"})
    assert reply["_http"] == 200 and reply["data"]["pull"] == [name]
    missing = call(net, "POST", "/api/admin/nodes/nope/pull", admin, json={"model": "chillout_mix"})
    assert missing["_http"] == 404
    user = key_for(net, "user")
    task_id = submit(net, user, "a")
    assert gpu.claim().data == {"task": None, "pull": [name]}  # pulls come first
    assert gpu.take()["id"] == task_id  # type: ignore[index]


@contextmanager
def remote_worker(
    net: Api, key: str, name: str, http: httpx.Client | None = None
) -> Iterator[tuple[Worker, threading.Thread]]:
    """The real node loop (RemoteQueue + Worker on a FakeEngine) against the live server,
    running in a thread for the block."""
    stop = threading.Event()
    client = NodeClient(str(net.client.base_url), key, stop=stop, http=http)
    files = (NodeFile(sha(net, "a"), ModelKind.CHECKPOINT, "a", "a.safetensors", 256),)
    queue = RemoteQueue(
        client, lambda: NodeDescription(name, {"device": "fake"}, files), stop=stop, wait_s=0.2
    )
    session = queue.register()
    worker = Worker(
        queue,
        FakeEngine(step_s=0.02),
        net.services.registry,
        RemoteFiles(client, lambda: queue.session),
        worker_id=session.worker_id,
        lease_s=30,
        beat_s=0.02,
    )
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker, thread
    finally:
        stop.set()
        thread.join(10)
        queue.close(wait_s=10)  # the last long-poll ends before the app stops
        client.close()


def test_the_worker_loop_runs_over_http(net: Api) -> None:
    """The same Worker loop, on a RemoteQueue talking to the API: runs, cancels, completes."""
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    with remote_worker(net, donor, "remote"):
        done = submit(net, user, "a")
        init = base64.b64encode(png(colour=(9, 9, 9))).decode()
        redrawn = submit(net, user, "a", "/api/sd/img2img/async", init_image=init)
        slow = submit(net, user, "a", steps=150)
        wait_until(net, done, {TaskStatus.SUCCESS})
        wait_until(net, redrawn, {TaskStatus.SUCCESS})  # its input came over HTTP
        wait_until(net, slow, {TaskStatus.PROCESSING})
        call(net, "POST", "/api/sd/task/cancel", user, json={"taskId": slow})
        cancelled = wait_until(net, slow, {TaskStatus.CANCELLED})
        assert cancelled["progress"] < 0.9 and "cancel" in cancelled["message"]
    status = call(net, "POST", "/api/sd/task/status", user, json={"taskId": done})["data"]
    assert Image.open(io.BytesIO(base64.b64decode(status["images"][0]))).size == (64, 64)
    (listed,) = call(net, "GET", "/api/nodes")["data"]
    assert listed["tasksDone"] == 2


class CuttableTransport(httpx.HTTPTransport):
    """A transport whose network can be cut: every request fails to connect while ``cut``."""

    cut = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut:
            raise httpx.ConnectError("the network is cut", request=request)
        return super().handle_request(request)


def test_a_network_cut_drops_a_lost_lease_and_the_node_serves_on(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    cable = CuttableTransport()
    with (
        httpx.Client(base_url=net.client.base_url, transport=cable) as http,
        remote_worker(net, donor, "remote", http) as (worker, thread),
    ):
        task_id = submit(net, user, "a", steps=150)
        wait_until(net, task_id, {TaskStatus.PROCESSING})
        cable.cut = True
        # While the node is unreachable its lease runs out and another node takes the task.
        assert net.services.store.release_worker(worker.worker_id) == 1
        other = node(net, donor, "other", [sha(net, "a")])
        assert other.take()["id"] == task_id  # type: ignore[index]
        assert other.deliver(task_id, png(colour=(5, 5, 5))).status == 200
        time.sleep(0.5)
        assert thread.is_alive()  # the cut did not kill the node
        cable.cut = False
        after = submit(net, user, "a")
        wait_until(net, after, {TaskStatus.SUCCESS})  # it serves on
    record = net.services.tasks.get(task_id)
    assert record.status == TaskStatus.SUCCESS and record.attempts == 2
    assert net.services.tasks.images(record) == [png(colour=(5, 5, 5))]  # the late node: nothing
    rows = {n["name"]: n["tasksDone"] for n in call(net, "GET", "/api/nodes")["data"]}
    assert rows == {"remote": 1, "other": 1}


def wait_until(api: Api, task_id: str, statuses: set[int], timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    data: Any = None
    while time.monotonic() < deadline:
        data = api.services.tasks.get(task_id)
        if data.status in statuses:
            break
        time.sleep(0.02)
    assert data is not None and data.status in statuses, data
    return {"progress": data.progress, "message": data.error or ""}
