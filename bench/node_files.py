"""Submit + status latency on a network whose nodes report many installed files.

    .venv/bin/python bench/node_files.py [--nodes 100] [--files 10000] [--ops 300]
        [--warmup 30] [--queue 100] [--postgres URL] [--analyze] [--database sqlite|postgres]

What nodes have installed is rows of ``node_files``; a submit asks whether some online node
has the task's files (``runnable_somewhere``) and a status read counts the pending tasks ahead
that an online node can run (``_position``). This bench shows what that costs when nodes
report a lot: one operation is a txt2img submit plus a status read, through the real services
(``build_services``, ``TaskService.submit_txt2img`` and ``TaskService.get``), as a client's
request takes them. It is timed on an empty network (no node), then again after ``--nodes``
nodes of a few donor accounts registered ``--files`` made-up sha256 each (one node also has
the server's checkpoint, so tasks are runnable), on SQLite (a file in a temporary folder) and
on PostgreSQL (``--postgres`` or DAN_TEST_POSTGRES_URL; a schema of its own, dropped
afterwards; skipped with a note without either).

The queue looks the same in both phases: ``--queue`` pending tasks of four other accounts are
queued first, and each measured task is cancelled (untimed) once its status is read, so every
operation meets the same backlog. Each phase starts with ``--warmup`` untimed operations.
Printed per database: how long populating took, median and p95 latency per operation in each
phase, their ratio (populated / empty), and whether the median stays within 2x.

PostgreSQL plans the populated queries before any statistics on ``node_files`` exist (this
is the state right after the registrations, and stays so where autovacuum is off);
``--analyze`` runs ANALYZE first, as autovacuum would soon after.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from dan.domain import LOCAL_ACCOUNT, ModelKind
from dan.nodes.store import NodeFile, SqlNodeStore
from dan.services import Services, build_services, node_rules
from dan.tasks.orders import GenerationOrder, Txt2ImgOrder
from tests.api.conftest import install_dummy_checkpoint, make_settings
from tests.fixtures.postgres import schema_url

NODES_PER_DONOR = 25
QUEUE_ACCOUNTS = 4
LIMIT = 2.0  # populated / empty, at most
ORDER = Txt2ImgOrder(
    GenerationOrder(
        prompt="a lighthouse at dusk",
        negative_prompt="",
        seed=-1,
        sampler_name="Euler a",
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=512,
        model=None,  # the server's one checkpoint
    )
)


@dataclass(frozen=True)
class Phase:
    """Seconds per operation (submit + status), and the queue positions the reads reported."""

    latencies: list[float]
    positions: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p95(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


# --- the server -----------------------------------------------------------------------------


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'bench.sqlite3'}"


@contextmanager
def server(url: str, nodes: int) -> Iterator[Services]:
    """Services as ``dan serve --no-worker`` builds them, on ``url``, with one local
    checkpoint (random bytes: the registry only hashes files) and room for the bench's
    nodes, files and tasks. Nodes stay online for the whole run."""
    with tempfile.TemporaryDirectory() as folder:
        install_dummy_checkpoint(Path(folder) / "models", "x")
        settings = make_settings(
            Path(folder),
            database_url=url,
            max_pending_per_account=100_000,
            max_nodes_per_account=max(NODES_PER_DONOR, nodes),
            max_files_per_account=2_000_000,
            node_offline_after_s=3600.0,
        )
        services = build_services(settings)
        try:
            yield services
        finally:
            services.close()


def checkpoint_sha256(services: Services) -> str:
    return services.registry.list(ModelKind.CHECKPOINT)[0].sha256


# --- the network ----------------------------------------------------------------------------


def populate(services: Services, nodes: int, files: int, seed: int = 0) -> float:
    """Register ``nodes`` nodes (``NODES_PER_DONOR`` per donor account) with ``files`` random
    sha256 each, the last one also with the server's checkpoint; seconds the registrations took."""
    store = SqlNodeStore(services.db, rules=node_rules(services.settings))
    rng = random.Random(seed)
    checkpoint = NodeFile(checkpoint_sha256(services), ModelKind.CHECKPOINT, "x", "x.safetensors")
    elapsed = 0.0
    for index in range(nodes):
        listed = [NodeFile(rng.randbytes(32).hex()) for _ in range(files)]
        if index == nodes - 1:
            listed.append(checkpoint)
        started = time.perf_counter()
        store.register(f"donor-{index // NODES_PER_DONOR}", f"n{index}", {}, listed, ())
        elapsed += time.perf_counter() - started
    return elapsed


def settle(services: Services, *, analyze: bool) -> None:
    """On PostgreSQL, write out what populating dirtied (CHECKPOINT) before timing, so the
    populated phase does not pay for the background writes of a million inserted rows; with
    ``analyze``, also gather the planner's statistics, as autovacuum would soon after."""
    if services.db.dialect.name != "postgresql":
        return
    statements = ["CHECKPOINT", *(["ANALYZE nodes, node_files, tasks"] if analyze else [])]
    for statement in statements:
        try:
            with services.db.connect() as conn:
                conn.execute(text(statement))
                conn.commit()
        except DBAPIError as exc:  # CHECKPOINT needs a superuser or pg_checkpoint
            print(f"  ({statement} failed: {exc.orig})")


def online_nodes(services: Services) -> int:
    store = SqlNodeStore(services.db, rules=node_rules(services.settings))
    return sum(node.online for node in store.list_public())


# --- measuring ------------------------------------------------------------------------------


def fill_queue(services: Services, count: int) -> None:
    """``count`` pending tasks of ``QUEUE_ACCOUNTS`` accounts, interleaved by fair queuing."""
    for index in range(count):
        services.tasks.submit_txt2img(f"queue-{index % QUEUE_ACCOUNTS}", ORDER)


def operation(services: Services) -> tuple[float, int]:
    """One submit and one status read, timed; the task is then cancelled (untimed) so the
    queue keeps its length. Seconds, and the queue position the read reported."""
    started = time.perf_counter()
    task = services.tasks.submit_txt2img(LOCAL_ACCOUNT, ORDER)
    record = services.tasks.get(task.id)
    elapsed = time.perf_counter() - started
    services.tasks.cancel(task.id)
    return elapsed, record.queue_position


def measure(services: Services, ops: int, warmup: int) -> Phase:
    for _ in range(warmup):
        operation(services)
    timed = [operation(services) for _ in range(ops)]
    return Phase([seconds for seconds, _ in timed], [position for _, position in timed])


def bench_database(label: str, url: str, args: argparse.Namespace) -> None:
    with server(url, args.nodes) as services:
        fill_queue(services, args.queue)
        empty = measure(services, args.ops, args.warmup)
        populating = populate(services, args.nodes, args.files)
        online = online_nodes(services)
        settle(services, analyze=args.analyze)
        full = measure(services, args.ops, args.warmup)
    state = ""
    if url.startswith("postgresql"):
        state = ", after ANALYZE" if args.analyze else ", no planner statistics yet"
    print(
        f"{label}: registering {args.nodes} nodes x {args.files:,} files took "
        f"{populating:.1f} s ({populating / args.nodes:.2f} s per registration); "
        f"{online} online{state}"
    )
    print_phase("  empty network", empty)
    print_phase(f"  {args.nodes} nodes x {args.files:,}", full)
    median, p95 = full.median / empty.median, full.p95 / empty.p95
    verdict = "within" if median <= LIMIT else "NOT within"
    print(f"  {label}: {verdict} {LIMIT:g}x of an empty network: median {median:.2f}x", end="")
    print(f" (p95 {p95:.2f}x; the tail is noisier on a shared machine)")


def print_phase(name: str, phase: Phase) -> None:
    print(
        f"{name:24} median {phase.median * 1000:7.2f} ms  p95 {phase.p95 * 1000:7.2f} ms  "
        f"(queue position {statistics.median(phase.positions):g}, {len(phase.latencies)} ops)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--files", type=int, default=10_000, help="made-up sha256 per node")
    parser.add_argument("--ops", type=int, default=300, help="timed operations per phase")
    parser.add_argument("--warmup", type=int, default=30, help="untimed operations per phase")
    parser.add_argument("--queue", type=int, default=100, help="pending tasks of other accounts")
    parser.add_argument("--postgres", help="SQLAlchemy URL of a PostgreSQL database")
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="PostgreSQL: ANALYZE after populating (autovacuum's job; the default measures "
        "the plans before any statistics are gathered)",
    )
    parser.add_argument("--database", choices=["both", "sqlite", "postgres"], default="both")
    args = parser.parse_args()
    if args.database != "postgres":
        with sqlite_url() as url:
            bench_database("SQLite", url, args)
    if args.database == "sqlite":
        return
    pg_base = args.postgres or os.environ.get("DAN_TEST_POSTGRES_URL")
    if not pg_base:
        print("PostgreSQL: skipped (pass --postgres URL or set DAN_TEST_POSTGRES_URL)")
        return
    with schema_url(pg_base, "bench_") as url:
        bench_database("PostgreSQL", url, args)


if __name__ == "__main__":
    main()
