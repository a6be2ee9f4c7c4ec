"""The AccountStore contract, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, MetaData, select

from dan.accounts.store import (
    LAST_USED_RESOLUTION_S,
    HonorReason,
    SqlAccountStore,
    hash_key,
)
from dan.db.tables import honor_grants
from dan.errors import InvalidArgument, TooManyKeys
from tests.store.conftest import Clock


@pytest.fixture
def accounts(db: Engine, clock: Clock) -> SqlAccountStore:
    return SqlAccountStore(db, clock=clock)


def every_row(db: Engine) -> list[str]:
    """Every row of every table in the database, as text."""
    metadata = MetaData()
    metadata.reflect(db)
    with db.connect() as conn:
        return [
            repr(tuple(row))
            for table in metadata.sorted_tables
            for row in conn.execute(select(table))
        ]


def signup_grants(db: Engine, account_id: str) -> int:
    query = select(honor_grants).where(
        honor_grants.c.account == account_id, honor_grants.c.reason == "signup"
    )
    with db.connect() as conn:
        return len(conn.execute(query).all())


def test_keys_are_stored_only_as_their_sha256(accounts: SqlAccountStore, db: Engine) -> None:
    alice = accounts.create_account("alice", "alice@example.org")
    keys = [accounts.add_key(alice.id) for _ in range(2)]
    for new in keys:
        assert new.key.startswith("sk-") and len(new.key) == 51 and new.key[3:].isalnum()
        assert new.info.prefix == new.key[:7] and new.info.account == alice.id
        assert accounts.find_by_key(new.key) == alice
    rows = "\n".join(every_row(db))
    for new in keys:
        assert new.key not in rows and new.key[7:] not in rows
        assert hash_key(new.key) in rows


def test_unknown_and_revoked_keys_find_no_account(accounts: SqlAccountStore) -> None:
    alice = accounts.create_account("alice")
    bob = accounts.create_account("bob")
    new = accounts.add_key(alice.id)
    assert accounts.find_by_key("sk-" + "x" * 48) is None
    assert accounts.key_id("sk-" + "x" * 48) is None
    assert accounts.revoke_key(bob.id, new.info.id) is None  # not bob's key
    assert accounts.find_by_key(new.key) == alice and not accounts.key_revoked(new.key)
    assert accounts.key_id(new.key) == new.info.id
    revoked = accounts.revoke_key(alice.id, new.info.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert accounts.find_by_key(new.key) is None and accounts.key_revoked(new.key)
    assert accounts.key_id(new.key) is None
    assert accounts.revoke_key(None, new.info.id) == revoked  # again: no change
    assert accounts.revoke_key(None, "no-such-key") is None


def test_list_keys_by_account_with_or_without_revoked(accounts: SqlAccountStore) -> None:
    alice, bob = accounts.create_account("alice"), accounts.create_account("bob")
    first, second = accounts.add_key(alice.id), accounts.add_key(alice.id)
    accounts.add_key(bob.id)
    accounts.revoke_key(alice.id, first.info.id)
    assert [k.id for k in accounts.list_keys(alice.id)] == [second.info.id]
    listed = accounts.list_keys(alice.id, include_revoked=True)
    assert {k.id for k in listed} == {first.info.id, second.info.id}
    assert {k.nickname for k in accounts.list_keys()} == {"alice", "bob"}


def test_a_key_for_an_unknown_account_is_refused(accounts: SqlAccountStore) -> None:
    with pytest.raises(InvalidArgument, match="no account"):
        accounts.add_key("nobody")


def test_last_used_is_written_at_most_once_a_minute(
    accounts: SqlAccountStore, clock: Clock
) -> None:
    alice = accounts.create_account("alice")
    new = accounts.add_key(alice.id)
    assert accounts.list_keys(alice.id)[0].last_used_at is None
    accounts.find_by_key(new.key)
    first_use = clock.now
    clock.advance(LAST_USED_RESOLUTION_S / 2)
    accounts.find_by_key(new.key)
    assert accounts.list_keys(alice.id)[0].last_used_at == first_use
    clock.advance(LAST_USED_RESOLUTION_S)
    accounts.find_by_key(new.key)
    assert accounts.list_keys(alice.id)[0].last_used_at == clock.now


def test_a_new_account_gets_the_signup_grant_once(accounts: SqlAccountStore, db: Engine) -> None:
    alice = accounts.create_account("alice", signup_honor=10.0)
    assert alice.honor == 10.0 and not alice.is_admin and not alice.can_run_nodes
    with pytest.raises(InvalidArgument, match="taken"):
        accounts.create_account("alice", signup_honor=10.0)
    assert signup_grants(db, alice.id) == 1 and accounts.honor(alice.id) == 10.0
    assert accounts.by_nickname("alice") == alice


def test_ensure_account_is_idempotent_and_grants_nothing(
    accounts: SqlAccountStore, db: Engine
) -> None:
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(accounts.ensure_account("local", "local")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    local = accounts.get("local")
    assert local is not None and results == [local] * 4
    assert (local.nickname, local.honor) == ("local", 0.0)
    assert signup_grants(db, "local") == 0
    with pytest.raises(InvalidArgument, match="taken"):
        accounts.ensure_account("other-id", "local")


def test_set_roles_changes_only_what_is_given(accounts: SqlAccountStore) -> None:
    alice = accounts.create_account("alice", is_admin=True)
    updated = accounts.set_roles(alice.id, can_run_nodes=True)
    assert updated is not None and updated.is_admin and updated.can_run_nodes
    assert accounts.set_roles("nobody", is_admin=True) is None


def test_honor_is_the_sum_of_the_ledger(accounts: SqlAccountStore) -> None:
    alice = accounts.create_account("alice", signup_honor=10.0)
    assert accounts.grant(alice.id, 1.5, HonorReason.TASK, task_id="t1", node_id="n1") == 11.5
    assert accounts.grant(alice.id, 1.5, HonorReason.TASK, task_id="t1", node_id="n1") == 11.5
    assert accounts.grant(alice.id, 2.0, HonorReason.ONLINE, node_id="n1") == 13.5
    balance = accounts.grant(
        alice.id, -3.5, HonorReason.ADMIN, granted_by="admin-id", note="a correction"
    )
    assert balance == 10.0 and accounts.honor(alice.id) == 10.0
    assert accounts.get(alice.id).honor == 10.0  # type: ignore[union-attr]
    assert accounts.honor("nobody") == 0.0


def test_leaderboard_ranks_node_honor_and_shows_no_email(accounts: SqlAccountStore) -> None:
    names = ("alice", "bob", "carol", "dave")
    people = {
        name: accounts.create_account(name, f"{name}@example.org", signup_honor=50.0)
        for name in names
    }
    accounts.grant(people["alice"].id, 3.0, HonorReason.TASK, task_id="a1")
    accounts.grant(people["bob"].id, 5.0, HonorReason.ONLINE, node_id="n")
    accounts.grant(people["carol"].id, 2.0, HonorReason.TASK, task_id="c1")
    accounts.grant(people["carol"].id, 1.0, HonorReason.ONLINE, node_id="n")
    accounts.grant(people["dave"].id, 100.0, HonorReason.ADMIN, note="not earned by nodes")
    board = accounts.leaderboard(10)
    assert [(e.nickname, e.honor) for e in board] == [("bob", 5.0), ("alice", 3.0), ("carol", 3.0)]
    assert "example.org" not in repr(board)
    assert [e.nickname for e in accounts.leaderboard(1)] == ["bob"]


def run_together(calls: list[Callable[[], object]]) -> list[object]:
    """Run ``calls`` in threads that start at the same moment; each one's result or error."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except Exception as exc:  # the test inspects it
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_add_key_stops_at_max_active_keys(accounts: SqlAccountStore) -> None:
    alice = accounts.create_account("alice")
    first = accounts.add_key(alice.id, max_active=2)
    accounts.add_key(alice.id, max_active=2)
    with pytest.raises(TooManyKeys, match=r"'alice' already has 2 active API keys.*=2\)"):
        accounts.add_key(alice.id, max_active=2)
    accounts.revoke_key(alice.id, first.info.id)  # revoked keys do not count
    accounts.add_key(alice.id, max_active=2)
    assert len(accounts.list_keys(alice.id)) == 2
    accounts.add_key(alice.id)  # no limit given: none applies
    with pytest.raises(InvalidArgument, match="no account"):
        accounts.add_key("nobody", max_active=2)


def test_concurrent_add_key_never_passes_the_limit(accounts: SqlAccountStore) -> None:
    alice = accounts.create_account("alice")
    outcomes = run_together([lambda: accounts.add_key(alice.id, max_active=3)] * 12)
    refused = [o for o in outcomes if isinstance(o, TooManyKeys)]
    assert len(refused) == 9, outcomes
    assert len(accounts.list_keys(alice.id)) == 3


def test_revoke_keys_revokes_every_active_key_but_the_one_kept(
    accounts: SqlAccountStore, clock: Clock
) -> None:
    alice, bob = accounts.create_account("alice"), accounts.create_account("bob")
    old, kept, newer = (accounts.add_key(alice.id) for _ in range(3))
    accounts.revoke_key(alice.id, old.info.id)
    bobs = accounts.add_key(bob.id)
    clock.advance(5)
    revoked = accounts.revoke_keys(alice.id, keep_key=kept.key)
    assert [(k.id, k.revoked_at) for k in revoked] == [(newer.info.id, clock.now)]
    assert accounts.find_by_key(kept.key) == alice and accounts.find_by_key(newer.key) is None
    assert accounts.find_by_key(bobs.key) is not None
    assert accounts.revoke_keys(alice.id, keep_key=kept.key) == []
    assert [k.id for k in accounts.revoke_keys(alice.id)] == [kept.info.id]
    assert accounts.list_keys(alice.id) == []


def test_set_roles_never_takes_the_admin_role_from_the_only_admin(
    accounts: SqlAccountStore,
) -> None:
    alice = accounts.create_account("alice", is_admin=True)
    bob = accounts.create_account("bob")
    with pytest.raises(InvalidArgument, match="'alice' is the only admin"):
        accounts.set_roles(alice.id, is_admin=False, can_run_nodes=True)
    assert accounts.get(alice.id) == alice  # nothing changed, the node role neither
    assert accounts.set_roles(bob.id, is_admin=False) == bob  # not an admin: nothing to keep
    accounts.set_roles(bob.id, is_admin=True)
    demoted = accounts.set_roles(alice.id, is_admin=False)
    assert demoted is not None and not demoted.is_admin
    with pytest.raises(InvalidArgument, match="'bob' is the only admin"):
        accounts.set_roles(bob.id, is_admin=False)


def test_two_admins_demoting_each_other_at_once_leave_one(accounts: SqlAccountStore) -> None:
    alice = accounts.create_account("alice", is_admin=True)
    bob = accounts.create_account("bob", is_admin=True)
    for _ in range(5):
        demote = [functools.partial(accounts.set_roles, a.id, is_admin=False) for a in (alice, bob)]
        outcomes = run_together(demote)
        assert sum(isinstance(o, InvalidArgument) for o in outcomes) == 1, outcomes
        for account in (alice, bob):
            accounts.set_roles(account.id, is_admin=True)
