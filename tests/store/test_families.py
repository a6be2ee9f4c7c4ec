"""Model families in the queue: a node is offered only tasks of the families it registered
(none registered: SD 1.x only), admission asks for a node that runs the family, and nodes'
files carry their family; on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine

from dan.db.tables import accounts
from dan.domain import LOCAL_ACCOUNT, ModelFamily, ModelKind, TaskKind, TaskResult
from dan.nodes.store import NodeFile, NodeRules, SqlNodeStore
from dan.tasks.checks import SqlCheckStore
from dan.tasks.store import NewTask, Offer, SqlTaskStore
from tests.store.conftest import Clock

LEASE = 30.0
SD15, SDXL = ModelFamily.SD15, ModelFamily.SDXL
CHECKPOINT = "c" * 64


def submit(store: SqlTaskStore, prompt: str, family: ModelFamily | None) -> str:
    task = NewTask(
        str(uuid.uuid4()),
        "user",
        TaskKind.TXT2IMG,
        {"prompt": prompt},
        checkpoint=CHECKPOINT if family else None,
        requires=(CHECKPOINT,) if family else (),
        family=family,
    )
    return store.submit(task, max_pending=100).id


def node(db: Engine, clock: Clock, name: str, families: set[ModelFamily] | None) -> str:
    """A node of "donor" with the checkpoint, online now, running ``families``; its id."""
    nodes = SqlNodeStore(db, clock=clock)
    files = [NodeFile(CHECKPOINT)]
    return nodes.register("donor", name, {}, files, [], families=families).node_id


def prompts(store: SqlTaskStore, node_id: str) -> list[str]:
    """What the node claims, in order, each completed at once."""
    taken = []
    while (task := store.claim(node_id, lease_s=LEASE, offer=Offer(node_id))) is not None:
        taken.append(task.params["prompt"])
        assert store.complete(task.id, node_id, TaskResult(("k",), (1,)))
    return taken


def test_a_node_is_offered_only_the_families_it_runs(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    submit(store, "xl", SDXL)
    submit(store, "one-five", SD15)
    submit(store, "upscale", None)  # a task on no checkpoint runs anywhere
    small = node(db, clock, "small", {SD15})
    assert prompts(store, small) == ["one-five", "upscale"]
    big = node(db, clock, "big", {SD15, SDXL})
    assert prompts(store, big) == ["xl"]


def test_a_node_that_says_nothing_runs_sd15_only(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    submit(store, "xl", SDXL)
    submit(store, "one-five", SD15)
    old = node(db, clock, "old", None)
    assert SqlNodeStore(db, clock=clock).families(old) == {SD15}
    assert prompts(store, old) == ["one-five"]


def test_an_sdxl_only_node_skips_sd15_work_and_registering_again_replaces_its_families(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    submit(store, "one-five", SD15)
    xl_only = node(db, clock, "xl", {SDXL})
    assert prompts(store, xl_only) == []
    node(db, clock, "xl", {SD15})
    assert prompts(store, xl_only) == ["one-five"]


def test_admission_asks_for_a_node_that_runs_the_family(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    assert store.runnable_somewhere([CHECKPOINT], family=SDXL) is None  # nobody online
    node(db, clock, "small", {SD15})
    assert store.runnable_somewhere([CHECKPOINT], family=SD15) is True
    assert store.runnable_somewhere([CHECKPOINT], family=SDXL) is False
    assert store.runnable_somewhere([CHECKPOINT]) is True
    node(db, clock, "big", {SDXL})
    assert store.runnable_somewhere([CHECKPOINT], family=SDXL) is True


def test_a_verification_run_keeps_the_family_of_its_task(
    store: SqlTaskStore, db: Engine, clock: Clock
) -> None:
    task_id = submit(store, "xl", SDXL)
    checks = SqlCheckStore(db, clock=clock)
    small = node(db, clock, "small", {SD15})
    assert not checks.can_verify(task_id, ["user"])  # the only node does not run SDXL
    node(db, clock, "big", {SDXL})
    assert checks.can_verify(task_id, ["user"])
    assert checks.start(task_id, ["user"], state="checking") is not None
    assert prompts(store, small) == []


def test_files_carry_the_family_the_node_read(db: Engine, clock: Clock) -> None:
    nodes = SqlNodeStore(db, clock=clock)
    files = [
        NodeFile("a" * 64, ModelKind.CHECKPOINT, "xl", "xl.safetensors", 1, SDXL),
        NodeFile("b" * 64, ModelKind.CHECKPOINT, "old", "old.ckpt", 1),
    ]
    nodes.register("donor", "gpu", {}, files, [], families={SD15, SDXL})
    found = {f.name: f.family for f in nodes.find_files(ModelKind.CHECKPOINT)}
    assert found == {"xl": SDXL, "old": None}


def family_vote(
    db: Engine, clock: Clock, *holders: tuple[str, ModelFamily, bool]
) -> ModelFamily | None:
    """The family find_files gives a checkpoint held by ``holders``: a node each, as (its
    account, the family it reads, whether it is past its probation)."""
    nodes = SqlNodeStore(db, rules=NodeRules(probation_checks=1), clock=clock)
    for i, (account, family, established) in enumerate(holders):
        name = f"{account}-{i}"
        file = NodeFile(CHECKPOINT, ModelKind.CHECKPOINT, name, f"{name}.safetensors", 1, family)
        node_id = nodes.register(account, name, {}, [file], [], families={SD15, SDXL}).node_id
        if established:
            nodes.record_check(node_id, passed=True)
    found = {f.family for f in nodes.find_files(ModelKind.CHECKPOINT, sha256=CHECKPOINT)}
    assert len(found) == 1, found  # one family per file, whatever names its holders give it
    return found.pop()


def admin(db: Engine, account: str) -> str:
    """``account`` becomes an admin's; returns it."""
    with db.begin() as conn:
        row = {"id": account, "nickname": account, "is_admin": True, "can_run_nodes": True}
        conn.execute(accounts.insert().values(**row, created_at=0.0))
    return account


def test_a_files_family_is_what_most_of_its_holders_read(db: Engine, clock: Clock) -> None:
    """Before: the greatest family any holder reported ("sdxl" over "sd15"), so one node
    decided it for everyone."""
    settled = [("a", SD15, True), ("b", SD15, True)]
    assert family_vote(db, clock, *settled, ("liar", SDXL, True)) == SD15


def test_nodes_on_probation_vote_only_where_no_established_holder_does(
    db: Engine, clock: Clock
) -> None:
    newcomers = [(f"new-{i}", SDXL, False) for i in range(3)]
    assert family_vote(db, clock, ("old", SD15, True), *newcomers) == SD15


def test_among_nodes_on_probation_the_most_win(db: Engine, clock: Clock) -> None:
    newcomers = [("a", SD15, False), ("b", SD15, False), ("c", SDXL, False)]
    assert family_vote(db, clock, *newcomers) == SD15


def test_a_tie_goes_to_sdxl_and_probation_cannot_break_it(db: Engine, clock: Clock) -> None:
    """SDXL work goes only to cards with the memory for SDXL, where an SD 1.x file runs too;
    SD 1.x work on an SDXL file reaches cards that cannot hold it."""
    tied = [("a", SD15, True), ("b", SDXL, True)]
    newcomers = [(f"new-{i}", SD15, False) for i in range(3)]
    assert family_vote(db, clock, *tied, *newcomers) == SDXL


def test_an_account_has_one_vote_however_many_nodes_it_runs(db: Engine, clock: Clock) -> None:
    """Before: every node voted, so one account's nodes (free to add, up to
    DAN_MAX_NODES_PER_ACCOUNT) outvoted two accounts of one node each."""
    farm = [("sly", SDXL, True)] * 3
    assert family_vote(db, clock, ("a", SD15, True), ("b", SD15, True), *farm) == SD15


def test_an_account_votes_as_most_of_its_nodes_read_and_a_split_one_for_sdxl(
    db: Engine, clock: Clock
) -> None:
    """Before: the split account's SD 1.x node and the other account's outvoted its SDXL
    node 2 to 1; now the account says SDXL, which ties with the other account's SD 1.x."""
    split = [("split", SD15, True), ("split", SDXL, True)]
    assert family_vote(db, clock, *split, ("other", SD15, True)) == SDXL


def test_an_accounts_majority_decides_its_vote(db: Engine, clock: Clock) -> None:
    mostly_xl = [("mostly", SDXL, True), ("mostly", SDXL, True), ("mostly", SD15, True)]
    assert family_vote(db, clock, *mostly_xl, ("one", SD15, True), ("two", SD15, True)) == SD15


def test_an_accounts_established_nodes_speak_for_it_and_it_votes_as_established(
    db: Engine, clock: Clock
) -> None:
    """Its nodes on probation neither change its vote nor vote again as newcomers."""
    mixed = [("mixed", SD15, True), ("mixed", SDXL, False), ("mixed", SDXL, False)]
    newcomers = [("new-0", SDXL, False), ("new-1", SDXL, False)]
    assert family_vote(db, clock, *mixed, *newcomers) == SD15


@pytest.mark.parametrize("owner", ["local", "admin"])
def test_the_local_worker_and_admins_nodes_vote_as_established(
    db: Engine, clock: Clock, owner: str
) -> None:
    """Before: trusted nodes are never checked, so their checks_passed stays 0 and they
    voted as nodes on probation: two newcomers outvoted the operator's own worker."""
    trusted = LOCAL_ACCOUNT if owner == "local" else admin(db, "ops")
    newcomers = [("new-0", SDXL, False), ("new-1", SDXL, False)]
    assert family_vote(db, clock, (trusted, SD15, False), *newcomers) == SD15


def test_suspect_and_offline_holders_do_not_vote(db: Engine, clock: Clock) -> None:
    nodes = SqlNodeStore(db, rules=NodeRules(probation_checks=1), clock=clock)
    sd15 = NodeFile(CHECKPOINT, ModelKind.CHECKPOINT, "mix", "mix.safetensors", 1, SD15)
    sdxl = NodeFile(CHECKPOINT, ModelKind.CHECKPOINT, "mix", "mix.safetensors", 1, SDXL)
    gone = nodes.register("gone", "gone", {}, [sdxl], []).node_id
    nodes.record_check(gone, passed=True)
    clock.advance(NodeRules().offline_after_s + 1)
    caught = nodes.register("caught", "caught", {}, [sdxl], []).node_id
    nodes.record_check(caught, passed=False, reason="wrong picture")
    nodes.register("honest", "honest", {}, [sd15], [])
    assert [f.family for f in nodes.find_files(ModelKind.CHECKPOINT)] == [SD15]
