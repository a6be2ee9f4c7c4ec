"""Webhooks over real HTTP: a task submitted with a callback_url POSTs its final status, signed
with the account's secret, to a real local receiver when it succeeds, fails or is cancelled;
failed tries are retried, redirects are not followed, rotation changes the signature, and the
SSRF guard refuses non-public addresses at submit and at send time. The API runs on SQLite
and on PostgreSQL (where several replicas share the work)."""

from __future__ import annotations

import base64
import hashlib
import hmac
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
from dan.db.tables import webhooks
from dan.engine.fake import FakeEngine
from dan.services import Services, build_services
from dan.webhooks.store import new_webhook
from tests.api.conftest import install_dummy_checkpoint, make_settings
from tests.fixtures.live import serving
from tests.fixtures.postgres import schema_url
from tests.fixtures.webhook_receiver import Received, receiving
from tests.fixtures.working import working
from tests.store.conftest import POSTGRES_URL

SMALL = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
FAST = {
    "auth": "required",
    "webhook_allow_private": True,  # the receiver is on loopback
    "webhook_retry_s": 0.05,
    "webhook_poll_s": 0.02,
    "webhook_max_attempts": 3,
}


@dataclass
class Live:
    client: httpx.Client
    services: Services
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def submit(self, url: str | None, path: str = "/api/sd/txt2img/async", **body: Any) -> str:
        reply = self.post(path, {**SMALL, **body, "callback_url": url})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["data"]["taskId"])

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return self.client.post(path, json=body, headers=self.auth)

    def secret(self) -> str:
        reply = self.client.get("/api/user/webhook", headers=self.auth)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["data"]["secret"])

    def status(self, task_id: str) -> dict[str, Any]:
        data = self.post("/api/sd/task/status", {"taskId": task_id}).json()["data"]
        return data  # type: ignore[no-any-return]

    def settled(self, task_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The task's status once its webhook is delivered or failed."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(task_id))["callback"]["state"] not in ("delivered", "failed"):
            assert time.monotonic() < deadline, status["callback"]
            time.sleep(0.02)
        return status


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None: the default SQLite file; else a PostgreSQL URL of a schema of its own."""
    if request.param == "sqlite":
        yield None
    elif not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL to run the webhooks on PostgreSQL")
    else:
        with schema_url(POSTGRES_URL) as url:
            yield url


@contextmanager
def live(tmp_path: Path, database: str | None = None, **overrides: Any) -> Iterator[Live]:
    values = {**FAST, **overrides}
    models = Path(values.get("models_dir", tmp_path / "models"))
    if not (models / "checkpoints").is_dir():  # replicas share one
        install_dummy_checkpoint(models)
    if database is not None:
        values["database_url"] = database
    services = build_services(make_settings(tmp_path, **values))
    try:
        with serving(create_app(services)) as client:
            key = services.accounts.issue_key("user").key.key
            yield Live(client, services, key)
    finally:
        services.close()


def signed_by(secret: str, hook: Received) -> bool:
    """The receiver's check, as the README shows it."""
    timestamp = hook.headers["x-dan-timestamp"]
    signed = f"{timestamp}.".encode() + hook.body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, hook.headers["x-dan-signature"])


def without_callback(status: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in status.items() if name != "callback"}


def test_a_finished_task_posts_its_signed_status(tmp_path: Path, database: str | None) -> None:
    with live(tmp_path, database) as net, working(net.services), receiving() as receiver:
        secret = net.secret()
        task_id = net.submit(receiver.url)
        (hook,) = receiver.wait(1)
        status = net.settled(task_id)
    payload = json.loads(hook.body)
    assert hook.path == "/hooks/dan" and hook.headers["content-type"] == "application/json"
    assert hook.headers["x-dan-task-id"] == task_id and hook.headers["x-dan-attempt"] == "1"
    assert signed_by(secret, hook)
    assert abs(int(hook.headers["x-dan-timestamp"]) - time.time()) < 600
    # The body is the task-status answer: the same data a poll reads, images included.
    assert (payload["code"], payload["message"]) == (200, "success")
    assert payload["data"] == without_callback(status)
    assert payload["data"]["status"] == 2 and payload["data"]["taskId"] == task_id
    assert base64.b64decode(payload["data"]["images"][0]).startswith(b"\x89PNG")
    assert status["callback"] == {"state": "delivered", "attempts": 1, "lastError": None}


def test_a_failed_task_posts_its_failure(tmp_path: Path, database: str | None) -> None:
    with live(tmp_path, database) as net, working(net.services), receiving() as receiver:
        task_id = net.submit(receiver.url, prompt=FakeEngine.FAIL_PROMPT)
        (hook,) = receiver.wait(1)
        secret = net.secret()
    data = json.loads(hook.body)["data"]
    assert signed_by(secret, hook)
    assert (data["taskId"], data["status"]) == (task_id, 3)
    assert "told to fail" in data["message"] and "images" not in data


def test_a_cancelled_task_posts_its_cancellation(tmp_path: Path, database: str | None) -> None:
    with live(tmp_path, database) as net, receiving() as receiver:  # no worker: it waits
        task_id = net.submit(receiver.url)
        assert net.status(task_id)["callback"] == {
            "state": "waiting",
            "attempts": 0,
            "lastError": None,
        }
        assert net.post("/api/sd/task/cancel", {"taskId": task_id}).status_code == 200
        (hook,) = receiver.wait(1)
        secret = net.secret()
    data = json.loads(hook.body)["data"]
    assert signed_by(secret, hook)
    assert (data["taskId"], data["status"], data["message"]) == (
        task_id,
        3,
        "cancelled by the user",
    )


def test_a_failed_try_is_retried_until_the_last(tmp_path: Path, database: str | None) -> None:
    with (
        live(tmp_path, database) as net,
        working(net.services),
        receiving([500, 503]) as flaky,
        receiving([500, 500, 500]) as broken,
    ):
        recovered, lost = net.submit(flaky.url), net.submit(broken.url, seed=2)
        tries = flaky.wait(3)
        assert net.settled(recovered)["callback"] == {
            "state": "delivered",
            "attempts": 3,
            "lastError": None,
        }
        assert net.settled(lost)["callback"] == {
            "state": "failed",
            "attempts": 3,
            "lastError": "answered HTTP 500",
        }
        secret = net.secret()
    assert [hook.headers["x-dan-attempt"] for hook in tries] == ["1", "2", "3"]
    assert len({hook.body for hook in tries}) == 1  # the same status each time
    assert all(signed_by(secret, hook) for hook in tries)
    assert len(broken.received) == 3


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    with (
        live(tmp_path, webhook_max_attempts=1) as net,
        working(net.services),
        receiving() as elsewhere,
        receiving([302], location=elsewhere.url) as moved,
    ):
        task_id = net.submit(moved.url)
        callback = net.settled(task_id)["callback"]
    assert callback["state"] == "failed" and "redirects are not followed" in callback["lastError"]
    assert len(moved.received) == 1 and elsewhere.received == []


def test_rotating_the_secret_changes_the_signature(tmp_path: Path, database: str | None) -> None:
    with live(tmp_path, database) as net, working(net.services), receiving() as receiver:
        old = net.secret()
        assert net.secret() == old  # made once, then kept
        net.submit(receiver.url)
        receiver.wait(1)
        rotated = net.post("/api/user/webhook/rotate")
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["data"]["secret"]
        assert new != old and net.secret() == new
        net.submit(receiver.url, seed=2)
        before, after = receiver.wait(2)
    assert signed_by(old, before) and not signed_by(new, before)
    assert signed_by(new, after) and not signed_by(old, after)


def test_each_account_signs_with_its_own_secret(tmp_path: Path) -> None:
    with live(tmp_path) as net:
        other = net.services.accounts.issue_key("other").key.key
        theirs = net.client.get("/api/user/webhook", headers={"Authorization": f"Bearer {other}"})
        assert theirs.status_code == 200
        assert theirs.json()["data"]["secret"] != net.secret()
        assert net.client.get("/api/user/webhook").status_code == 403  # keys are required


def test_keyless_callers_of_the_embedded_server_use_the_local_accounts_secret(
    tmp_path: Path,
) -> None:
    with live(tmp_path, auth="optional") as net, working(net.services), receiving() as receiver:
        secret = net.client.get("/api/user/webhook").json()["data"]["secret"]
        reply = net.client.post(
            "/api/sd/txt2img/async", json={**SMALL, "callback_url": receiver.url}
        )
        assert reply.status_code == 200, reply.text
        (hook,) = receiver.wait(1)
    assert secret == net.services.webhooks.secret("local")
    assert signed_by(secret, hook)


REFUSED = [
    ("http://127.0.0.1:9/hook", "127.0.0.1 is a loopback address"),
    ("http://localhost:9/hook", "localhost resolves to"),
    ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a link-local address"),
    ("http://[::1]/hook", "::1 is a loopback address"),
    ("http://[::ffff:192.168.0.1]/hook", "::ffff:192.168.0.1 is a private address"),
    ("http://0.0.0.0/hook", "0.0.0.0 is an unspecified address"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_non_public_callback_urls_are_refused_by_default(
    tmp_path: Path, url: str, why: str
) -> None:
    with live(tmp_path, webhook_allow_private=False) as net:
        reply = net.post("/api/sd/txt2img/async", {**SMALL, "callback_url": url})
        history = net.client.get("/api/sd/tasks", headers=net.auth).json()["data"]["tasks"]
    body = reply.json()
    assert (reply.status_code, body["code"]) == (400, 3000)
    assert body["message"].startswith("Invalid callback_url: ")
    assert why in body["message"]
    assert "DAN_WEBHOOK_ALLOW_PRIVATE=true" in body["message"]
    assert history == []  # nothing was queued


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example/dan", "must be an http:// or https:// URL with a host"),
        ("https:///no-host", "must be an http:// or https:// URL with a host"),
        ("https://hooks.example/" + "a" * 2100, "at most 2048 characters"),
        (42, "must be an http:// or https:// URL (a string)"),
    ],
)
def test_malformed_callback_urls_are_refused(tmp_path: Path, url: Any, why: str) -> None:
    with live(tmp_path) as net:
        reply = net.post("/api/sd/img2img/async", {**SMALL, "init_image": "x", "callback_url": url})
    assert reply.status_code == 400
    assert reply.json()["message"].startswith("Invalid callback_url: ")
    assert why in reply.json()["message"]


def test_the_shared_public_account_gets_no_webhooks(tmp_path: Path) -> None:
    with live(tmp_path, public_key=True) as net, receiving() as receiver:
        public = {"Authorization": f"Bearer {net.services.public_api_key}"}
        submit = {**SMALL, "callback_url": receiver.url}
        reply = net.client.post("/api/sd/txt2img/async", json=submit, headers=public)
        secret = net.client.get("/api/user/webhook", headers=public)
    assert reply.status_code == 403 and "public account is shared" in reply.json()["message"]
    assert secret.status_code == 403


def test_an_address_that_turned_private_since_submit_is_not_contacted(tmp_path: Path) -> None:
    """DNS may answer otherwise at send time than at submit (rebinding): the sender checks
    again. The webhook row is written as a submit writes it, for a name that passed then."""
    with (
        live(tmp_path, webhook_allow_private=False) as net,
        working(net.services),
        receiving() as receiver,
    ):
        task_id = net.submit(None)
        account = net.services.accounts.find(nickname="user").id
        url = f"http://localhost:{receiver.server_address[1]}/hooks/dan"
        with net.services.db.begin() as conn:
            conn.execute(webhooks.insert().values(new_webhook(task_id, account, url, time.time())))
        callback = net.settled(task_id)["callback"]
    assert receiver.received == []
    assert callback["state"] == "failed" and callback["attempts"] == 1  # no retry would help
    assert "localhost resolves to" in callback["lastError"]
    assert "a loopback address" in callback["lastError"]


@pytest.mark.postgres
def test_replicas_deliver_each_webhook_once(tmp_path: Path) -> None:
    if not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL: replicas share PostgreSQL")
    with ExitStack() as stack:
        url = stack.enter_context(schema_url(POSTGRES_URL))
        replicas = [
            stack.enter_context(live(tmp_path / name, url, models_dir=tmp_path / "models"))
            for name in ("a", "b", "c")
        ]
        receiver = stack.enter_context(receiving())
        stack.enter_context(working(replicas[0].services))
        ids = [replicas[n % 3].submit(receiver.url, seed=n) for n in range(9)]
        for n, task_id in enumerate(ids):
            assert replicas[n % 3].settled(task_id)["callback"]["state"] == "delivered"
    assert sorted(hook.headers["x-dan-task-id"] for hook in receiver.received) == sorted(ids)
