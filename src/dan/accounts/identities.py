"""IdentityStore: who signed in with which provider (table ``identities``), in SQL.

An identity is a provider's namespace (its issuer URL; see dan.accounts.signin) and the subject
the provider gives the person there; it points at one account. Nothing of the provider's tokens
is stored, here or anywhere.
"""

from __future__ import annotations

import time
from typing import Protocol

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError

from dan.accounts.store import Clock, insert_account
from dan.db.tables import identities
from dan.errors import InvalidArgument


class IdentityStore(Protocol):
    """Persistence of sign-in identities. Synchronous and thread-safe."""

    def account_of(self, provider: str, subject: str) -> str | None: ...

    def create_account(
        self, provider: str, subject: str, nickname: str, *, signup_honor: float
    ) -> str: ...


class SqlIdentityStore:
    """IdentityStore on SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self._engine = engine
        self._clock = clock

    def account_of(self, provider: str, subject: str) -> str | None:
        """The id of the account that ``subject`` of ``provider`` signs in as, or None; notes
        the sign-in (``last_seen_at``)."""
        mine = (identities.c.provider == provider, identities.c.subject == subject)
        with self._engine.begin() as conn:
            account = conn.execute(select(identities.c.account).where(*mine)).scalar_one_or_none()
            if account is not None:
                conn.execute(update(identities).where(*mine).values(last_seen_at=self._clock()))
        return account

    def create_account(
        self, provider: str, subject: str, nickname: str, *, signup_honor: float
    ) -> str:
        """A new account (with its signup grant) for ``subject`` of ``provider``, made in one
        transaction with the identity; its id. If the identity was made meanwhile (two first
        sign-ins at once), nothing is made and the id of that identity's account is returned.
        InvalidArgument if the nickname is taken."""
        now = self._clock()
        try:
            with self._engine.begin() as conn:
                account = insert_account(
                    conn, nickname, None, False, False, signup_honor=signup_honor, now=now
                )
                conn.execute(
                    identities.insert().values(
                        provider=provider,
                        subject=subject,
                        account=account,
                        created_at=now,
                        last_seen_at=now,
                    )
                )
        except IntegrityError as exc:
            existing = self.account_of(provider, subject)
            if existing is not None:
                return existing
            raise InvalidArgument(f"the nickname {nickname!r} is taken") from exc
        return account
