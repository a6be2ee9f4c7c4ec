"""The live event stream of a task (server-sent events) over real HTTP: order, previews, the
result at the end, resuming after a disconnect, ownership, a remote node's task, and several
API replicas; also a person's history and CORS."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dan.api.app import create_app
from dan.domain import ModelKind
from dan.services import Services, build_services
from tests.api.conftest import install_dummy_checkpoint, make_settings
from tests.fixtures.live import serving
from tests.fixtures.postgres import schema_url
from tests.fixtures.scripted_node import ScriptedNode, png
from tests.fixtures.working import working
from tests.store.conftest import POSTGRES_URL

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}


@dataclass
class Live:
    client: httpx.Client
    services: Services

    def key(self, nickname: str, **roles: Any) -> str:
        return self.services.accounts.issue_key(nickname, **roles).key.key

    def submit(self, key: str, **body: Any) -> str:
        reply = self.client.post(
            "/api/sd/txt2img/async", json={**SMALL, **body}, headers=bearer(key)
        )
        assert reply.status_code == 200, reply.text
        return str(reply.json()["data"]["taskId"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def live(tmp_path: Path, **overrides: Any) -> Iterator[Live]:
    install_dummy_checkpoint(tmp_path / "models")
    services = build_services(make_settings(tmp_path, auth="required", **overrides))
    try:
        with serving(create_app(services)) as client:
            yield Live(client, services)
    finally:
        services.close()


def events(
    client: httpx.Client, task_id: str, key: str, *, last_id: int | None = None, take: int = 0
) -> list[dict[str, Any]]:
    """The stream's events as ``{event, id, data}`` (data parsed), until it ends or ``take``
    events came (then the connection is dropped, as a client going away does)."""
    headers = bearer(key) | ({"Last-Event-ID": str(last_id)} if last_id is not None else {})
    found: list[dict[str, Any]] = []
    url = "/api/sd/task/events"
    with client.stream("GET", url, params={"taskId": task_id}, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue  # a keep-alive comment
            if line == "":
                if current:
                    found.append({**current, "data": json.loads(current["data"])})
                    current = {}
                    if take and len(found) >= take:
                        break
                continue
            field, _, value = line.partition(":")
            current[field] = value.removeprefix(" ")
    return found


def test_a_task_streams_its_state_in_order_then_its_result(tmp_path: Path) -> None:
    with live(tmp_path) as net, working(net.services, step_s=0.05, previews=True):
        key = net.key("user")
        task_id = net.submit(key, steps=12)
        stream = events(net.client, task_id, key)
        status = net.client.post(
            "/api/sd/task/status", json={"taskId": task_id}, headers=bearer(key)
        )
    assert [int(e["id"]) for e in stream] == list(range(1, len(stream) + 1))
    *states, done = stream
    assert {e["event"] for e in states} == {"state"} and done["event"] == "done"
    progress = [e["data"]["progress"] for e in states]
    assert progress == sorted(progress) and len(set(progress)) > 2  # it moved, never back
    running = [e["data"] for e in states if e["data"]["status"] == 1 and e["data"]["progress"] > 0]
    assert running and all(s["etaS"] is not None and s["etaS"] >= 0 for s in running)
    previews = [e["data"]["preview"] for e in states if "preview" in e["data"]]
    assert previews and previews[-1].startswith("data:image/png;base64,")
    assert base64.b64decode(previews[-1].split(",", 1)[1]).startswith(b"\x89PNG")
    assert done["data"] == status.json()["data"] and done["data"]["images"]


def test_a_stream_resumes_after_the_last_event_id(tmp_path: Path) -> None:
    with live(tmp_path) as net, working(net.services, step_s=0.05, previews=True):
        key = net.key("user")
        task_id = net.submit(key, steps=16)
        first = events(net.client, task_id, key, take=2)
        rest = events(net.client, task_id, key, last_id=int(first[-1]["id"]))
    assert [e["id"] for e in first] == ["1", "2"]
    assert int(rest[0]["id"]) == 3 and rest[0]["event"] == "state"  # the state now, next id
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["status"] == 2


def test_another_accounts_task_cannot_be_watched(tmp_path: Path) -> None:
    with live(tmp_path) as net:
        task_id = net.submit(net.key("owner"))
        response = net.client.get(
            "/api/sd/task/events", params={"taskId": task_id}, headers=bearer(net.key("other"))
        )
        anonymous = net.client.get("/api/sd/task/events", params={"taskId": task_id})
    assert (response.status_code, response.json()["code"]) == (404, 3000)
    assert anonymous.status_code == 403


def test_a_remote_nodes_task_streams_its_progress_and_preview(tmp_path: Path) -> None:
    with live(tmp_path) as net:
        user = net.key("user")
        donor = net.key("donor", can_run_nodes=True)
        node = ScriptedNode(net.client, donor, "gpu")
        checkpoint = net.services.registry.list(ModelKind.CHECKPOINT)[0].sha256
        assert node.register([checkpoint]).status == 200
        task_id = net.submit(user)
        assert node.take()["id"] == task_id  # type: ignore[index]
        sketch = png((8, 8), (200, 10, 10))
        assert node.heartbeat(task_id, 0.5, preview=sketch).status == 200
        watched = events(net.client, task_id, user, take=1)
        too_big = node.heartbeat(task_id, 0.6, preview=png((1024, 1024)))
        not_png = node.heartbeat(task_id, 0.6, preview=b"GIF89a" + b"\0" * 64)
        assert node.deliver(task_id).status == 200
        rest = events(net.client, task_id, user, last_id=1)
    state = watched[0]["data"]
    assert (state["status"], state["progress"]) == (1, 0.5)
    assert base64.b64decode(state["preview"].split(",", 1)[1]) == sketch
    assert (too_big.status, too_big.reason) == (400, "invalid")
    assert (not_png.status, not_png.reason) == (400, "invalid")
    assert rest[-1]["event"] == "done" and rest[-1]["data"]["images"]


@pytest.mark.postgres
def test_progress_reaches_a_stream_on_another_replica(tmp_path: Path) -> None:
    if not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL: replicas share PostgreSQL")
    with ExitStack() as stack:
        url = stack.enter_context(schema_url(POSTGRES_URL))
        replicas = []
        install_dummy_checkpoint(tmp_path / "models")  # the same file on both replicas
        for name in ("a", "b"):
            settings = make_settings(
                tmp_path / name, auth="required", database_url=url, models_dir=tmp_path / "models"
            )
            services = build_services(settings)
            stack.callback(services.close)
            replicas.append(Live(stack.enter_context(serving(create_app(services))), services))
        a, b = replicas
        user, donor = a.key("user"), a.key("donor", can_run_nodes=True)
        node = ScriptedNode(a.client, donor, "gpu")
        checkpoint = a.services.registry.list(ModelKind.CHECKPOINT)[0].sha256
        assert node.register([checkpoint]).status == 200
        task_id = b.submit(user)
        assert node.take()["id"] == task_id  # type: ignore[index]
        assert node.heartbeat(task_id, 0.25).status == 200  # through replica A
        # Progress is not written per beat: it reaches B by NOTIFY, within a quarter second.
        wait_for_progress(b, task_id, user, 0.25)
        seen = events(b.client, task_id, user, take=1)  # watched on replica B
        assert node.deliver(task_id).status == 200
        done = events(b.client, task_id, user, last_id=1)
    assert seen[0]["data"]["progress"] == 0.25
    assert done[-1]["event"] == "done" and done[-1]["data"]["status"] == 2


def wait_for_progress(replica: Live, task_id: str, key: str, progress: float) -> None:
    deadline = time.monotonic() + 5
    body = {"taskId": task_id}
    while time.monotonic() < deadline:
        reply = replica.client.post("/api/sd/task/status", json=body, headers=bearer(key))
        if reply.json()["data"]["progress"] == progress:
            return
        time.sleep(0.02)
    raise AssertionError(f"progress {progress} never reached the other replica: {reply.json()}")


def test_history_lists_my_tasks_newest_first_a_page_at_a_time(tmp_path: Path) -> None:
    with live(tmp_path, max_pending_per_account=20) as net:
        mine, theirs = net.key("me"), net.key("them")
        ids = [net.submit(mine, prompt=f"fox {n}", seed=n) for n in range(5)]
        net.submit(theirs)
        pages, cursor = [], None
        while True:
            params = {"limit": 2} | ({"before": cursor} if cursor else {})
            reply = net.client.get("/api/sd/tasks", params=params, headers=bearer(mine)).json()
            pages.append(reply["data"]["tasks"])
            cursor = reply["data"]["next"]
            if cursor is None:
                break
        bad = net.client.get("/api/sd/tasks", params={"before": "x"}, headers=bearer(mine))
    listed = [task for page in pages for task in page]
    assert [t["taskId"] for t in listed] == ids[::-1]  # newest first, none of theirs
    assert [len(page) for page in pages] == [2, 2, 1]
    assert (listed[0]["prompt"], listed[0]["seed"], listed[0]["width"]) == ("fox 4", 4, 64)
    assert (listed[0]["kind"], listed[0]["status"]) == ("txt2img", 0)
    assert bad.status_code == 400 and "before" in bad.json()["message"]


def test_cors_lets_the_configured_origins_in(tmp_path: Path) -> None:
    with live(tmp_path, cors_origins="https://app.example") as net:
        headers = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        allowed = net.client.options("/api/sd/txt2img/async", headers=headers)
        other = net.client.options(
            "/api/sd/txt2img/async", headers={**headers, "Origin": "https://evil.example"}
        )
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers
