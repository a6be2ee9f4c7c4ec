"""A network at AI Horde's size, in simulation: many nodes on real API replicas, no engine.

    PYTHONPATH=src .venv/bin/python bench/node_network.py [--nodes 1000] [--replicas 1]
        [--duration 60] [--rate 20] [--run-s 3] [--postgres URL]

Starts ``--replicas`` real ``dan serve`` processes without a local worker, keys required, on
one PostgreSQL database of their own (``--postgres``, created if missing and wiped first; by
default ``dan_sim`` on 127.0.0.1), then ``--nodes`` simulated nodes as asyncio clients of
one process, spread over the replicas. Each node speaks the real node protocol: it registers
(one SD 1.x checkpoint installed and loaded), long-polls ``claim``, sends a heartbeat with
progress every ``--beat-s`` while it "runs" a task for ``--run-s``, uploads a real 64x64 PNG
and completes. A client submits ``--rate`` txt2img tasks per second and another reads task
statuses (``--status-rate`` per second) of tasks in flight.

The nodes' account is an admin, so their results are trusted and not re-run (checks would
add verification tasks, not change what is measured here). Measured over ``--duration``
after ``--warmup``, and printed as a table:

- database writes per second: rows inserted + updated + deleted and transactions committed,
  from pg_stat_database of the bench's database;
- p95 claim latency: from a task's submit to a node holding it (idle nodes are waiting);
- p95 status and heartbeat latency (one HTTP request each);
- CPU of the API replicas (per node per second) and of the PostgreSQL server;
- tasks done per second.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from PIL import Image
from sqlalchemy import create_engine, make_url, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dan.db import migrate
from tests.fixtures.server import Server, start_server

SHA = "5" * 64  # the simulated checkpoint every node has installed
MODEL = "sim-sd15"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/dan_sim"
NODES_PER_POOL = 16  # simulated nodes per HTTP connection pool (see Simulation)


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


@dataclass
class Stats:
    """What the simulation saw; only samples inside the measured window count."""

    measuring: bool = False
    submitted: dict[str, float] = field(default_factory=dict)  # task id -> submit time
    claim_s: list[float] = field(default_factory=list)
    status_s: list[float] = field(default_factory=list)
    beat_s: list[float] = field(default_factory=list)
    done: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


# --- the database ---------------------------------------------------------------------------


def fresh_database(url: str) -> None:
    """Create the database if missing and empty it (the bench owns it)."""
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    migrate(url)


def db_counters(url: str) -> dict[str, float]:
    query = text(
        "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted AS writes "
        "FROM pg_stat_database WHERE datname = current_database()"
    )
    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(query).one()
    engine.dispose()
    return {"commits": float(row.xact_commit), "writes": float(row.writes)}


def postgres_cpu() -> float:
    """CPU seconds of the whole PostgreSQL server: its live processes and those that ended
    (short-lived connections). Other users of the server count too."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres" and "-D" in (proc.info["cmdline"] or ()):
                total = sum(proc.cpu_times()[:4])
                return total + sum(sum(child.cpu_times()[:2]) for child in proc.children())
        except psutil.Error:
            continue
    return float("nan")


def cpu_seconds(servers: list[Server]) -> float:
    total = 0.0
    for server in servers:
        proc = psutil.Process(server.process.pid)
        for one in [proc, *proc.children(recursive=True)]:
            times = one.cpu_times()
            total += times.user + times.system
    return total


# --- replicas and keys ----------------------------------------------------------------------


def create_key(env: dict[str, str], nickname: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dan", "keys", "create", "--nickname", nickname, *flags],
        env={**os.environ, **env},
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode().strip().splitlines()[-1]


@contextmanager
def replicas(root: Path, url: str, count: int, lease_s: float) -> Iterator[list[Server]]:
    env = {
        "DAN_DATABASE_URL": url,
        "DAN_WORKER": "false",
        "DAN_AUTH": "required",
        "DAN_LEASE_S": str(lease_s),
        "DAN_MAX_PENDING_PER_ACCOUNT": "1000000",
        "DAN_MAX_NODES_PER_ACCOUNT": "100000",
        "DAN_LOG_LEVEL": "warning",
    }
    servers: list[Server] = []
    try:
        for index in range(count):
            data = str(root / f"replica-{index}")
            servers.append(start_server(root, DAN_DATA_DIR=data, **env))
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- the simulated network ------------------------------------------------------------------


class Simulation:
    def __init__(self, args: argparse.Namespace, urls: list[str], keys: dict[str, str]) -> None:
        self.args = args
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.image = png()
        # httpcore's pool looks at each of its connections for every request: one pool for a
        # thousand nodes made this process, not the servers, the bottleneck (seconds of
        # latency). So nodes share small pools, each pool talking to one replica.
        limits = httpx.Limits(max_connections=3 * NODES_PER_POOL, max_keepalive_connections=None)
        pools = max(len(urls), -(-args.nodes // NODES_PER_POOL))
        self.clients = [
            httpx.AsyncClient(
                base_url=urls[i % len(urls)], timeout=60.0, limits=limits, trust_env=False
            )
            for i in range(pools)
        ]
        self.node_headers = {"Authorization": f"Bearer {keys['nodes']}"}
        self.user_headers = {"Authorization": f"Bearer {keys['user']}"}

    async def call(self, client: httpx.AsyncClient, path: str, body: object, who: str) -> Any:
        headers = self.node_headers if who == "node" else self.user_headers
        reply = (await client.post(path, json=body, headers=headers)).json()
        if reply.get("code") != 200:
            raise RuntimeError(f"{path}: {reply}")
        return reply["data"]

    def node_client(self, index: int) -> httpx.AsyncClient:
        """The pool of node ``index``: nodes are spread over the replicas, 16 to a pool."""
        return self.clients[index % len(self.clients)]

    async def register(self, index: int) -> dict[str, str]:
        client = self.node_client(index)
        body = {
            "name": f"sim-{index}",
            "families": ["sd15"],
            "files": [
                {
                    "sha256": SHA,
                    "kind": "checkpoint",
                    "family": "sd15",
                    "name": MODEL,
                    "file": f"{MODEL}.safetensors",
                    "size": 1,
                }
            ],
            "loaded": [SHA],
        }
        data = await self.call(client, "/api/node/register", body, "node")
        return {"nodeId": data["nodeId"], "sessionId": data["sessionId"]}

    async def node(self, index: int, session: dict[str, str]) -> None:
        client = self.node_client(index)
        while not self.stop.is_set():
            try:
                data = await self.call(client, "/api/node/claim", {**session, "waitS": 5}, "node")
            except (RuntimeError, httpx.HTTPError):
                self.stats.error("claim")
                await asyncio.sleep(1)
                continue
            task = data.get("task")
            if task is not None:
                await self.run(client, session, task)

    async def run(self, client: httpx.AsyncClient, session: dict[str, str], task: Any) -> None:
        stats, held = self.stats, {**session, "taskId": task["id"]}
        submitted = stats.submitted.get(task["id"])
        if submitted is not None and stats.measuring:
            stats.claim_s.append(time.monotonic() - submitted)
        beats = max(1, round(self.args.run_s / self.args.beat_s))
        for beat in range(beats):
            await asyncio.sleep(self.args.beat_s)
            started = time.monotonic()
            try:
                answer = await self.call(
                    client, "/api/node/heartbeat", {**held, "progress": beat / beats}, "node"
                )
            except (RuntimeError, httpx.HTTPError):
                stats.error("heartbeat")
                return
            if stats.measuring:
                stats.beat_s.append(time.monotonic() - started)
            if answer["cancelRequested"]:
                return
        await self.finish(client, held, task)

    async def finish(self, client: httpx.AsyncClient, held: dict[str, str], task: Any) -> None:
        key = f"{task['id']}/a{task['attempt']}-0.png"
        params = {"nodeId": held["nodeId"], "sessionId": held["sessionId"], "taskId": task["id"]}
        try:
            put = await client.put(
                "/api/node/result",
                params={**params, "key": key},
                content=self.image,
                headers=self.node_headers,
            )
            if put.json().get("code") != 200:
                raise RuntimeError(put.text)
            result = {"image_keys": [key], "seeds": [task["params"].get("seed", 0)]}
            await self.call(client, "/api/node/complete", {**held, "result": result}, "node")
        except (RuntimeError, httpx.HTTPError):
            self.stats.error("complete")
            return
        if self.stats.measuring:
            self.stats.done += 1

    async def submit_forever(self) -> None:
        body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "model": MODEL}
        interval, next_at, count = 1.0 / self.args.rate, time.monotonic(), 0
        while not self.stop.is_set():
            client = self.clients[count % len(self.clients)]
            count += 1
            try:
                data = await self.call(
                    client, "/api/sd/txt2img/async", {**body, "seed": count}, "user"
                )
                self.stats.submitted[data["taskId"]] = time.monotonic()
            except (RuntimeError, httpx.HTTPError):
                self.stats.error("submit")
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def status_forever(self) -> None:
        interval, count = 1.0 / self.args.status_rate, 0
        while not self.stop.is_set():
            await asyncio.sleep(interval)
            recent = list(self.stats.submitted)[-200:]
            if not recent:
                continue
            count += 1
            client = self.clients[count % len(self.clients)]
            started = time.monotonic()
            try:
                body = {"taskId": random.choice(recent)}
                await self.call(client, "/api/sd/task/status", body, "user")
            except (RuntimeError, httpx.HTTPError):
                self.stats.error("status")
                continue
            if self.stats.measuring:
                self.stats.status_s.append(time.monotonic() - started)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


async def register_all(sim: Simulation) -> list[dict[str, str]]:
    gate = asyncio.Semaphore(32)

    async def one(index: int) -> dict[str, str]:
        async with gate:
            return await sim.register(index)

    return list(await asyncio.gather(*(one(i) for i in range(sim.args.nodes))))


async def simulate(
    args: argparse.Namespace, servers: list[Server], keys: dict[str, str], url: str
) -> dict[str, float]:
    sim = Simulation(args, [server.url for server in servers], keys)
    sessions = await register_all(sim)
    workers = [asyncio.create_task(sim.node(i, s)) for i, s in enumerate(sessions)]
    workers.append(asyncio.create_task(sim.submit_forever()))
    workers.append(asyncio.create_task(sim.status_forever()))
    await asyncio.sleep(args.warmup)
    before = db_counters(url), cpu_seconds(servers), postgres_cpu(), time.monotonic()
    sim.stats.measuring = True
    await asyncio.sleep(args.duration)
    sim.stats.measuring = False
    after = db_counters(url), cpu_seconds(servers), postgres_cpu(), time.monotonic()
    sim.stop.set()
    await asyncio.wait(workers, timeout=10)
    for worker in workers:
        worker.cancel()
    await sim.close()
    elapsed = after[3] - before[3]
    stats = sim.stats
    return {
        "elapsed": elapsed,
        "writes": (after[0]["writes"] - before[0]["writes"]) / elapsed,
        "commits": (after[0]["commits"] - before[0]["commits"]) / elapsed,
        "claim": p95(stats.claim_s),
        "status": p95(stats.status_s),
        "beat": p95(stats.beat_s),
        "beats": len(stats.beat_s) / elapsed,
        "api_cpu": (after[1] - before[1]) / elapsed,
        "db_cpu": (after[2] - before[2]) / elapsed,
        "done": stats.done / elapsed,
        "errors": float(sum(stats.errors.values())),
    }


def report(args: argparse.Namespace, row: dict[str, float]) -> None:
    nodes = args.nodes
    lines = [
        ("nodes / replicas", f"{nodes} / {args.replicas}"),
        ("submitted per s", f"{args.rate:.1f}"),
        ("tasks done per s", f"{row['done']:.2f}"),
        ("heartbeats per s", f"{row['beats']:.0f}"),
        ("db rows written per s", f"{row['writes']:.0f}"),
        ("db commits per s", f"{row['commits']:.0f}"),
        ("db rows written per task", f"{row['writes'] / max(row['done'], 1e-9):.1f}"),
        ("p95 claim (submit->held) ms", f"{row['claim'] * 1000:.0f}"),
        ("p95 status ms", f"{row['status'] * 1000:.0f}"),
        ("p95 heartbeat ms", f"{row['beat'] * 1000:.0f}"),
        ("API CPU s per s (all replicas)", f"{row['api_cpu']:.2f}"),
        ("API CPU ms per node per s", f"{row['api_cpu'] * 1000 / nodes:.3f}"),
        ("PostgreSQL CPU s per s (server)", f"{row['db_cpu']:.2f}"),
        ("errors", f"{row['errors']:.0f}"),
    ]
    width = max(len(name) for name, _ in lines)
    print(f"\nmeasured {row['elapsed']:.0f} s")
    for name, value in lines:
        print(f"{name:<{width}}  {value:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="tasks submitted per second")
    parser.add_argument("--status-rate", type=float, default=20.0, help="status reads per s")
    parser.add_argument("--run-s", type=float, default=3.0, help="how long a node runs a task")
    parser.add_argument(
        "--beat-s",
        type=float,
        default=0.3,
        help="heartbeat interval (a real node's dan.workers.lease.BEAT_S)",
    )
    parser.add_argument("--lease-s", type=float, default=30.0)
    parser.add_argument("--postgres", default=os.environ.get("DAN_SIM_POSTGRES_URL", DEFAULT_URL))
    args = parser.parse_args()
    fresh_database(args.postgres)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        env = {"DAN_DATABASE_URL": args.postgres, "DAN_DATA_DIR": str(root / "keys")}
        keys = {
            "nodes": create_key(env, "donor", "--nodes", "--admin"),
            "user": create_key(env, "user"),
        }
        with replicas(root, args.postgres, args.replicas, args.lease_s) as servers:
            row = asyncio.run(simulate(args, servers, keys, args.postgres))
    report(args, row)


if __name__ == "__main__":
    main()
