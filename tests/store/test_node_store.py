"""The NodeStore contract, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import threading
import uuid

from sqlalchemy import Engine, func, select

from dan.db import create_db_engine
from dan.db.tables import accounts, honor_grants
from dan.domain import TaskKind, TaskResult
from dan.nodes.store import SqlNodeStore, node_id_for
from dan.tasks.store import NewTask, Reward, SqlTaskStore
from tests.store.conftest import Clock

OFFLINE_AFTER = 60.0
INTERVAL = 600.0
SHA_A, SHA_B = "a" * 64, "b" * 64


def node_store(db: Engine, clock: Clock) -> SqlNodeStore:
    return SqlNodeStore(db, offline_after_s=OFFLINE_AFTER, online_interval_s=INTERVAL, clock=clock)


def add_account(db: Engine, account_id: str, nickname: str) -> None:
    with db.begin() as conn:
        conn.execute(
            accounts.insert().values(
                id=account_id,
                nickname=nickname,
                email=f"{nickname}@example.org",
                is_admin=False,
                can_run_nodes=True,
                created_at=0.0,
            )
        )


def online_honor(db: Engine, account: str) -> float:
    query = select(func.coalesce(func.sum(honor_grants.c.amount), 0.0)).where(
        honor_grants.c.account == account, honor_grants.c.reason == "online"
    )
    with db.connect() as conn:
        return float(conn.execute(query).scalar_one())


def test_registering_again_keeps_the_id_and_updates_the_node(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock)
    first = nodes.register("alice", "gpu1", {"device": "cuda"}, [SHA_A], [])
    again = nodes.register("alice", "gpu1", {"device": "cuda:1"}, [SHA_A, SHA_B], [SHA_B])
    other = nodes.register("alice", "gpu2", {}, [], [])
    someone_else = nodes.register("bob", "gpu1", {}, [], [])
    assert first == again == node_id_for("alice", "gpu1")
    assert len({first, other, someone_else}) == 3
    record = nodes.get(first)
    assert record is not None
    assert record.capabilities == {"device": "cuda:1"}
    assert record.installed == {SHA_A, SHA_B} and record.loaded == {SHA_B}
    assert [n.name for n in nodes.list_for("alice")] == ["gpu1", "gpu2"]
    assert nodes.get("no-such-node") is None
    assert nodes.seen("no-such-node") is None


def test_public_list_shows_owner_nickname_and_online_status(db: Engine, clock: Clock) -> None:
    add_account(db, "acc-1", "donor")
    nodes = node_store(db, clock)
    quiet = nodes.register("acc-1", "quiet", {}, [], [])
    clock.advance(OFFLINE_AFTER + 1)
    busy = nodes.register("acc-1", "busy", {}, [], [])
    orphan = nodes.register("gone-account", "box", {}, [], [])
    listed = {node.id: node for node in nodes.list_public()}
    assert listed[busy].online and listed[orphan].online and not listed[quiet].online
    assert listed[busy].owner == "donor"
    assert listed[orphan].owner == "gone-account"  # no account row: its id stands in
    assert [n.id for n in nodes.list_public()][-1] == quiet  # offline nodes come last
    assert "email" not in repr(listed[busy]) and "@" not in repr(listed[busy])
    nodes.seen(quiet)
    assert nodes.get(quiet).online  # type: ignore[union-attr]
    nodes.mark_offline(quiet)
    assert not nodes.get(quiet).online  # type: ignore[union-attr]


def test_completed_tasks_count_on_the_node(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock)
    tasks = SqlTaskStore(db, clock=clock)
    node_id = nodes.register("alice", "gpu", {}, [], [])
    tasks.submit(NewTask(str(uuid.uuid4()), "bob", TaskKind.TXT2IMG, {}), max_pending=10)
    task = tasks.claim("node:x", lease_s=30)
    assert task is not None
    reward = Reward("alice", 1.0, node_id)
    assert tasks.complete(task.id, "node:x", TaskResult(), reward=reward)
    assert nodes.list_public()[0].tasks_done == 1


def test_online_time_is_paid_per_whole_interval(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock)
    node_id = nodes.register("alice", "gpu", {}, [], [], honor_per_interval=2.0)
    for _ in range(int(INTERVAL / 20) - 1):  # seen every 20 s, just short of one interval
        clock.advance(20)
        nodes.seen(node_id, honor_per_interval=2.0)
    assert online_honor(db, "alice") == 0
    clock.advance(20)
    nodes.seen(node_id, honor_per_interval=2.0)
    assert online_honor(db, "alice") == 2.0
    nodes.seen(node_id, honor_per_interval=2.0)
    assert online_honor(db, "alice") == 2.0  # each interval is paid once


def test_time_offline_is_not_paid(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock)
    node_id = nodes.register("alice", "gpu", {}, [], [], honor_per_interval=1.0)
    clock.advance(30)
    nodes.seen(node_id, honor_per_interval=1.0)
    clock.advance(5 * INTERVAL)  # silent for hours: offline
    nodes.seen(node_id, honor_per_interval=1.0)
    assert online_honor(db, "alice") == 0
    record = nodes.get(node_id)
    assert record is not None and record.rewarded_until == clock.now  # counting starts again
    clock.advance(INTERVAL)
    nodes.seen(node_id, honor_per_interval=1.0)  # 600 s since it came back, but silent > 60 s
    assert online_honor(db, "alice") == 0


def test_an_interval_is_paid_once_when_replicas_race(db_url: str, db: Engine, clock: Clock) -> None:
    # Several API replicas (each its own store and connection pool) see the node at once.
    node_id = node_store(db, clock).register("alice", "gpu", {}, [], [])
    engines = [create_db_engine(db_url) for _ in range(6)]
    replicas = [node_store(engine, clock) for engine in engines]
    rounds = 4
    try:
        for _ in range(rounds):
            for _ in range(int(INTERVAL / 30) - 1):  # online, the interval not yet complete
                clock.advance(30)
                replicas[0].seen(node_id, honor_per_interval=1.0)
            clock.advance(30)  # now it is: every replica sees the node at once
            barrier = threading.Barrier(len(replicas))

            def see(replica: SqlNodeStore, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                replica.seen(node_id, honor_per_interval=1.0)

            threads = [threading.Thread(target=see, args=(r,)) for r in replicas]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for engine in engines:
            engine.dispose()
    assert online_honor(db, "alice") == rounds


def test_pulls_are_queued_once_and_handed_out_once(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock)
    node_id = nodes.register("alice", "gpu", {}, [], [])
    assert nodes.request_pull(node_id, "chillout_mix") == ("chillout_mix",)
    assert nodes.request_pull(node_id, "chillout_mix") == ("chillout_mix",)
    assert nodes.request_pull(node_id, "anything_v5") == ("chillout_mix", "anything_v5")
    assert nodes.get(node_id).pull == ("chillout_mix", "anything_v5")  # type: ignore[union-attr]
    assert nodes.take_pulls(node_id) == ("chillout_mix", "anything_v5")
    assert nodes.take_pulls(node_id) == ()
    assert nodes.request_pull("no-such-node", "chillout_mix") is None
    assert nodes.take_pulls("no-such-node") == ()
