"""The Alembic migrations build exactly the schema dan.db.tables describes."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, select

from dan.db import create_db_engine, migrate
from dan.db.tables import honor_escrow, honor_grants, metadata, node_files, task_files


def test_migrations_match_the_table_definitions(db: Engine) -> None:
    with db.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = [d for d in compare_metadata(context, metadata) if d[0] != "remove_table"]
    assert differences == []


def test_processes_migrating_at_once_all_succeed(db_url: str) -> None:
    # Every API replica and worker migrates when it starts; they take turns under a lock.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrate(db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = create_db_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert [d for d in compare_metadata(context, metadata) if d[0] != "remove_table"] == []
    engine.dispose()


def test_0003_moves_the_installed_and_required_lists_into_rows(db_url: str) -> None:
    migrate(db_url, "0002")
    engine = create_db_engine(db_url)
    old = MetaData()
    old.reflect(engine)
    with engine.begin() as conn:
        conn.execute(
            old.tables["nodes"]
            .insert()
            .values(
                id="n1",
                account="donor",
                name="gpu",
                capabilities={},
                installed=["a" * 64, "b" * 64],
                loaded=[],
                pull=[],
                tasks_done=0,
                registered_at=0.0,
                last_seen_at=0.0,
                rewarded_until=0.0,
            )
        )
        for task_id, status in (("pending", 0), ("done", 2)):
            conn.execute(
                old.tables["tasks"]
                .insert()
                .values(
                    id=task_id,
                    account="user",
                    kind="txt2img",
                    status=status,
                    tag=1.0,
                    params={},
                    created_at=0.0,
                    progress=0.0,
                    attempts=0,
                    cancel_requested=False,
                    expired=False,
                    requires=["a" * 64],
                )
            )
    migrate(db_url)
    with engine.connect() as conn:
        files = conn.execute(select(node_files.c.node_id, node_files.c.sha256)).all()
        needs = conn.execute(select(task_files.c.task_id, task_files.c.sha256)).all()
    engine.dispose()
    assert sorted(files) == [("n1", "a" * 64), ("n1", "b" * 64)]
    assert needs == [("pending", "a" * 64)]  # a finished task will never be claimed again


def test_0009_pays_what_trusted_nodes_had_in_escrow(db_url: str) -> None:
    # An admin's node was never checked, so its escrowed task honor was held for good.
    migrate(db_url, "0008")
    engine = create_db_engine(db_url)
    old = MetaData()
    old.reflect(engine)
    owners = {"admin-node": "root", "local-node": "local", "donor-node": "donor"}
    with engine.begin() as conn:
        for account, is_admin in (("root", True), ("donor", False)):
            conn.execute(
                old.tables["accounts"]
                .insert()
                .values(
                    id=account,
                    nickname=account,
                    is_admin=is_admin,
                    can_run_nodes=True,
                    created_at=0.0,
                )
            )
        for node_id, account in owners.items():
            conn.execute(
                old.tables["nodes"]
                .insert()
                .values(
                    id=node_id,
                    account=account,
                    name=node_id,
                    capabilities={},
                    loaded=[],
                    pull=[],
                    tasks_done=0,
                    registered_at=0.0,
                    last_seen_at=0.0,
                    rewarded_until=0.0,
                )
            )
            conn.execute(
                old.tables["honor_escrow"]
                .insert()
                .values(
                    node_id=node_id,
                    account=account,
                    amount=2.5,
                    task_id=f"t-{node_id}",
                    created_at=7.0,
                )
            )
    migrate(db_url)
    with engine.connect() as conn:
        grants = conn.execute(
            select(honor_grants.c.node_id, honor_grants.c.amount, honor_grants.c.reason)
        ).all()
        escrow = conn.execute(select(honor_escrow.c.node_id)).scalars().all()
    engine.dispose()
    assert sorted(grants) == [("admin-node", 2.5, "task"), ("local-node", 2.5, "task")]
    assert escrow == ["donor-node"]  # still on probation: its results are checked
