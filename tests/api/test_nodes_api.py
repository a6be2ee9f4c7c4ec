"""Nodes over HTTP (in process): registration, claims with Offer and affinity, leases, inputs
and results only for the holder, late results, listings, pulls, and the remote worker loop."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from dan.api.app import create_app
from dan.domain import ModelKind, TaskStatus
from dan.engine.fake import FakeEngine
from dan.nodes.service import NodeDescription
from dan.services import build_services
from dan.workers.loop import Worker
from dan.workers.remote import NodeClient, RemoteFiles, RemoteQueue
from tests.api.conftest import Api, install_dummy_checkpoint, make_settings
from tests.fixtures.live import serving

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Api]:
    """A server that requires keys, with two checkpoints, ``a`` and ``b``."""
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
    if response.headers.get("content-type", "").startswith("image/"):
        return response
    return {**response.json(), "_http": response.status_code}


def register(api: Api, key: str, name: str, installed: list[str], **body: Any) -> str:
    reply = call(
        api, "POST", "/api/node/register", key, json={"name": name, "installed": installed, **body}
    )
    assert reply["_http"] == 200, reply
    return str(reply["data"]["nodeId"])


def claim(api: Api, key: str, node_id: str, **body: Any) -> dict[str, Any]:
    reply = call(api, "POST", "/api/node/claim", key, json={"nodeId": node_id, "waitS": 0, **body})
    assert reply["_http"] == 200, reply
    return reply["data"]  # type: ignore[no-any-return]


def submit(api: Api, key: str, model: str, path: str = "/api/sd/txt2img/async", **body: Any) -> str:
    reply = call(api, "POST", path, key, json={**SMALL, "model": model, **body})
    assert reply["_http"] == 200, reply
    return str(reply["data"]["taskId"])


def png(colour: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(api: Api, key: str, node_id: str, task_id: str, name: str, data: bytes) -> Any:
    params = {"nodeId": node_id, "taskId": task_id, "key": f"{task_id}/{name}"}
    return call(api, "PUT", "/api/node/result", key, params=params, content=data)


def complete(api: Api, key: str, node_id: str, task_id: str, keys: list[str]) -> Any:
    result = {"image_keys": keys, "seeds": [1] * len(keys)}
    body = {"nodeId": node_id, "taskId": task_id, "result": result}
    return call(api, "POST", "/api/node/complete", key, json=body)


def test_registration_needs_a_key_allowed_to_run_nodes(net: Api) -> None:
    plain = key_for(net, "plain")
    donor = key_for(net, "donor", can_run_nodes=True)
    body = {"name": "gpu", "installed": []}
    assert call(net, "POST", "/api/node/register", json=body)["_http"] == 403
    refused = call(net, "POST", "/api/node/register", plain, json=body)
    assert (refused["_http"], refused["code"]) == (403, 1000)
    first = register(net, donor, "gpu", [sha(net, "a")])
    again = register(net, donor, "gpu", [sha(net, "a"), sha(net, "b")])
    assert first == again
    bad = call(net, "POST", "/api/node/register", donor, json={"name": "x", "installed": ["zz"]})
    assert bad["_http"] == 400 and "sha256" in bad["message"]


def test_a_node_speaks_only_for_its_own_account(net: Api) -> None:
    mine = key_for(net, "donor", can_run_nodes=True)
    theirs = key_for(net, "other", can_run_nodes=True)
    node_id = register(net, mine, "gpu", [sha(net, "a")])
    reply = call(net, "POST", "/api/node/claim", theirs, json={"nodeId": node_id, "waitS": 0})
    assert (reply["_http"], reply["code"]) == (403, 1000)
    unknown = call(net, "POST", "/api/node/claim", mine, json={"nodeId": "nope", "waitS": 0})
    assert unknown["_http"] == 404 and "register it again" in unknown["message"]


def test_a_node_gets_only_tasks_whose_files_it_has(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    has_a = register(net, donor, "has-a", [sha(net, "a")])
    has_b = register(net, donor, "has-b", [sha(net, "b")])
    for_b = submit(net, user, "b")
    for_a = submit(net, user, "a")
    assert claim(net, donor, has_a)["task"]["id"] == for_a  # passes over the task for b
    assert claim(net, donor, has_a)["task"] is None
    assert claim(net, donor, has_b)["task"]["id"] == for_b


def test_a_loaded_checkpoint_is_preferred_within_the_lookahead(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    node = register(net, donor, "gpu", [sha(net, "a"), sha(net, "b")], loaded=[sha(net, "b")])
    first_a = submit(net, user, "a")
    for_b = submit(net, user, "b")
    assert claim(net, donor, node)["task"]["id"] == for_b  # b is loaded: it jumps one task
    assert claim(net, donor, node, loaded=[])["task"]["id"] == first_a
    lookahead = net.services.settings.affinity_lookahead
    queued_a = [submit(net, key_for(net, f"u{i}"), "a") for i in range(lookahead)]
    late_b = submit(net, user, "b")
    got = claim(net, donor, node, loaded=[sha(net, "b")])["task"]["id"]
    assert got == queued_a[0] and got != late_b  # beyond the look-ahead: order wins


def test_a_late_result_after_reassignment_is_refused_and_the_new_one_kept(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    slow = register(net, donor, "slow", [sha(net, "a")])
    fast = register(net, donor, "fast", [sha(net, "a")])
    task_id = submit(net, user, "a")
    assert claim(net, donor, slow)["task"]["id"] == task_id
    # Its lease runs out (what the sweeper does for an expired lease, done at once here).
    assert net.services.store.release_worker(f"node:{slow}") == 1
    assert claim(net, donor, fast)["task"]["id"] == task_id
    new_image = png((200, 0, 0))
    assert upload(net, donor, fast, task_id, "0.png", new_image)["_http"] == 200
    assert complete(net, donor, fast, task_id, [f"{task_id}/0.png"])["_http"] == 200
    late_upload = upload(net, donor, slow, task_id, "0.png", png((0, 0, 200)))
    late = complete(net, donor, slow, task_id, [f"{task_id}/0.png"])
    assert (late_upload["_http"], late["_http"], late["code"]) == (409, 409, 4001)
    assert "no longer holds" in late["message"]
    status = call(net, "POST", "/api/sd/task/status", user, json={"taskId": task_id})["data"]
    assert status["status"] == TaskStatus.SUCCESS
    assert base64.b64decode(status["images"][0]) == new_image
    info = call(net, "GET", "/api/user/info", donor)["data"]
    assert info["honor"] == net.services.settings.signup_honor + 1  # paid once, to the holder


def test_inputs_and_results_are_for_the_holder_only(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    holder = register(net, donor, "holder", [sha(net, "a")])
    other = register(net, donor, "other", [sha(net, "a")])
    init = base64.b64encode(png((9, 9, 9))).decode()
    task_id = submit(net, user, "a", "/api/sd/img2img/async", init_image=init)
    task = claim(net, donor, holder)["task"]
    assert task["id"] == task_id and task["kind"] == "img2img"
    key = task["params"]["init_image_key"]
    params = {"nodeId": holder, "taskId": task_id, "key": key}
    fetched = call(net, "GET", "/api/node/input", donor, params=params)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    refused = call(net, "GET", "/api/node/input", donor, params={**params, "nodeId": other})
    assert refused["_http"] == 409
    elsewhere = call(net, "GET", "/api/node/input", donor, params={**params, "key": "x/init.png"})
    assert elsewhere["_http"] == 400
    assert upload(net, donor, other, task_id, "0.png", png())["_http"] == 409
    assert upload(net, donor, holder, task_id, "../0.png", png())["_http"] == 400
    assert upload(net, donor, holder, task_id, "0.png", b"not a png")["_http"] == 400
    missing = complete(net, donor, holder, task_id, [f"{task_id}/0.png"])
    assert missing["_http"] == 400 and "not uploaded" in missing["message"]


def test_heartbeat_renews_reports_progress_and_carries_cancel(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    node = register(net, donor, "gpu", [sha(net, "a")])
    task_id = submit(net, user, "a")
    claim(net, donor, node)
    body = {"nodeId": node, "taskId": task_id, "progress": 0.5}
    beat = call(net, "POST", "/api/node/heartbeat", donor, json=body)["data"]
    assert beat == {"held": True, "cancelRequested": False}
    record = net.services.store.get(task_id)
    assert record is not None and record.progress == 0.5
    call(net, "POST", "/api/sd/task/cancel", user, json={"taskId": task_id})
    beat = call(net, "POST", "/api/node/heartbeat", donor, json=body)["data"]
    assert beat == {"held": True, "cancelRequested": True}
    body = {"nodeId": node, "taskId": task_id, "error": "cancelled by the user"}
    assert call(net, "POST", "/api/node/fail", donor, json=body)["_http"] == 200
    again = call(net, "POST", "/api/node/fail", donor, json=body)
    assert again["_http"] == 409


def test_going_offline_hands_tasks_back(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    node = register(net, donor, "gpu", [sha(net, "a")])
    task_id = submit(net, user, "a")
    claim(net, donor, node)
    reply = call(net, "POST", "/api/node/offline", donor, json={"nodeId": node})
    assert reply["data"] == {"released": 1}
    record = net.services.store.get(task_id)
    assert record is not None and record.status == TaskStatus.PENDING
    listed = call(net, "GET", "/api/nodes")["data"]
    assert [n["status"] for n in listed] == ["offline"]


def test_claim_waits_for_a_task_then_answers_null(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    node = register(net, donor, "gpu", [sha(net, "a")])
    started = time.monotonic()
    assert claim(net, donor, node, waitS=0.3) == {"task": None, "pull": []}
    assert time.monotonic() - started >= 0.3


def test_node_lists_show_nicknames_never_emails(net: Api) -> None:
    donor = net.services.accounts.issue_key(
        "donor", email="donor@example.org", can_run_nodes=True
    ).key.key
    register(net, donor, "gpu-1", [sha(net, "a")])
    public = call(net, "GET", "/api/nodes")
    assert public["_http"] == 200
    (node,) = public["data"]
    assert node.keys() == {"id", "owner", "name", "tasksDone", "status"}
    assert (node["owner"], node["name"], node["status"]) == ("donor", "gpu-1", "online")
    assert "example.org" not in str(public)
    mine = call(net, "GET", "/api/nodes/mine", donor)["data"]
    assert [n["name"] for n in mine] == ["gpu-1"] and mine[0]["installed"] == [sha(net, "a")]
    assert call(net, "GET", "/api/nodes/mine", key_for(net, "nobody"))["data"] == []


def test_an_admin_asks_a_node_to_pull_a_catalog_model(net: Api) -> None:
    donor = key_for(net, "donor", can_run_nodes=True)
    admin = key_for(net, "root", is_admin=True)
    node = register(net, donor, "gpu", [sha(net, "a")])
    path = f"/api/admin/nodes/{node}/pull"
    assert call(net, "POST", path, donor, json={"model": "chillout_mix"})["_http"] == 403
    unknown = call(net, "POST", path, admin, json={"model": "no-such-model"})
    assert unknown["_http"] == 400
    name = net.services.registry.catalog.find("chillout_mix").name
    reply = call(net, "POST", path, admin, json={"model": "chillout_mix"})
    assert reply["_http"] == 200 and reply["data"]["pull"] == [name]
    assert (
        call(net, "POST", "/api/admin/nodes/nope/pull", admin, json={"model": "chillout_mix"})[
            "_http"
        ]
        == 404
    )
    user = key_for(net, "user")
    task_id = submit(net, user, "a")
    assert claim(net, donor, node) == {"task": None, "pull": [name]}  # pulls come first
    assert claim(net, donor, node)["task"]["id"] == task_id


def test_the_worker_loop_runs_over_http(net: Api) -> None:
    """The same Worker loop, on a RemoteQueue talking to the API: runs, cancels, completes."""
    donor = key_for(net, "donor", can_run_nodes=True)
    user = key_for(net, "user")
    stop = threading.Event()
    client = NodeClient(str(net.client.base_url), donor, stop=stop)
    installed = frozenset({sha(net, "a")})
    queue = RemoteQueue(
        client,
        lambda: NodeDescription("remote", {"device": "fake"}, installed),
        stop=stop,
        wait_s=0.2,
        beat_s=0.02,
    )
    queue.register()
    files = RemoteFiles(client, lambda: queue.node_id)
    engine = FakeEngine(step_s=0.02)
    worker = Worker(queue, engine, net.services.registry, files, worker_id="remote", lease_s=30)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        done = submit(net, user, "a")
        init = base64.b64encode(png((9, 9, 9))).decode()
        redrawn = submit(net, user, "a", "/api/sd/img2img/async", init_image=init)
        slow = submit(net, user, "a", steps=150)
        wait_until(net, done, {TaskStatus.SUCCESS})
        wait_until(net, redrawn, {TaskStatus.SUCCESS})  # its input came over HTTP
        wait_until(net, slow, {TaskStatus.PROCESSING})
        call(net, "POST", "/api/sd/task/cancel", user, json={"taskId": slow})
        cancelled = wait_until(net, slow, {TaskStatus.FAILURE})
        assert cancelled["progress"] < 0.9 and "cancel" in cancelled["message"]
    finally:
        stop.set()
        thread.join(10)
        queue.close(wait_s=10)  # the last long-poll ends before the app stops
    status = call(net, "POST", "/api/sd/task/status", user, json={"taskId": done})["data"]
    assert Image.open(io.BytesIO(base64.b64decode(status["images"][0]))).size == (64, 64)
    (node,) = call(net, "GET", "/api/nodes")["data"]
    assert node["tasksDone"] == 2


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
    stop = threading.Event()
    http = httpx.Client(base_url=net.client.base_url, transport=cable)
    client = NodeClient(str(net.client.base_url), donor, stop=stop, http=http)
    installed = frozenset({sha(net, "a")})
    queue = RemoteQueue(
        client,
        lambda: NodeDescription("remote", {}, installed),
        stop=stop,
        wait_s=0.2,
        beat_s=0.02,
    )
    remote = queue.register()
    files = RemoteFiles(client, lambda: queue.node_id)
    worker = Worker(
        queue, FakeEngine(step_s=0.02), net.services.registry, files, worker_id="r", lease_s=30
    )
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        task_id = submit(net, user, "a", steps=150)
        wait_until(net, task_id, {TaskStatus.PROCESSING})
        cable.cut = True
        # While the node is unreachable its lease runs out and another node takes the task.
        assert net.services.store.release_worker(f"node:{remote}") == 1
        other = register(net, donor, "other", [sha(net, "a")])
        assert claim(net, donor, other)["task"]["id"] == task_id
        assert upload(net, donor, other, task_id, "0.png", png((5, 5, 5)))["_http"] == 200
        assert complete(net, donor, other, task_id, [f"{task_id}/0.png"])["_http"] == 200
        time.sleep(0.5)
        assert thread.is_alive()  # the cut did not kill the node
        cable.cut = False
        after = submit(net, user, "a")
        wait_until(net, after, {TaskStatus.SUCCESS})  # it serves on
    finally:
        stop.set()
        thread.join(10)
        queue.close(wait_s=10)
    record = net.services.tasks.get(task_id)
    assert record.status == TaskStatus.SUCCESS and record.attempts == 2
    assert net.services.tasks.images(record) == [png((5, 5, 5))]  # the late node changed nothing
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
