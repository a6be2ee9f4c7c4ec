"""The NodeStore contract, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update

from dan.db import create_db_engine
from dan.db.tables import accounts, honor_grants
from dan.db.tables import nodes as nodes_table
from dan.domain import TaskKind, TaskResult
from dan.errors import InvalidArgument, TooManyNodes
from dan.nodes.store import NodeFile, NodeRules, SqlNodeStore, node_id_for
from dan.tasks.store import NewTask, Reward, SqlTaskStore
from tests.store.conftest import Clock

OFFLINE_AFTER = 60.0
INTERVAL = 600.0
SHA_A, SHA_B = "a" * 64, "b" * 64


# Online honor without the trust rules in the way (they have tests of their own below).
PAYS = NodeRules(
    offline_after_s=OFFLINE_AFTER,
    online_interval_s=INTERVAL,
    probation_checks=0,
    honor_window_s=1e9,
)


def node_store(db: Engine, clock: Clock, rules: NodeRules = PAYS) -> SqlNodeStore:
    return SqlNodeStore(db, rules=rules, clock=clock)


def register(
    nodes: SqlNodeStore,
    account: str,
    name: str,
    installed: list[str] = [],  # noqa: B006
    loaded: list[str] = [],  # noqa: B006
    **kwargs: Any,
) -> str:
    files = [NodeFile(sha) for sha in installed]
    return nodes.register(account, name, {}, files, loaded, **kwargs).node_id


def worked(db: Engine, node_id: str, at: float) -> None:
    with db.begin() as conn:
        conn.execute(update(nodes_table).where(nodes_table.c.id == node_id).values(worked_at=at))


def add_account(db: Engine, account_id: str, nickname: str, *, is_admin: bool = False) -> None:
    with db.begin() as conn:
        conn.execute(
            accounts.insert().values(
                id=account_id,
                nickname=nickname,
                email=f"{nickname}@example.org",
                is_admin=is_admin,
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
    first = nodes.register("alice", "gpu1", {"device": "cuda"}, [NodeFile(SHA_A)], [])
    files = [NodeFile(SHA_A), NodeFile(SHA_B)]
    again = nodes.register("alice", "gpu1", {"device": "cuda:1"}, files, [SHA_B])
    other = register(nodes, "alice", "gpu2")
    someone_else = register(nodes, "bob", "gpu1")
    assert first.node_id == again.node_id == node_id_for("alice", "gpu1")
    assert first.id != again.id  # each registration is a process of its own
    assert len({first.node_id, other, someone_else}) == 3
    record = nodes.get(first.node_id)
    assert record is not None
    assert record.capabilities == {"device": "cuda:1"}
    assert nodes.files(first.node_id) == {SHA_A, SHA_B} and record.loaded == {SHA_B}
    assert [n.name for n in nodes.list_for("alice")] == ["gpu1", "gpu2"]
    assert nodes.get("no-such-node") is None
    assert nodes.seen("no-such-node") is None


def test_public_list_shows_owner_nickname_and_online_status(db: Engine, clock: Clock) -> None:
    add_account(db, "acc-1", "donor")
    nodes = node_store(db, clock)
    quiet = register(nodes, "acc-1", "quiet")
    clock.advance(OFFLINE_AFTER + 1)
    busy = register(nodes, "acc-1", "busy")
    orphan = register(nodes, "gone-account", "box")
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
    node_id = register(nodes, "alice", "gpu")
    tasks.submit(NewTask(str(uuid.uuid4()), "bob", TaskKind.TXT2IMG, {}), max_pending=10)
    task = tasks.claim("node:x", lease_s=30)
    assert task is not None
    reward = Reward("alice", 1.0, node_id)
    assert tasks.complete(task.id, "node:x", TaskResult(), reward=reward)
    assert nodes.list_public()[0].tasks_done == 1


def test_online_time_is_paid_per_whole_interval(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock)
    node_id = register(nodes, "alice", "gpu", honor_per_interval=2.0)
    worked(db, node_id, clock.now)
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
    node_id = register(nodes, "alice", "gpu", honor_per_interval=1.0)
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
    node_id = register(node_store(db, clock), "alice", "gpu")
    worked(db, node_id, clock.now)
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
    node_id = register(nodes, "alice", "gpu")
    assert nodes.request_pull(node_id, "chillout_mix") == ("chillout_mix",)
    assert nodes.request_pull(node_id, "chillout_mix") == ("chillout_mix",)
    assert nodes.request_pull(node_id, "anything_v5") == ("chillout_mix", "anything_v5")
    assert nodes.get(node_id).pull == ("chillout_mix", "anything_v5")  # type: ignore[union-attr]
    assert nodes.take_pulls(node_id) == ("chillout_mix", "anything_v5")
    assert nodes.take_pulls(node_id) == ()
    assert nodes.request_pull("no-such-node", "chillout_mix") is None
    assert nodes.take_pulls("no-such-node") == ()


def test_online_honor_needs_a_record_recent_work_and_a_place_among_few_nodes(
    db: Engine, clock: Clock
) -> None:
    rules = NodeRules(
        offline_after_s=OFFLINE_AFTER,
        online_interval_s=INTERVAL,
        probation_checks=1,
        honor_window_s=1.5 * INTERVAL,
        rewarded_nodes_per_account=2,
    )
    nodes = node_store(db, clock, rules)
    farm = [register(nodes, "farmer", f"idle-{i}", honor_per_interval=1.0) for i in range(5)]

    def one_interval() -> None:
        for _ in range(int(INTERVAL / 30)):
            clock.advance(30)
            for node_id in farm:
                nodes.seen(node_id, honor_per_interval=1.0)

    one_interval()
    assert online_honor(db, "farmer") == 0  # names that never worked earn nothing
    for node_id in farm:
        worked(db, node_id, clock.now)
    one_interval()
    assert online_honor(db, "farmer") == 0  # no record yet: still on probation
    for node_id in farm:
        nodes.record_check(node_id, passed=True)
        worked(db, node_id, clock.now)
    one_interval()
    assert online_honor(db, "farmer") == 2  # only two of the five nodes are paid
    for node_id in farm:
        worked(db, node_id, clock.now)
    one_interval()
    assert online_honor(db, "farmer") == 4
    one_interval()
    one_interval()  # their last work is now older than the window
    assert online_honor(db, "farmer") == 4


def test_an_admins_node_earns_online_honor_without_checks(db: Engine, clock: Clock) -> None:
    """Before: an admin's node, whose results are never checked, stayed on probation and
    was never paid for its time online."""
    add_account(db, "acc-ops", "ops", is_admin=True)
    rules = NodeRules(offline_after_s=OFFLINE_AFTER, online_interval_s=INTERVAL, probation_checks=1)
    nodes = node_store(db, clock, rules)
    node_id = register(nodes, "acc-ops", "gpu", honor_per_interval=1.0)
    worked(db, node_id, clock.now)
    for _ in range(int(INTERVAL / 30)):
        clock.advance(30)
        nodes.seen(node_id, honor_per_interval=1.0)
    assert online_honor(db, "acc-ops") == 1


def test_a_failed_check_voids_escrow_and_a_passed_probation_pays_it(
    db: Engine, clock: Clock
) -> None:
    nodes = node_store(db, clock, NodeRules(probation_checks=2))
    tasks = SqlTaskStore(db, clock=clock)
    honest, cheat = register(nodes, "honest", "gpu"), register(nodes, "cheat", "gpu")
    for node_id, owner in ((honest, "honest"), (cheat, "cheat")):
        task_id = tasks.submit(
            NewTask(str(uuid.uuid4()), "bob", TaskKind.TXT2IMG, {}), max_pending=10
        ).id
        assert tasks.claim("w", lease_s=30) is not None
        reward = Reward(owner, 3.0, node_id, held=True)
        assert tasks.complete(task_id, "w", TaskResult(("k",), (1,)), reward=reward)
    assert nodes.on_probation(honest)
    nodes.record_check(honest, passed=True)
    assert task_honor(db, "honest") == 0  # one check of two
    nodes.record_check(honest, passed=True)
    assert task_honor(db, "honest") == 3.0 and not nodes.on_probation(honest)
    suspect = nodes.record_check(cheat, passed=False, reason="another picture")
    assert suspect is not None and suspect.suspect and suspect.suspect_reason == "another picture"
    nodes.record_check(cheat, passed=True)
    nodes.record_check(cheat, passed=True)
    assert task_honor(db, "cheat") == 0  # its escrow went with the failed check
    assert [n.id for n in nodes.suspects()] == [cheat]
    cleared = nodes.clear_suspect(cheat)
    assert cleared is not None and not cleared.suspect and nodes.on_probation(cheat)


def test_sessions_are_per_process_and_bounded(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock, NodeRules(max_sessions_per_node=2, max_nodes_per_account=2))
    first = nodes.register("alice", "gpu", {}, [], [])
    second = nodes.register("alice", "gpu", {}, [], [])
    assert first.worker_id != second.worker_id and first.node_id == second.node_id
    assert nodes.register("alice", "gpu", {}, [], [], session_id=first.id) == first  # refresh
    with pytest.raises(TooManyNodes, match="processes already serve this node"):
        nodes.register("alice", "gpu", {}, [], [])
    register(nodes, "alice", "other")
    with pytest.raises(TooManyNodes, match="already has 2 nodes"):
        register(nodes, "alice", "third")
    ended = nodes.end_session(second.id)
    assert ended == second and nodes.session(second.id) is None
    assert nodes.get(first.node_id).online  # type: ignore[union-attr]  # first still serves it
    clock.advance(OFFLINE_AFTER + 1)
    expired = {s.id for s in nodes.expire_sessions()}
    assert first.id in expired and nodes.session(first.id) is None


def test_files_are_capped_per_account(db: Engine, clock: Clock) -> None:
    nodes = node_store(db, clock, NodeRules(max_files_per_account=3))
    shas = [f"{i:064x}" for i in range(4)]
    register(nodes, "alice", "a", shas[:2])
    with pytest.raises(InvalidArgument, match="at most 3 are accepted per account"):
        register(nodes, "alice", "b", shas[2:])
    register(nodes, "alice", "a", shas[:3])  # re-registering replaces the node's own files
    assert nodes.files(node_id_for("alice", "a")) == set(shas[:3])


def task_honor(db: Engine, account: str) -> float:
    query = select(func.coalesce(func.sum(honor_grants.c.amount), 0.0)).where(
        honor_grants.c.account == account, honor_grants.c.reason == "task"
    )
    with db.connect() as conn:
        return float(conn.execute(query).scalar_one())
