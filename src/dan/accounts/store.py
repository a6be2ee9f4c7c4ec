"""AccountStore: accounts, hashed API keys and the honor ledger in SQL (SQLAlchemy Core).

A key is never stored: only its sha256 and a short display prefix are. Looking a key up by its
hash needs no constant-time comparison (the database compares digests, not secrets).

Honor is a ledger: an account's honor is the sum of its grants, and every grant is one row
written in the same transaction as whatever earned it (an account's creation, a finished task).
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, Engine, Insert, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from dan.db.tables import accounts, api_keys, honor_grants
from dan.domain import Account
from dan.errors import InvalidArgument, TooManyKeys

Clock = Callable[[], float]

KEY_ALPHABET = string.ascii_letters + string.digits
KEY_CHARS = 48  # after "sk-", as the original's keys
PREFIX_CHARS = 7  # "sk-" and four characters: enough to tell one's keys apart
LAST_USED_RESOLUTION_S = 60.0  # last_used_at is written at most this often per key


class HonorReason(StrEnum):
    """Why a grant was made (honor_grants.reason)."""

    SIGNUP = "signup"  # once, when an account is created
    TASK = "task"  # a node's owner, per completed task (task_id set, unique)
    ONLINE = "online"  # a node's owner, per online interval (node_id set)
    ADMIN = "admin"  # by hand, by an admin (granted_by and note set)


# Honor earned by running nodes: what the donor leaderboard ranks.
NODE_REASONS: tuple[HonorReason, ...] = (HonorReason.TASK, HonorReason.ONLINE)


@dataclass(frozen=True)
class ApiKey:
    """A stored key as its owner may see it: never the key itself."""

    id: str
    account: str
    nickname: str
    prefix: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None
    origin: str | None = None  # "web": made by a signed-in person (and rotated there)


@dataclass(frozen=True)
class NewKey:
    """A key just made: ``key`` is the plaintext, which exists only in this value."""

    key: str
    info: ApiKey


@dataclass(frozen=True)
class LeaderboardEntry:
    nickname: str
    honor: float


def generate_key() -> str:
    return "sk-" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_CHARS))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AccountStore(Protocol):
    """Persistence of accounts, keys and honor. All methods are synchronous and thread-safe."""

    def get(self, account_id: str) -> Account | None: ...

    def by_nickname(self, nickname: str) -> Account | None: ...

    def create_account(
        self,
        nickname: str,
        email: str | None = None,
        is_admin: bool = False,
        can_run_nodes: bool = False,
        *,
        signup_honor: float = 0.0,
    ) -> Account: ...

    def ensure_account(self, account_id: str, nickname: str) -> Account: ...

    def set_roles(
        self, account_id: str, *, is_admin: bool | None = None, can_run_nodes: bool | None = None
    ) -> Account | None: ...

    def add_key(
        self, account_id: str, *, max_active: int | None = None, origin: str | None = None
    ) -> NewKey: ...

    def find_by_key(self, key: str) -> Account | None: ...

    def key_revoked(self, key: str) -> bool: ...

    def key_id(self, key: str) -> str | None: ...

    def list_keys(
        self, account_id: str | None = None, *, include_revoked: bool = False
    ) -> list[ApiKey]: ...

    def revoke_key(self, account_id: str | None, key_id: str) -> ApiKey | None: ...

    def revoke_keys(self, account_id: str, *, keep_key: str | None = None) -> list[ApiKey]: ...

    def honor(self, account_id: str) -> float: ...

    def grant(
        self,
        account_id: str,
        amount: float,
        reason: HonorReason,
        *,
        granted_by: str | None = None,
        note: str | None = None,
        task_id: str | None = None,
        node_id: str | None = None,
    ) -> float: ...

    def leaderboard(self, limit: int) -> list[LeaderboardEntry]: ...


class SqlAccountStore:
    """AccountStore on SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self._engine = engine
        self._clock = clock

    # -- accounts ----------------------------------------------------------------------------
    def get(self, account_id: str) -> Account | None:
        """The account with its honor, or None."""
        return self._read_account(accounts.c.id == account_id)

    def by_nickname(self, nickname: str) -> Account | None:
        return self._read_account(accounts.c.nickname == nickname)

    def create_account(
        self,
        nickname: str,
        email: str | None = None,
        is_admin: bool = False,
        can_run_nodes: bool = False,
        *,
        signup_honor: float = 0.0,
    ) -> Account:
        """A new account and its one signup grant, in one transaction; InvalidArgument if the
        nickname is taken."""
        try:
            with self._engine.begin() as conn:
                account_id = insert_account(
                    conn,
                    nickname,
                    email,
                    is_admin,
                    can_run_nodes,
                    signup_honor=signup_honor,
                    now=self._clock(),
                )
        except IntegrityError as exc:
            raise InvalidArgument(f"the nickname {nickname!r} is taken") from exc
        created = self.get(account_id)
        assert created is not None
        return created

    def ensure_account(self, account_id: str, nickname: str) -> Account:
        """The account ``account_id``, created (without a signup grant) if missing. Safe to
        call concurrently; InvalidArgument if another account already has ``nickname``."""
        existing = self.get(account_id)
        if existing is not None:
            return existing
        row = _account_row(account_id, nickname, None, False, False, self._clock())
        with self._engine.begin() as conn:
            conn.execute(_insert_ignoring_conflicts(conn, accounts).values(**row))
        account = self.get(account_id)
        if account is None:
            raise InvalidArgument(f"the nickname {nickname!r} is taken by another account")
        return account

    def set_roles(
        self, account_id: str, *, is_admin: bool | None = None, can_run_nodes: bool | None = None
    ) -> Account | None:
        """Change the account's roles (None: keep); the account, or None if there is none.
        InvalidArgument if it would take the admin role from the only admin: the admins' rows
        stay locked from the count to the update, so two admins demoting each other at once
        cannot both succeed."""
        values = {"is_admin": is_admin, "can_run_nodes": can_run_nodes}
        values = {name: value for name, value in values.items() if value is not None}
        if values:
            with self._engine.begin() as conn:
                if is_admin is False:
                    _keep_an_admin(conn, account_id)
                conn.execute(update(accounts).where(accounts.c.id == account_id).values(**values))
        return self.get(account_id)

    # -- keys --------------------------------------------------------------------------------
    def add_key(
        self, account_id: str, *, max_active: int | None = None, origin: str | None = None
    ) -> NewKey:
        """A new key for the account; only its sha256 and prefix are stored. InvalidArgument
        if there is no such account; TooManyKeys if it already has ``max_active`` active keys.
        The account's row is locked from the count to the insert, so concurrent calls cannot
        pass the limit together.

        With ``origin`` (where the key is made, such as "web"), the account's active keys of
        that origin are revoked in the same transaction, before the count: that kind of key is
        rotated, the others are kept."""
        key = generate_key()
        key_id = str(uuid.uuid4())
        with self._engine.begin() as conn:
            if origin is not None:
                _check_room_for_key(conn, account_id, None)  # locks the account's row first
                _revoke_origin(conn, account_id, origin, self._clock())
            _check_room_for_key(conn, account_id, max_active)
            conn.execute(
                api_keys.insert().values(
                    id=key_id,
                    account=account_id,
                    key_sha256=hash_key(key),
                    prefix=key[:PREFIX_CHARS],
                    created_at=self._clock(),
                    origin=origin,
                )
            )
            row = conn.execute(_keys_query().where(api_keys.c.id == key_id)).mappings().one()
        return NewKey(key=key, info=_api_key(row))

    def find_by_key(self, key: str) -> Account | None:
        """The account of an active (not revoked) key, or None. Notes the key's use."""
        query = (
            select(*_account_columns(), api_keys.c.id.label("key_id"), api_keys.c.last_used_at)
            .join_from(api_keys, accounts, api_keys.c.account == accounts.c.id)
            .where(api_keys.c.key_sha256 == hash_key(key), api_keys.c.revoked_at.is_(None))
        )
        with self._read() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        self._note_use(row["key_id"], row["last_used_at"])
        return _account(row)

    def key_revoked(self, key: str) -> bool:
        """Whether ``key`` is a stored key that was revoked."""
        query = select(api_keys.c.revoked_at).where(api_keys.c.key_sha256 == hash_key(key))
        with self._read() as conn:
            revoked_at = conn.execute(query).scalar_one_or_none()
        return revoked_at is not None

    def key_id(self, key: str) -> str | None:
        """The id of ``key`` if it is a stored, active key; else None."""
        query = select(api_keys.c.id).where(
            api_keys.c.key_sha256 == hash_key(key), api_keys.c.revoked_at.is_(None)
        )
        with self._read() as conn:
            found: str | None = conn.execute(query).scalar_one_or_none()
        return found

    def list_keys(
        self, account_id: str | None = None, *, include_revoked: bool = False
    ) -> list[ApiKey]:
        """The account's keys (every account's when None), oldest first."""
        query = _keys_query()
        if account_id is not None:
            query = query.where(api_keys.c.account == account_id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self._read() as conn:
            return [_api_key(row) for row in conn.execute(query).mappings()]

    def revoke_key(self, account_id: str | None, key_id: str) -> ApiKey | None:
        """Revoke the key (of ``account_id``, or of anyone when None); the key as it now is,
        or None if there is no such key. Revoking a revoked key changes nothing."""
        mine = [api_keys.c.id == key_id]
        if account_id is not None:
            mine.append(api_keys.c.account == account_id)
        with self._engine.begin() as conn:
            conn.execute(
                update(api_keys)
                .where(*mine, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=self._clock())
            )
            row = conn.execute(_keys_query().where(*mine)).mappings().first()
        return None if row is None else _api_key(row)

    def revoke_keys(self, account_id: str, *, keep_key: str | None = None) -> list[ApiKey]:
        """Revoke every active key of the account but ``keep_key`` (a key's text, e.g. the
        one in use); the keys this revoked, oldest first."""
        where = [api_keys.c.account == account_id, api_keys.c.revoked_at.is_(None)]
        if keep_key is not None:
            where.append(api_keys.c.key_sha256 != hash_key(keep_key))
        with self._engine.begin() as conn:
            revoke = update(api_keys).where(*where).values(revoked_at=self._clock())
            ids = list(conn.execute(revoke.returning(api_keys.c.id)).scalars())
            rows = conn.execute(_keys_query().where(api_keys.c.id.in_(ids))).mappings()
            return [_api_key(row) for row in rows]

    # -- honor -------------------------------------------------------------------------------
    def honor(self, account_id: str) -> float:
        """The sum of the account's grants (0 for an unknown account)."""
        with self._read() as conn:
            return float(conn.execute(select(_honor_sum(account_id))).scalar_one())

    def grant(
        self,
        account_id: str,
        amount: float,
        reason: HonorReason,
        *,
        granted_by: str | None = None,
        note: str | None = None,
        task_id: str | None = None,
        node_id: str | None = None,
    ) -> float:
        """Add one grant to the ledger and return the account's new honor. A second grant
        for the same ``task_id`` is ignored, so a task is rewarded at most once."""
        row = {
            "account": account_id,
            "amount": amount,
            "reason": HonorReason(reason).value,
            "task_id": task_id,
            "node_id": node_id,
            "granted_by": granted_by,
            "note": note,
            "created_at": self._clock(),
        }
        with self._engine.begin() as conn:
            conn.execute(_insert_ignoring_conflicts(conn, honor_grants).values(**row))
            return float(conn.execute(select(_honor_sum(account_id))).scalar_one())

    def leaderboard(self, limit: int) -> list[LeaderboardEntry]:
        """Accounts by honor earned from their nodes, highest first (nickname breaks ties)."""
        earned = func.sum(honor_grants.c.amount).label("earned")
        query = (
            select(accounts.c.nickname, earned)
            .join_from(honor_grants, accounts, honor_grants.c.account == accounts.c.id)
            .where(honor_grants.c.reason.in_([r.value for r in NODE_REASONS]))
            .group_by(accounts.c.id, accounts.c.nickname)
            .having(func.sum(honor_grants.c.amount) > 0)
            .order_by(earned.desc(), accounts.c.nickname)
            .limit(limit)
        )
        with self._read() as conn:
            return [
                LeaderboardEntry(row.nickname, float(row.earned)) for row in conn.execute(query)
            ]

    # -- helpers -----------------------------------------------------------------------------
    def _read(self) -> Connection:
        return self._engine.connect().execution_options(dan_read_only=True)

    def _read_account(self, where: ColumnElement[bool]) -> Account | None:
        with self._read() as conn:
            row = conn.execute(select(*_account_columns()).where(where)).mappings().first()
        return None if row is None else _account(row)

    def _note_use(self, key_id: str, last_used_at: float | None) -> None:
        # A write per request would serialise every request on SQLite; once a minute is
        # precise enough for "last used".
        now = self._clock()
        stale = now - LAST_USED_RESOLUTION_S
        if last_used_at is not None and last_used_at > stale:
            return
        with self._engine.begin() as conn:
            conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.id == key_id,
                    (api_keys.c.last_used_at.is_(None)) | (api_keys.c.last_used_at <= stale),
                )
                .values(last_used_at=now)
            )


def insert_account(
    conn: Connection,
    nickname: str,
    email: str | None,
    is_admin: bool,
    can_run_nodes: bool,
    *,
    signup_honor: float,
    now: float,
) -> str:
    """Insert a new account and its signup grant inside ``conn``'s transaction; its id.
    IntegrityError (from the database) if the nickname is taken."""
    account_id = str(uuid.uuid4())
    row = _account_row(account_id, nickname, email, is_admin, can_run_nodes, now)
    conn.execute(accounts.insert().values(**row))
    conn.execute(
        honor_grants.insert().values(
            account=account_id,
            amount=signup_honor,
            reason=HonorReason.SIGNUP.value,
            created_at=now,
        )
    )
    return account_id


def _revoke_origin(conn: Connection, account_id: str, origin: str, now: float) -> None:
    """Revoke the account's active keys made at ``origin``."""
    conn.execute(
        update(api_keys)
        .where(
            api_keys.c.account == account_id,
            api_keys.c.origin == origin,
            api_keys.c.revoked_at.is_(None),
        )
        .values(revoked_at=now)
    )


def _check_room_for_key(conn: Connection, account_id: str, max_active: int | None) -> None:
    """InvalidArgument if there is no account ``account_id``, TooManyKeys if it has
    ``max_active`` active keys. Locks the account's row until the transaction ends (FOR UPDATE
    on PostgreSQL; SQLite leaves it out, its BEGIN IMMEDIATE already serialises writers)."""
    account = select(accounts.c.nickname).where(accounts.c.id == account_id).with_for_update()
    nickname = conn.execute(account).scalar_one_or_none()
    if nickname is None:
        raise InvalidArgument(f"no account with id {account_id!r}")
    if max_active is None:
        return
    active = select(func.count()).where(
        api_keys.c.account == account_id, api_keys.c.revoked_at.is_(None)
    )
    count = conn.execute(active).scalar_one()
    if count >= max_active:
        raise TooManyKeys(
            f"the account {nickname!r} already has {count} active API keys, the most this "
            f"server allows (DAN_MAX_KEYS_PER_ACCOUNT={max_active}); revoke one first "
            "(DELETE /api/user/keys/{id}, or `dan keys revoke KEY_ID`)"
        )


def _keep_an_admin(conn: Connection, account_id: str) -> None:
    """InvalidArgument if ``account_id`` is the only admin. Locks the admins' rows (in id
    order, so that two such transactions cannot deadlock) until the transaction ends; a
    PostgreSQL transaction that waited for them sees the other's demotion when it proceeds."""
    admins = (
        select(accounts.c.id, accounts.c.nickname)
        .where(accounts.c.is_admin.is_(True))
        .order_by(accounts.c.id)
        .with_for_update()
    )
    rows = conn.execute(admins).all()
    if [row.id for row in rows] == [account_id]:
        raise InvalidArgument(
            f"{rows[0].nickname!r} is the only admin; give the role to another account first "
            "(`dan keys roles NICKNAME --admin`, or PATCH /api/admin/accounts/NICKNAME with "
            '{"isAdmin": true})'
        )


def _insert_ignoring_conflicts(conn: Connection, table: Table) -> Insert:
    """INSERT that skips a row violating a unique constraint (ON CONFLICT DO NOTHING)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"unsupported database {conn.dialect.name!r}")


def _honor_sum(account: Any) -> Any:
    """The sum of ``account``'s grants, 0 when it has none (a scalar subquery)."""
    total = func.coalesce(func.sum(honor_grants.c.amount), 0.0)
    return select(total).where(honor_grants.c.account == account).scalar_subquery()


def _account_columns() -> Iterable[Any]:
    return (
        accounts.c.id,
        accounts.c.nickname,
        accounts.c.is_admin,
        accounts.c.can_run_nodes,
        _honor_sum(accounts.c.id).label("honor"),
    )


def _account_row(
    account_id: str,
    nickname: str,
    email: str | None,
    is_admin: bool,
    can_run_nodes: bool,
    now: float,
) -> dict[str, Any]:
    return {
        "id": account_id,
        "nickname": nickname,
        "email": email,
        "is_admin": is_admin,
        "can_run_nodes": can_run_nodes,
        "created_at": now,
    }


def _account(row: RowMapping) -> Account:
    return Account(
        id=row["id"],
        nickname=row["nickname"],
        is_admin=bool(row["is_admin"]),
        can_run_nodes=bool(row["can_run_nodes"]),
        honor=float(row["honor"]),
    )


def _keys_query() -> Any:
    return (
        select(
            api_keys.c.id,
            api_keys.c.account,
            accounts.c.nickname,
            api_keys.c.prefix,
            api_keys.c.created_at,
            api_keys.c.last_used_at,
            api_keys.c.revoked_at,
            api_keys.c.origin,
        )
        .join_from(api_keys, accounts, api_keys.c.account == accounts.c.id)
        .order_by(api_keys.c.created_at, api_keys.c.id)
    )


def _api_key(row: RowMapping) -> ApiKey:
    return ApiKey(
        id=row["id"],
        account=row["account"],
        nickname=row["nickname"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
        origin=row["origin"],
    )
