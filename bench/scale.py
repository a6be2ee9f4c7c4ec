"""Scale-out measurements: queue operations per second, and throughput with more nodes.

    .venv/bin/python bench/scale.py queue [--ops 2000] [--threads 4] [--postgres URL]
    .venv/bin/python bench/scale.py nodes [--tasks 24] [--nodes 1 2 4] [--steps 4]

``queue``: submit + status (one task submitted, then its status read, as a client polling an
async task does) through SqlTaskStore, from ``--threads`` threads, on SQLite (a file in a
temporary folder) and on PostgreSQL (``--postgres`` or DAN_TEST_POSTGRES_URL; a schema of its
own, dropped afterwards). Printed: operations per second on each, and PostgreSQL / SQLite.

``nodes``: a real ``dan serve --no-worker`` on loopback with keys required, and 1, 2, 4...
``dan node`` processes serving a tiny random-weight checkpoint; ``--tasks`` async txt2img
tasks are submitted at once and timed until all have finished. Printed: tasks per second for
each node count and its ratio to one node. Every node is a process with its own torch, so on a
machine with fewer cores than nodes the ratio shows the CPU limit, not the server's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from dan.db import create_db_engine, migrate
from dan.domain import TaskKind
from dan.tasks.store import NewTask, SqlTaskStore
from tests.fixtures.postgres import schema_url

PARAMS = {"prompt": "a lighthouse at dusk", "steps": 20, "width": 512, "height": 512}


# --- queue operations ---------------------------------------------------------------------


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'bench.sqlite3'}"


def queue_ops_per_s(url: str, ops: int, threads: int) -> float:
    """Submit + status pairs per second (each pair counts as two operations)."""
    migrate(url)
    engine = create_db_engine(url)
    store = SqlTaskStore(engine)
    per_thread = ops // (2 * threads)

    def client(account: str) -> None:
        for _ in range(per_thread):
            task = NewTask(str(uuid.uuid4()), account, TaskKind.TXT2IMG, PARAMS)
            record = store.submit(task, max_pending=per_thread + 1)
            store.get(record.id)

    workers = [threading.Thread(target=client, args=(f"acct-{i}",)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    engine.dispose()
    return 2 * per_thread * threads / elapsed


def bench_queue(args: argparse.Namespace) -> None:
    with sqlite_url() as url:
        sqlite = queue_ops_per_s(url, args.ops, args.threads)
    print(f"SQLite      {sqlite:8.0f} ops/s  (submit + status, {args.threads} threads)")
    pg_base = args.postgres or os.environ.get("DAN_TEST_POSTGRES_URL")
    if not pg_base:
        print("PostgreSQL  skipped: pass --postgres URL or set DAN_TEST_POSTGRES_URL")
        return
    with schema_url(pg_base, "bench_") as url:
        postgres = queue_ops_per_s(url, args.ops, args.threads)
    print(f"PostgreSQL  {postgres:8.0f} ops/s  ({postgres / sqlite:.2f}x SQLite)")


# --- throughput with nodes ----------------------------------------------------------------


class Network:
    """`dan serve --no-worker` (keys required) and ``count`` `dan node` processes serving a
    tiny random-weight checkpoint, in a temporary folder; the tests' own helpers start them."""

    def __init__(self, root: Path, count: int) -> None:
        from tests.api.test_network_e2e import create_key, start_node
        from tests.api.test_server_e2e import install_tiny_checkpoint
        from tests.fixtures.server import start_server

        install_tiny_checkpoint(root / "node-models")  # where start_node's nodes look
        donor, self.key = create_key(root, "donor", "--nodes"), create_key(root, "bench")
        self.server = start_server(
            root, DAN_WORKER="false", DAN_AUTH="required", DAN_MAX_PENDING_PER_ACCOUNT="1000"
        )
        self.nodes = [start_node(root, self.server.url, donor, f"n{i}") for i in range(count)]
        self._wait_online(count)

    def _wait_online(self, count: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = self.server.client.get("/api/nodes").json()["data"]
            if sum(node["status"] == "online" for node in listed) == count:
                return
            time.sleep(0.2)
        raise RuntimeError(f"only some of {count} nodes came online:\n{self.server.log()}")

    def run_batch(self, tasks: int, steps: int) -> float:
        """Seconds from submitting ``tasks`` async txt2img tasks to the last one finishing."""
        headers = {"Authorization": f"Bearer {self.key}"}
        body = {"prompt": "a fox", "steps": steps, "width": 64, "height": 64, "model": "tiny-sd15"}
        started = time.perf_counter()
        ids = [
            self.server.client.post("/api/sd/txt2img/async", json=body, headers=headers).json()[
                "data"
            ]["taskId"]
            for _ in range(tasks)
        ]
        pending = set(ids)
        while pending:
            for task_id in list(pending):
                reply = self.server.client.post(
                    "/api/sd/task/status", json={"taskId": task_id}, headers=headers
                ).json()["data"]
                if reply["status"] == 3:
                    raise RuntimeError(f"task failed: {reply}")
                if reply["status"] == 2:
                    pending.discard(task_id)
            time.sleep(0.05)
        return time.perf_counter() - started

    def close(self) -> None:
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.wait(60)
        self.server.stop()


def bench_nodes(args: argparse.Namespace) -> None:
    rates: dict[int, float] = {}
    for count in args.nodes:
        with tempfile.TemporaryDirectory() as folder:
            network = Network(Path(folder), count)
            try:
                network.run_batch(count, args.steps)  # every node loads the checkpoint
                times = [network.run_batch(args.tasks, args.steps) for _ in range(args.runs)]
            finally:
                network.close()
        rates[count] = args.tasks / statistics.median(times)
        ratio = rates[count] / rates[min(rates)]
        print(f"{count} node(s)  {rates[count]:6.2f} tasks/s  ({ratio:.2f}x one node)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    queue = sub.add_parser("queue", help="queue operations per second")
    queue.add_argument("--ops", type=int, default=2000)
    queue.add_argument("--threads", type=int, default=4)
    queue.add_argument("--postgres", help="SQLAlchemy URL of a PostgreSQL database")
    nodes = sub.add_parser("nodes", help="throughput with 1, 2, 4 node processes")
    nodes.add_argument("--tasks", type=int, default=24)
    nodes.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    nodes.add_argument("--steps", type=int, default=4)
    nodes.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    bench_queue(args) if args.what == "queue" else bench_nodes(args)


if __name__ == "__main__":
    main()
