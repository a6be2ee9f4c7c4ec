"""Queue weighting (honor, cost), node offers (installed files, loaded checkpoints), rewards
and served models, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import uuid

from sqlalchemy import Engine, func, select

from dan.db.tables import honor_escrow, honor_grants, nodes
from dan.domain import TaskKind, TaskResult
from dan.nodes.store import NodeFile, SqlNodeStore
from dan.tasks.store import NewTask, Offer, Reward, SqlTaskStore
from tests.store.conftest import Clock

LEASE = 30.0


def submit(
    store: SqlTaskStore,
    account: str,
    *,
    cost: float = 1.0,
    weight: float = 1.0,
    checkpoint: str | None = None,
    requires: tuple[str, ...] = (),
) -> str:
    task = NewTask(
        str(uuid.uuid4()),
        account,
        TaskKind.TXT2IMG,
        {"prompt": account, "model": checkpoint},
        cost=cost,
        weight=weight,
        checkpoint=checkpoint,
        requires=requires or ((checkpoint,) if checkpoint else ()),
    )
    return store.submit(task, max_pending=100).id


def run_all(store: SqlTaskStore, offer: Offer | None = None) -> list[str]:
    """Claim and complete every task ``offer`` can run; the prompts in the order they ran."""
    order = []
    while (task := store.claim("w", lease_s=LEASE, offer=offer)) is not None:
        order.append(task.params["prompt"])
        assert store.complete(task.id, "w", TaskResult(("k",), (1,)))
    return order


def add_node(db: Engine, clock: Clock, name: str, installed: list[str]) -> str:
    """A node of the account "donor" with ``installed`` files, online now; its id."""
    files = [NodeFile(sha) for sha in installed]
    return SqlNodeStore(db, clock=clock).register("donor", name, {}, files, []).node_id


def test_a_heavier_account_gets_proportionally_more_turns(store: SqlTaskStore) -> None:
    for _ in range(6):
        submit(store, "honoured", weight=2.0)
        submit(store, "plain", weight=1.0)
    order = run_all(store)
    # Over the first 6 claims the weight-2 account runs twice as often.
    assert order[:6].count("honoured") == 4 and order[:6].count("plain") == 2
    assert sorted(order) == sorted(["honoured"] * 6 + ["plain"] * 6)


def test_the_public_account_waits_behind_others_but_is_not_starved(store: SqlTaskStore) -> None:
    for _ in range(3):
        submit(store, "public", weight=0.25)
    for _ in range(6):
        submit(store, "member")
    order = run_all(store)
    assert order[0] == "member" or order.index("public") > 0
    assert order.count("public") == 3
    # The public account's first task runs before the member's backlog is done.
    assert order.index("public") < len(order) - 3


def test_costly_tasks_advance_their_lane_further(store: SqlTaskStore) -> None:
    for _ in range(2):
        submit(store, "big", cost=4.0)
        submit(store, "small", cost=1.0)
    for _ in range(4):
        submit(store, "small", cost=1.0)
    # A 4x task costs its account four turns: the small account runs four tasks per big one.
    assert run_all(store) == ["small"] * 3 + ["big"] + ["small"] * 3 + ["big"]


def test_a_node_only_gets_tasks_whose_files_it_has(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    submit(store, "needs-a", checkpoint="a" * 64)
    submit(store, "needs-b", checkpoint="b" * 64)
    submit(store, "needs-a-and-lora", checkpoint="a" * 64, requires=("a" * 64, "c" * 64))
    only_b = Offer(node_id=add_node(db, clock, "has-b", ["b" * 64]))
    assert run_all(store, only_b) == ["needs-b"]
    only_a = Offer(node_id=add_node(db, clock, "has-a", ["a" * 64]))
    assert run_all(store, only_a) == ["needs-a"]
    assert run_all(store) == ["needs-a-and-lora"]  # no offer: anything


def test_a_node_prefers_its_loaded_checkpoint_within_the_lookahead(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    for name in ["x1", "x2", "x3"]:
        submit(store, name, checkpoint="x" * 64)
    submit(store, "y1", checkpoint="y" * 64)
    both = add_node(db, clock, "both", ["x" * 64, "y" * 64])
    warm_y = Offer(node_id=both, loaded=frozenset({"y" * 64}), lookahead=2)
    # y1 is 4th: beyond a look-ahead of 2, so the head of the queue runs first.
    first = store.claim("w", lease_s=LEASE, offer=warm_y)
    assert first is not None and first.params["prompt"] == "x1"
    far = Offer(node_id=both, loaded=frozenset({"y" * 64}), lookahead=8)
    second = store.claim("w", lease_s=LEASE, offer=far)
    assert second is not None and second.params["prompt"] == "y1"


def test_a_completed_task_pays_its_node_owner_once(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    node = add_node(db, clock, "n1", [])
    task_id = submit(store, "client")
    claimed = store.claim("node:n1", lease_s=LEASE)
    assert claimed is not None
    reward = Reward("donor", 1.5, node)
    assert store.complete(task_id, "node:n1", TaskResult(("k",), (1,)), reward=reward)
    # A duplicate or late result changes nothing and pays nothing.
    assert not store.complete(task_id, "node:n1", TaskResult(("k",), (1,)), reward=reward)
    with db.connect() as conn:
        paid = conn.execute(
            select(func.sum(honor_grants.c.amount)).where(honor_grants.c.account == "donor")
        ).scalar_one()
        done, worked = conn.execute(
            select(nodes.c.tasks_done, nodes.c.worked_at).where(nodes.c.id == node)
        ).one()
    assert (paid, done, worked) == (1.5, 1, clock.now)


def test_a_probation_reward_waits_in_escrow_and_own_tasks_pay_nothing(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    node = add_node(db, clock, "n1", [])
    for reward in (Reward("donor", 2.0, node, held=True), Reward("donor", 0.0, node, work=False)):
        task_id = submit(store, "client")
        assert store.claim("w", lease_s=LEASE) is not None
        assert store.complete(task_id, "w", TaskResult(("k",), (1,)), reward=reward)
    with db.connect() as conn:
        granted = conn.execute(select(func.count()).select_from(honor_grants)).scalar_one()
        held = conn.execute(select(honor_escrow.c.amount)).scalars().all()
        done = conn.execute(select(nodes.c.tasks_done).where(nodes.c.id == node)).scalar_one()
    assert (granted, held, done) == (0, [2.0], 2)


def test_admission_and_positions_follow_the_online_nodes(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    submit(store, "a", checkpoint="u" * 64)
    served = submit(store, "b", checkpoint="s" * 64)
    assert store.runnable_somewhere(["s" * 64]) is None  # no node online: nothing known
    assert store.get(served).queue_position == 2  # type: ignore[union-attr]
    add_node(db, clock, "n1", ["s" * 64, "l" * 64])
    add_node(db, clock, "n2", ["u" * 64])
    assert store.runnable_somewhere(["s" * 64, "l" * 64]) is True
    # One node has the checkpoint, another the LoRA: no node can run both.
    assert store.runnable_somewhere(["s" * 64, "u" * 64]) is False
    assert store.runnable_somewhere(["s" * 64], exclude_account="donor") is False
    clock.advance(3600)  # the nodes went quiet
    assert store.runnable_somewhere(["s" * 64]) is None


def test_positions_count_only_tasks_an_online_node_can_run(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    unserved = submit(store, "a", checkpoint="u" * 64)
    served = submit(store, "b", checkpoint="s" * 64)
    add_node(db, clock, "n1", ["s" * 64])
    # The task no online node can run does not count as ahead of the one that can.
    assert store.get(served).queue_position == 1  # type: ignore[union-attr]
    assert store.get(unserved).queue_position == 1  # type: ignore[union-attr]
