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

from sqlalchemy import text

from dan.domain import TaskKind
from dan.tasks.db import create_db_engine, migrate
from dan.tasks.store import NewTask, SqlTaskStore

PARAMS = {"prompt": "a lighthouse at dusk", "steps": 20, "width": 512, "height": 512}


# --- queue operations ---------------------------------------------------------------------


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'bench.sqlite3'}"


@contextmanager
def postgres_url(base: str) -> Iterator[str]:
    schema = "bench_" + uuid.uuid4().hex[:10]
    admin = create_db_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


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
    with postgres_url(pg_base) as url:
        postgres = queue_ops_per_s(url, args.ops, args.threads)
    print(f"PostgreSQL  {postgres:8.0f} ops/s  ({postgres / sqlite:.2f}x SQLite)")


# --- throughput with nodes ----------------------------------------------------------------


def bench_nodes(args: argparse.Namespace) -> None:
    from bench.network import NetworkHarness  # the multi-process harness the e2e tests use

    rates: dict[int, float] = {}
    for count in args.nodes:
        with NetworkHarness(nodes=count) as network:
            network.warm_up(steps=args.steps)
            samples = [network.run_batch(args.tasks, steps=args.steps) for _ in range(args.runs)]
        rates[count] = args.tasks / statistics.median(samples)
        base = rates[min(rates)]
        print(f"{count} node(s)  {rates[count]:6.2f} tasks/s  ({rates[count] / base:.2f}x one node)")


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
