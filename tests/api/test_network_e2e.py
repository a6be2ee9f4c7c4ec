"""End to end, several processes: `dan serve --no-worker` with keys required and an empty models
folder, and two `dan node` processes on loopback running the real engine on a tiny checkpoint
that only they have (the server resolves requests against what they report). Many small tasks
complete exactly once; a node killed with SIGKILL in the middle of a task loses it to the other
node."""

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
from sqlalchemy import create_engine, func, select

from dan.db.tables import honor_escrow, honor_grants, tasks
from dan.domain import TaskStatus
from tests.fixtures.server import Server, start_server

pytestmark = pytest.mark.slow

LEASE_S = 5.0
TASKS = 16
BASE_ENV = {
    "DAN_DEVICE": "cpu",
    "DAN_DTYPE": "float32",
    "DAN_CPU_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class Network:
    server: Server
    root: Path
    user_key: str
    donor_key: str
    nodes: dict[str, subprocess.Popen[bytes]]  # node name -> process

    def post(self, path: str, body: object) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.user_key}"}
        response = self.server.client.post(path, json=body, headers=headers)
        return response.json()  # type: ignore[no-any-return]

    def node_ids(self) -> dict[str, str]:
        """Node id -> name, as the server lists the donor's nodes."""
        headers = {"Authorization": f"Bearer {self.donor_key}"}
        mine = self.server.client.get("/api/nodes/mine", headers=headers).json()["data"]
        return {node["id"]: node["name"] for node in mine}

    def rows(self, task_ids: list[str]) -> dict[str, Any]:
        engine = create_engine(f"sqlite:///{self.root / 'data' / 'dan.sqlite3'}")
        try:
            with engine.connect() as conn:
                query = select(tasks).where(tasks.c.id.in_(task_ids))
                return {row.id: row for row in conn.execute(query)}
        finally:
            engine.dispose()

    def logs(self) -> str:
        parts = [self.server.log()]
        parts += [(self.root / f"{name}.log").read_text(errors="replace") for name in self.nodes]
        return "\n".join(parts)[-20000:]


def create_key(root: Path, nickname: str, *flags: str) -> str:
    env = {**os.environ, **BASE_ENV, "DAN_DATA_DIR": str(root / "data")}
    done = subprocess.run(
        [sys.executable, "-m", "dan", "keys", "create", "--nickname", nickname, *flags],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode().strip().splitlines()[-1]


def start_node(root: Path, url: str, key: str, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **BASE_ENV,
        "DAN_MODELS_DIR": str(root / "node-models"),  # the server's models folder is empty
        "DAN_DATA_DIR": str(root / name),
        "DAN_API_KEY": key,
    }
    with (root / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dan", "node", "--server", url, "--name", name],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_for(what: str, check: Any, net: Network, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{net.logs()}")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    from tests.api.test_server_e2e import install_tiny_checkpoint

    root = tmp_path_factory.mktemp("network")
    install_tiny_checkpoint(root / "node-models")
    donor_key = create_key(root, "donor", "--nodes")
    user_key = create_key(root, "user")
    server = start_server(
        root,
        DAN_WORKER="false",
        DAN_AUTH="required",
        DAN_LEASE_S=str(LEASE_S),
        DAN_POLL_INTERVAL_S="0.05",
        DAN_MAX_PENDING_PER_ACCOUNT="100",
    )
    nodes = {name: start_node(root, server.url, donor_key, name) for name in ("gpu-a", "gpu-b")}
    network = Network(server, root, user_key, donor_key, nodes)
    try:
        yield network
    finally:
        for process in nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(30)
        server.stop()


def online_nodes(net: Network) -> list[dict[str, Any]]:
    listed = net.server.client.get("/api/nodes").json()["data"]
    return [node for node in listed if node["status"] == "online"]


def txt2img(seed: int, steps: int = 2, size: int = 64) -> dict[str, Any]:
    return {
        "prompt": "a red fox",
        "seed": seed,
        "steps": steps,
        "width": size,
        "height": size,
        "model": "tiny-sd15",
    }


def statuses(net: Network, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    return {
        task_id: net.post("/api/sd/task/status", {"taskId": task_id})["data"]
        for task_id in task_ids
    }


def served_checkpoints(net: Network) -> list[str]:
    headers = {"Authorization": f"Bearer {net.user_key}"}
    info = net.server.client.get("/api/sd/supportedModelInfo", headers=headers).json()["data"]
    return [model["name"] for model in info["Models"]]


def test_many_tasks_complete_exactly_once_across_two_nodes(net: Network) -> None:
    wait_for("both nodes online", lambda: len(online_nodes(net)) == 2, net)
    assert not list((net.root / "models").glob("**/*.safetensors"))  # only the nodes have it
    wait_for("the nodes' checkpoint listed", lambda: served_checkpoints(net) == ["tiny-sd15"], net)
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda s: net.post("/api/sd/txt2img/async", txt2img(s)), range(TASKS))
        )
    task_ids = [reply["data"]["taskId"] for reply in replies]

    def all_finished() -> dict[str, dict[str, Any]] | None:
        found = statuses(net, task_ids)
        return found if all(d["status"] >= TaskStatus.SUCCESS for d in found.values()) else None

    finished = wait_for("every task to finish", all_finished, net, timeout_s=90)
    assert all(d["status"] == TaskStatus.SUCCESS for d in finished.values()), finished
    assert all(len(d["images"]) == 1 and d["seeds"] for d in finished.values())
    rows = net.rows(task_ids)
    node_ids = set(net.node_ids())
    assert all(row.attempts == 1 and row.node_id in node_ids for row in rows.values())
    engine = create_engine(f"sqlite:///{net.root / 'data' / 'dan.sqlite3'}")
    with engine.connect() as conn:  # new nodes' honor waits in escrow for their checks
        rewards = sum(
            conn.execute(select(func.count()).where(table.c.task_id.in_(task_ids))).scalar_one()
            for table in (honor_grants, honor_escrow)
        )
    engine.dispose()
    assert rewards == TASKS  # one reward per task: each completed once
    done_by = {node["name"]: node["tasksDone"] for node in online_nodes(net)}
    assert sum(done_by.values()) == TASKS, done_by  # no task counted twice
    assert set(done_by) == set(net.nodes) and min(done_by.values()) >= 1, done_by  # both worked
    assert {row.node_id for row in rows.values()} == node_ids


def test_a_killed_node_loses_its_task_to_the_other(net: Network) -> None:
    wait_for("both nodes online", lambda: len(online_nodes(net)) == 2, net)
    task_id = net.post("/api/sd/txt2img/async", txt2img(7, steps=150, size=128))["data"]["taskId"]

    def running() -> Any:
        data = statuses(net, [task_id])[task_id]
        return data["status"] == TaskStatus.PROCESSING and data["progress"] > 0

    wait_for("the slow task to run", running, net)
    holder = net.rows([task_id])[task_id].worker_id
    names = net.node_ids()
    victim = net.nodes[names[net.rows([task_id])[task_id].node_id]]
    survivor = next(p for p in net.nodes.values() if p is not victim)
    family = {victim.pid} | descendants(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    # Killed mid-run: the server still has the task on its first attempt, held by the victim.
    row = net.rows([task_id])[task_id]
    assert row.status == TaskStatus.PROCESSING and row.worker_id == holder, row
    # (Its progress was seen through status above; the row gets it only with lease writes.)
    assert row.attempts == 1, row
    wait_for("every process of the killed node to exit", lambda: not alive(family), net, 30)

    def finished() -> Any:
        data = statuses(net, [task_id])[task_id]
        return data if data["status"] >= TaskStatus.SUCCESS else None

    done = wait_for("the task to finish on the other node", finished, net, timeout_s=100)
    assert done["status"] == TaskStatus.SUCCESS, done
    row = net.rows([task_id])[task_id]
    # Re-run from the start by the other node (a second attempt), which is still up.
    assert row.attempts == 2 and row.worker_id not in (None, holder), row
    assert row.node_id in names and survivor.poll() is None


def descendants(pid: int) -> set[int]:
    """The living processes below ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> bool:
    """Whether any of ``pids`` still runs (a zombie does not)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            return True
    return False
