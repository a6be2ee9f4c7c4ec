"""End to end on PostgreSQL: two API replicas (`dan serve --no-worker`) share one database, and
two `dan node` processes on loopback talk to one replica each. A sync request answered by one
replica wakes when a node finishes through the other; killing and restarting both replicas
mid-run loses nothing accepted; an account flooding the queue does not starve another.

Needs DAN_TEST_POSTGRES_URL (``.ci/run`` sets it when PostgreSQL is up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from dan.db import create_db_engine
from dan.domain import TaskStatus
from tests.api.test_network_e2e import BASE_ENV, start_node
from tests.fixtures.postgres import schema_url
from tests.fixtures.server import Server, free_port, start_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

POSTGRES_URL = os.environ.get("DAN_TEST_POSTGRES_URL")
LEASE_S = 5.0


@dataclass
class Replicas:
    root: Path
    env: dict[str, str]
    servers: list[Server]
    ports: list[int]
    keys: dict[str, str]  # nickname -> key
    node: subprocess.Popen[bytes]
    other: subprocess.Popen[bytes] | None = None

    def post(self, replica: int, path: str, body: object, who: str = "user") -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        reply = self.servers[replica].client.post(path, json=body, headers=headers)
        return reply.json()  # type: ignore[no-any-return]

    def restart(self, replica: int) -> None:
        """SIGKILL the replica, then start it again on its port."""
        self.servers[replica].kill()
        self.servers[replica] = self.start(replica)

    def start(self, replica: int) -> Server:
        data = self.root / f"replica-{replica}"
        return start_server(self.root, port=self.ports[replica], DAN_DATA_DIR=str(data), **self.env)

    def logs(self) -> str:
        parts = [server.log() for server in self.servers]
        for name in ("gpu", "gpu-2"):
            parts.append((self.root / f"{name}.log").read_text(errors="replace"))
        return "\n".join(parts)[-20000:]


def create_key(env: dict[str, str], nickname: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dan", "keys", "create", "--nickname", nickname, *flags],
        env={**os.environ, **BASE_ENV, **env},
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode().strip().splitlines()[-1]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    if not POSTGRES_URL:
        pytest.skip("set DAN_TEST_POSTGRES_URL to run the replica tests on PostgreSQL")
    with schema_url(POSTGRES_URL, "e2e_") as url:
        yield url


@pytest.fixture(scope="module")
def replicas(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    from tests.api.test_server_e2e import install_tiny_checkpoint

    root = tmp_path_factory.mktemp("replicas")
    # Only the nodes have the checkpoint: the replicas learn of it from them.
    install_tiny_checkpoint(root / "node-models")
    env = {
        "DAN_DATABASE_URL": database,
        "DAN_WORKER": "false",
        "DAN_AUTH": "required",
        "DAN_LEASE_S": str(LEASE_S),
        "DAN_POLL_INTERVAL_S": "0.05",
        "DAN_MAX_PENDING_PER_ACCOUNT": "20",
    }
    keys = {
        "donor": create_key(env, "donor", "--nodes"),
        "user": create_key(env, "user"),
        "flooder": create_key(env, "flooder"),
    }
    ports = [free_port(), free_port()]
    group = Replicas(root, env, [], ports, keys, None)  # type: ignore[arg-type]
    group.servers = [group.start(0), group.start(1)]
    # One node talks to each replica.
    group.node = start_node(root, group.servers[0].url, keys["donor"], "gpu")
    group.other = start_node(root, group.servers[1].url, keys["donor"], "gpu-2")
    try:
        yield group
    finally:
        for node in (group.node, group.other):
            if node is not None and node.poll() is None:
                node.send_signal(signal.SIGKILL)
                node.wait(30)
        for server in group.servers:
            server.stop()


def txt2img(seed: int, steps: int = 2) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse",
        "seed": seed,
        "steps": steps,
        "width": 64,
        "height": 64,
        "model": "tiny-sd15",
    }


def wait_done(group: Replicas, task_ids: list[str], timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = {
            task_id: group.post(1, "/api/sd/task/status", {"taskId": task_id}, who)["data"]
            for task_id, who in task_ids_with_owner(task_ids)
        }
        if all(data["status"] >= TaskStatus.SUCCESS for data in found.values()):
            return found
        time.sleep(0.2)
    raise AssertionError(f"tasks did not finish: {found}\n{group.logs()}")


OWNERS: dict[str, str] = {}


def task_ids_with_owner(task_ids: list[str]) -> list[tuple[str, str]]:
    return [(task_id, OWNERS.get(task_id, "user")) for task_id in task_ids]


def wait_online(group: Replicas) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        listed = group.servers[1].client.get("/api/nodes").json()["data"]
        if sum(node["status"] == "online" for node in listed) == 2:
            return
        time.sleep(0.2)
    raise AssertionError(f"the nodes never came online\n{group.logs()}")


def test_a_sync_request_on_one_replica_completes_through_the_other(group_online: Replicas) -> None:
    # Stop the node of replica 1: only the node of replica 0 can run the task.
    assert group_online.other is not None
    group_online.other.send_signal(signal.SIGSTOP)
    try:
        sync_through_the_other_replica(group_online)
    finally:
        group_online.other.send_signal(signal.SIGCONT)


def sync_through_the_other_replica(group_online: Replicas) -> None:
    started = time.monotonic()
    reply = group_online.post(1, "/api/sd/txt2img", txt2img(1))
    assert reply["code"] == 200, reply
    assert reply["data"]["seeds"] == [1] and reply["data"]["images"][0]
    assert time.monotonic() - started < 60
    # Results live in the database: both replicas serve the same image.
    task_id = reply["data"]["taskId"]
    on_zero = group_online.post(0, "/api/sd/task/status", {"taskId": task_id})["data"]
    assert on_zero["images"] == reply["data"]["images"]


def test_restarting_both_replicas_mid_run_loses_nothing(group_online: Replicas) -> None:
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda seed: group_online.post(seed % 2, "/api/sd/txt2img/async", txt2img(seed)),
                range(100, 112),
            )
        )
    assert all(reply["code"] == 200 for reply in replies), replies
    task_ids = [reply["data"]["taskId"] for reply in replies]
    group_online.restart(0)
    group_online.restart(1)
    finished = wait_done(group_online, task_ids)
    assert all(data["status"] == TaskStatus.SUCCESS for data in finished.values()), finished
    assert [data["seeds"] for data in finished.values()] == [[s] for s in range(100, 112)]


def test_a_flooding_account_does_not_starve_another(group_online: Replicas) -> None:
    wait_queue_empty(group_online)
    flood = [
        group_online.post(0, "/api/sd/txt2img/async", txt2img(200 + i, steps=4), "flooder")
        for i in range(10)
    ]
    flood_ids = [reply["data"]["taskId"] for reply in flood]
    OWNERS.update(dict.fromkeys(flood_ids, "flooder"))
    mine = group_online.post(1, "/api/sd/txt2img/async", txt2img(300, steps=4))["data"]
    assert mine["queuePosition"] <= 3, mine  # behind about one of the flooder's, not ten
    wait_done(group_online, [*flood_ids, mine["taskId"]])
    times = started_times(group_online, [*flood_ids, mine["taskId"]])
    submitted, started = times[mine["taskId"]]
    # Of the flooder's tasks, only those already queued ahead (about one per node) start
    # between the moment mine was submitted and the moment it starts.
    overtaking = [t for t in flood_ids if submitted < times[t][1] < started]
    assert len(overtaking) <= 3, (overtaking, times)


def wait_queue_empty(group: Replicas, timeout_s: float = 120.0) -> None:
    engine = create_db_engine(group.env["DAN_DATABASE_URL"])
    query = text("SELECT count(*) FROM tasks WHERE status IN (0, 1)")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(query).scalar_one() == 0:
                    return
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise AssertionError(f"earlier tasks never finished\n{group.logs()}")


def started_times(group: Replicas, task_ids: list[str]) -> dict[str, tuple[float, float]]:
    """Task id -> (created_at, started_at), from the database."""
    engine = create_db_engine(group.env["DAN_DATABASE_URL"])
    query = text("SELECT id, created_at, started_at FROM tasks WHERE id = ANY(:ids)")
    try:
        with engine.connect() as conn:
            rows = conn.execute(query, {"ids": task_ids}).all()
    finally:
        engine.dispose()
    return {row.id: (row.created_at, row.started_at) for row in rows}


@pytest.fixture
def group_online(replicas: Replicas) -> Replicas:
    wait_online(replicas)
    return replicas
