"""Sign-in identities, the accounts they make and the keys the web page rotates, on SQLite and
(when configured) PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, func, select

from dan.accounts.identities import SqlIdentityStore
from dan.accounts.signin import SIGN_IN_KEY_ORIGIN, Identity, SignInService
from dan.accounts.store import SqlAccountStore
from dan.config import Settings
from dan.db.tables import accounts as accounts_table
from dan.db.tables import honor_grants, identities
from dan.errors import InvalidArgument, TooManyKeys
from tests.store.conftest import Clock
from tests.store.test_account_store import run_together

ISSUER = "https://id.example"


@pytest.fixture
def accounts(db: Engine, clock: Clock) -> SqlAccountStore:
    return SqlAccountStore(db, clock=clock)


@pytest.fixture
def store(db: Engine, clock: Clock) -> SqlIdentityStore:
    return SqlIdentityStore(db, clock=clock)


@pytest.fixture
def sign_in(accounts: SqlAccountStore, store: SqlIdentityStore) -> SignInService:
    return SignInService(accounts, store, Settings(signup_honor=10.0, max_keys_per_account=3))


def count(db: Engine, table: object) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_an_identity_makes_one_account_with_the_signup_grant(
    store: SqlIdentityStore, accounts: SqlAccountStore, db: Engine, clock: Clock
) -> None:
    assert store.account_of(ISSUER, "sub-1") is None
    account_id = store.create_account(ISSUER, "sub-1", "alice", signup_honor=10.0)
    account = accounts.get(account_id)
    assert account is not None and (account.nickname, account.honor) == ("alice", 10.0)
    clock.advance(60)
    assert store.account_of(ISSUER, "sub-1") == account_id
    assert store.account_of("https://other.example", "sub-1") is None  # subjects are per issuer
    with db.connect() as conn:
        row = conn.execute(select(identities)).mappings().one()
    assert (row["created_at"], row["last_seen_at"]) == (clock.now - 60, clock.now)


def test_a_taken_nickname_leaves_nothing_behind(store: SqlIdentityStore, db: Engine) -> None:
    store.create_account(ISSUER, "sub-1", "alice", signup_honor=10.0)
    with pytest.raises(InvalidArgument, match="'alice' is taken"):
        store.create_account(ISSUER, "sub-2", "alice", signup_honor=10.0)
    assert (count(db, accounts_table), count(db, honor_grants), count(db, identities)) == (1, 1, 1)
    assert store.account_of(ISSUER, "sub-2") is None


def test_a_subject_signed_in_meanwhile_keeps_its_one_account(
    store: SqlIdentityStore, db: Engine
) -> None:
    first = store.create_account(ISSUER, "sub-1", "alice", signup_honor=10.0)
    again = store.create_account(ISSUER, "sub-1", "alice-2", signup_honor=10.0)
    assert again == first
    assert (count(db, accounts_table), count(db, honor_grants)) == (1, 1)


def test_first_sign_ins_at_once_make_one_account(sign_in: SignInService, db: Engine) -> None:
    identity = Identity(ISSUER, "sub-1", ("alice",))
    outcomes = run_together([lambda: sign_in.sign_in(identity)] * 6)
    ids = {outcome.account.id for outcome in outcomes}  # type: ignore[union-attr]
    assert len(ids) == 1, outcomes
    assert (count(db, accounts_table), count(db, honor_grants), count(db, identities)) == (1, 1, 1)


def test_sign_in_service_names_and_finds_accounts(sign_in: SignInService) -> None:
    first = sign_in.sign_in(Identity(ISSUER, "sub-1", (None, "alice@example.org")))
    assert first.created and first.account.nickname == "alice" and first.account.honor == 10.0
    same = sign_in.sign_in(Identity(ISSUER, "sub-1", ("renamed",)))
    assert not same.created and same.account == first.account
    other = sign_in.sign_in(Identity("https://other.example", "sub-1", ("alice",)))
    assert other.created and other.account.nickname == "alice-2"
    with pytest.raises(InvalidArgument, match="subject"):
        sign_in.sign_in(Identity(ISSUER, "", ("x",)))


def test_web_keys_rotate_and_admin_keys_stay(
    sign_in: SignInService, accounts: SqlAccountStore
) -> None:
    account = sign_in.sign_in(Identity(ISSUER, "sub-1", ("alice",))).account
    admin_key = accounts.add_key(account.id)
    first = sign_in.issue_key(account)
    assert first.info.origin == SIGN_IN_KEY_ORIGIN and admin_key.info.origin is None
    second = sign_in.issue_key(account)
    assert accounts.find_by_key(first.key) is None and accounts.key_revoked(first.key)
    assert accounts.find_by_key(second.key) == accounts.find_by_key(admin_key.key) == account
    accounts.add_key(account.id)
    third = sign_in.issue_key(account)  # at the limit of 3, the key it replaces makes room
    assert len(accounts.list_keys(account.id)) == 3 and accounts.find_by_key(third.key)
    accounts.revoke_key(account.id, third.info.id)
    accounts.add_key(account.id)
    with pytest.raises(TooManyKeys, match="already has 3 active API keys"):
        sign_in.issue_key(account)  # three keys an admin made: no room, nothing revoked
    assert len(accounts.list_keys(account.id)) == 3
