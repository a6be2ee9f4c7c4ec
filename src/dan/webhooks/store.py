"""WebhookStore: the webhooks of tasks, and the accounts' webhook secrets, in SQL.

A webhook row is written with its task, in the submit's transaction (:func:`new_webhook`),
``waiting`` with ``due_at`` set. It is sent once its task has finished, whichever process or
node finished it: :meth:`SqlWebhookStore.claim_due` takes the due rows of finished tasks and
moves their ``due_at`` forward by a lease in one transaction (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two API replicas never send one try at once, and
a try whose sender died is taken again when its lease ends. Each claim counts a try
(``attempts``); an outcome is recorded only by the sender of that try (the row's ``attempts``
still match), so a late answer of a try that lost its lease changes nothing.

States: ``waiting`` (its task runs), ``pending`` (being sent, or waiting to be retried),
``delivered`` and ``failed`` (given up; ``last_error`` says why). Times are the database's
(see dan.db.clock).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, select, update

from dan.db.clock import Clock, DatabaseClock
from dan.db.tables import accounts, tasks, webhooks
from dan.domain import TaskStatus

WAITING, PENDING, DELIVERED, FAILED = "waiting", "pending", "delivered", "failed"
FINISHED = (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED)
SECRET_BYTES = 32  # 64 hex digits, the column's width
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Delivery:
    """One claimed try: POST the webhook of ``task_id`` to ``url``, signed with
    ``account``'s secret; ``attempt`` counts from 1."""

    task_id: str
    account: str
    url: str
    attempt: int


@dataclass(frozen=True)
class WebhookState:
    """Where a task's webhook stands, as its owner may see it."""

    state: str
    attempts: int
    last_error: str | None
    delivered_at: float | None


def new_webhook(task_id: str, account: str, url: str, now: float) -> dict[str, Any]:
    """The webhook row of a task being submitted (written in the submit's transaction)."""
    return {
        "task_id": task_id,
        "account": account,
        "url": url,
        "state": WAITING,
        "attempts": 0,
        "due_at": now,
        "created_at": now,
    }


class WebhookStore(Protocol):
    """The webhooks' persistence seam. All methods are synchronous and thread-safe."""

    def claim_due(self, *, limit: int, lease_s: float) -> list[Delivery]:
        """Take up to ``limit`` due tries of finished tasks' webhooks, oldest due first, each
        for ``lease_s`` (counted as a try)."""
        ...

    def delivered(self, delivery: Delivery) -> bool:
        """Record that the try succeeded; False (no change) if it was not the latest try."""
        ...

    def retry(self, delivery: Delivery, error: str, *, after_s: float) -> bool:
        """Record the try's ``error`` and make the next try due in ``after_s``."""
        ...

    def give_up(self, delivery: Delivery, error: str) -> bool:
        """Record the try's ``error`` and stop: the webhook failed."""
        ...

    def state(self, task_id: str) -> WebhookState | None:
        """The task's webhook, or None if it has none."""
        ...

    def secret(self, account: str) -> str:
        """The account's webhook secret, made (and kept) now if it has none."""
        ...

    def rotate_secret(self, account: str) -> str:
        """A new webhook secret for the account; the old one signs nothing from now on."""
        ...


class SqlWebhookStore:
    """WebhookStore on SQLAlchemy Core; see the module docstring."""

    def __init__(self, engine: Engine, *, clock: Clock | None = None) -> None:
        self._engine = engine
        self._time = DatabaseClock(clock)
        self._postgres = engine.dialect.name == "postgresql"

    def claim_due(self, *, limit: int, lease_s: float) -> list[Delivery]:
        # Every replica asks often: look without taking the write lock first.
        with self._read() as conn:
            if not conn.execute(self._due(conn, 1)).first():
                return []
        with self._engine.begin() as conn:
            ids = [row.task_id for row in conn.execute(self._due(conn, limit, lock=True))]
            if not ids:
                return []
            rows = conn.execute(
                update(webhooks)
                .where(webhooks.c.task_id.in_(ids))
                .values(
                    state=PENDING,
                    attempts=webhooks.c.attempts + 1,
                    due_at=self._time.now(conn) + lease_s,
                )
                .returning(
                    webhooks.c.task_id, webhooks.c.account, webhooks.c.url, webhooks.c.attempts
                )
            ).all()
        claimed = [Delivery(row.task_id, row.account, row.url, row.attempts) for row in rows]
        return sorted(claimed, key=lambda delivery: ids.index(delivery.task_id))

    def delivered(self, delivery: Delivery) -> bool:
        with self._engine.begin() as conn:
            values = {"state": DELIVERED, "due_at": None, "last_error": None}
            return self._settle(conn, delivery, delivered_at=self._time.now(conn), **values)

    def retry(self, delivery: Delivery, error: str, *, after_s: float) -> bool:
        with self._engine.begin() as conn:
            due = self._time.now(conn) + after_s
            return self._settle(conn, delivery, due_at=due, last_error=error[:MAX_ERROR_CHARS])

    def give_up(self, delivery: Delivery, error: str) -> bool:
        with self._engine.begin() as conn:
            values = {"state": FAILED, "due_at": None, "last_error": error[:MAX_ERROR_CHARS]}
            return self._settle(conn, delivery, **values)

    def state(self, task_id: str) -> WebhookState | None:
        query = select(
            webhooks.c.state, webhooks.c.attempts, webhooks.c.last_error, webhooks.c.delivered_at
        ).where(webhooks.c.task_id == task_id)
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return WebhookState(row.state, row.attempts, row.last_error, row.delivered_at)

    def secret(self, account: str) -> str:
        made = secrets.token_hex(SECRET_BYTES)
        with self._engine.begin() as conn:
            conn.execute(
                update(accounts)
                .where(accounts.c.id == account, accounts.c.webhook_secret.is_(None))
                .values(webhook_secret=made)
            )
            return self._read_secret(conn, account)

    def rotate_secret(self, account: str) -> str:
        with self._engine.begin() as conn:
            conn.execute(
                update(accounts)
                .where(accounts.c.id == account)
                .values(webhook_secret=secrets.token_hex(SECRET_BYTES))
            )
            return self._read_secret(conn, account)

    def _read(self) -> Connection:
        return self._engine.connect().execution_options(dan_read_only=True)

    def _due(self, conn: Connection, limit: int, *, lock: bool = False) -> Any:
        query = (
            select(webhooks.c.task_id)
            .join(tasks, tasks.c.id == webhooks.c.task_id)
            .where(webhooks.c.due_at <= self._time.now(conn), tasks.c.status.in_(FINISHED))
            .order_by(webhooks.c.due_at)
            .limit(limit)
        )
        # SQLite serialises writers already; PostgreSQL senders skip rows others are taking.
        if lock and self._postgres:
            return query.with_for_update(skip_locked=True, of=webhooks)
        return query

    @staticmethod
    def _settle(conn: Connection, delivery: Delivery, **values: Any) -> bool:
        done = conn.execute(
            update(webhooks)
            .where(
                webhooks.c.task_id == delivery.task_id,
                webhooks.c.state == PENDING,
                webhooks.c.attempts == delivery.attempt,
            )
            .values(**values)
        )
        return bool(done.rowcount == 1)

    @staticmethod
    def _read_secret(conn: Connection, account: str) -> str:
        query = select(accounts.c.webhook_secret).where(accounts.c.id == account)
        secret = conn.execute(query).scalar_one_or_none()
        if secret is None:
            raise LookupError(f"no account {account!r}")
        return str(secret)
