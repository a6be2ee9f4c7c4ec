"""Registration, sessions and sightings: how nodes come, stay online and go, in SQL.

A node is known by its owner and its name: the same account registering the same name again
gets the same id (a uuid5 of both), so a restarted or reinstalled machine keeps its history and
two replicas registering it at once cannot create two rows. What it has installed is rows of
``node_files`` (replaced at each registration), so which online node has a task's files is a
join, however many files nodes report. Each registration opens a *session*, one running
process: tasks are held by ``node:<node id>:<session id>``, so two processes of one node (or
a restart before the old lease ran out) never hand back each other's tasks. Every account has
a bounded number of nodes, sessions and files (:class:`NodeRules`).

Each sighting pays online honor by the rules of dan.nodes.honor; the update that pays an
interval is guarded by its old ``rewarded_until`` (``WHERE rewarded_until = :old``), so two API
replicas seeing the same node at the same moment never pay it twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, case, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError

from dan.db.tables import node_sessions, nodes
from dan.domain import ModelFamily
from dan.errors import InvalidArgument, TooManyNodes
from dan.nodes.base import NodeFile, NodeRecord, Session, node_id_for
from dan.nodes.files import account_files, replace_families, replace_files
from dan.nodes.honor import earns, grant_online, settle
from dan.nodes.queries import NodeQueries


class NodeRegistration(NodeQueries):
    """The node store's registrations, sessions and sightings (see NodeStore)."""

    def register(
        self,
        account: str,
        name: str,
        capabilities: dict[str, Any],
        files: Sequence[NodeFile],
        loaded: Iterable[str],
        *,
        slots: int = 1,
        honor_per_interval: float = 0.0,
        session_id: str | None = None,
        families: Iterable[ModelFamily] | None = None,
    ) -> Session:
        """Create the node, or update the one ``account`` registered as ``name`` before (its
        online time is settled as by :meth:`seen`), replace its files and the model families
        it runs (None: a node that does not say, taken as SD 1.x only), and open a session.

        Raises TooManyNodes when the account has ``max_nodes_per_account`` nodes (and this
        is a new name), the node ``max_sessions_per_node`` live sessions, or the account's
        nodes would have more than ``max_files_per_account`` files."""
        node_id = node_id_for(account, name)
        described = {"capabilities": capabilities, "loaded": sorted(set(loaded))}
        for _ in range(2):
            try:
                with self._engine.begin() as conn:
                    self._lock_account(conn, account)
                    if not self._exists(conn, node_id):
                        self._check_node_count(conn, account)
                        row = {**self._new_row(conn, node_id, account, name), **described}
                        conn.execute(nodes.insert().values(**row))
                    self._check_file_count(conn, account, node_id, len(files))
                    replace_files(conn, node_id, files)
                    replace_families(conn, node_id, families)
                    session = self._open_session(conn, node_id, account, slots, session_id)
                    self._seen_in(conn, node_id, described, honor_per_interval)
                return session
            except IntegrityError:
                continue  # registered at the same moment elsewhere: update that row instead
        raise RuntimeError(f"could not register node {name!r} of {account!r}")

    def session(self, session_id: str) -> Session | None:
        """The live session ``session_id``, or None (ended, expired or never opened)."""
        with self._read() as conn:
            row = conn.execute(
                select(node_sessions).where(node_sessions.c.id == session_id)
            ).first()
        return None if row is None else _session(row)

    def seen(
        self,
        node_id: str,
        *,
        session_id: str | None = None,
        loaded: Iterable[str] | None = None,
        honor_per_interval: float = 0.0,
    ) -> NodeRecord | None:
        """Record that the node (and its session) is alive now, with the checkpoints it has
        ``loaded`` if given, and pay its owner ``honor_per_interval`` for each whole online
        interval since the last payment, if it earns it. None if there is no such node."""
        values = {} if loaded is None else {"loaded": sorted(set(loaded))}
        with self._engine.begin() as conn:
            if session_id is not None:
                conn.execute(
                    update(node_sessions)
                    .where(node_sessions.c.id == session_id)
                    .values(last_seen_at=self._time.now(conn))
                )
            return self._seen_in(conn, node_id, values, honor_per_interval)

    def end_session(self, session_id: str) -> Session | None:
        """Close the session (its process stops); the node counts as offline from now unless
        another session of it is live. Returns the session, whose tasks the caller hands back."""
        with self._engine.begin() as conn:
            row = conn.execute(
                delete(node_sessions)
                .where(node_sessions.c.id == session_id)
                .returning(*node_sessions.c)
            ).first()
            if row is None:
                return None
            if not self._live_sessions(conn, row.node_id):
                self._set_offline(conn, row.node_id)
            return _session(row)

    def sessions_of(self, node_id: str) -> list[Session]:
        """The node's open sessions."""
        query = select(node_sessions).where(node_sessions.c.node_id == node_id)
        with self._read() as conn:
            return [_session(row) for row in conn.execute(query)]

    def expire_sessions(self) -> list[Session]:
        """Close the sessions not heard from for ``offline_after_s`` (their processes died
        or lost the network); returns them, whose tasks the caller hands back."""
        with self._engine.begin() as conn:
            cutoff = self._time.now(conn) - self._rules.offline_after_s
            rows = conn.execute(
                delete(node_sessions)
                .where(node_sessions.c.last_seen_at < cutoff)
                .returning(*node_sessions.c)
            ).all()
        return [_session(row) for row in rows]

    def mark_offline(self, node_id: str) -> None:
        """The node counts as offline from now (its last sighting is moved just past the
        offline limit; online time not yet paid is forfeited)."""
        with self._engine.begin() as conn:
            self._set_offline(conn, node_id)

    # -- helpers -----------------------------------------------------------------------------
    def _lock_account(self, conn: Connection, account: str) -> None:
        """Serialise this account's registrations on PostgreSQL (SQLite writers are already),
        so that its caps cannot be raced."""
        if self._postgres:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 1))"), {"key": account}
            )

    @staticmethod
    def _exists(conn: Connection, node_id: str) -> bool:
        return conn.execute(select(nodes.c.id).where(nodes.c.id == node_id)).first() is not None

    def _check_node_count(self, conn: Connection, account: str) -> None:
        count = conn.execute(select(func.count()).where(nodes.c.account == account)).scalar_one()
        limit = self._rules.max_nodes_per_account
        if count >= limit:
            raise TooManyNodes(
                f"this account already has {count} nodes (the limit is {limit}); register "
                "under one of their names again, or ask an admin to raise DAN_MAX_NODES_PER_ACCOUNT"
            )

    def _check_file_count(self, conn: Connection, account: str, node_id: str, count: int) -> None:
        others = account_files(conn, account, besides=node_id)
        limit = self._rules.max_files_per_account
        if others + count > limit:
            raise InvalidArgument(
                f"files: this account's nodes would have {others + count} files installed; "
                f"at most {limit} are accepted per account"
            )

    def _open_session(
        self, conn: Connection, node_id: str, account: str, slots: int, session_id: str | None
    ) -> Session:
        now = self._time.now(conn)
        if session_id is not None:  # the same process registering again (a refresh)
            renewed = conn.execute(
                update(node_sessions)
                .where(node_sessions.c.id == session_id, node_sessions.c.node_id == node_id)
                .values(last_seen_at=now, slots=slots)
                .returning(*node_sessions.c)
            ).first()
            if renewed is not None:
                return _session(renewed)
        cutoff = now - self._rules.offline_after_s
        conn.execute(
            delete(node_sessions).where(
                node_sessions.c.node_id == node_id, node_sessions.c.last_seen_at < cutoff
            )
        )
        live = self._live_sessions(conn, node_id)
        limit = self._rules.max_sessions_per_node
        if live >= limit:
            raise TooManyNodes(
                f"{live} processes already serve this node (the limit is {limit}); stop one, "
                "or give each process its own --name"
            )
        session = Session(session_id or str(uuid.uuid4()), node_id, account, slots)
        conn.execute(
            node_sessions.insert().values(
                id=session.id,
                node_id=node_id,
                account=account,
                slots=slots,
                started_at=now,
                last_seen_at=now,
            )
        )
        return session

    def _live_sessions(self, conn: Connection, node_id: str) -> int:
        cutoff = self._time.now(conn) - self._rules.offline_after_s
        query = select(func.count()).where(
            node_sessions.c.node_id == node_id, node_sessions.c.last_seen_at >= cutoff
        )
        return int(conn.execute(query).scalar_one())

    def _set_offline(self, conn: Connection, node_id: str) -> None:
        cutoff = self._time.now(conn) - self._rules.offline_after_s - 1.0
        conn.execute(
            update(nodes)
            .where(nodes.c.id == node_id, nodes.c.last_seen_at > cutoff)
            .values(last_seen_at=cutoff)
        )

    def _seen_in(
        self, conn: Connection, node_id: str, values: dict[str, Any], honor_per_interval: float
    ) -> NodeRecord | None:
        now = self._time.now(conn)
        row = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().first()
        if row is None:
            return None
        intervals, until = settle(row, now, self._rules)
        later = case((nodes.c.last_seen_at > now, nodes.c.last_seen_at), else_=now)
        paid = conn.execute(
            update(nodes)
            .where(nodes.c.id == node_id, nodes.c.rewarded_until == row["rewarded_until"])
            .values(**values, last_seen_at=later, rewarded_until=until)
        ).rowcount
        if paid != 1:  # another replica settled this node just now; only note the sighting
            conn.execute(
                update(nodes).where(nodes.c.id == node_id).values(**values, last_seen_at=later)
            )
        elif intervals and honor_per_interval > 0 and earns(conn, row, now, self._rules):
            interval_s = self._rules.online_interval_s
            grant_online(conn, row, intervals, honor_per_interval, now, interval_s)
        fresh = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().one()
        return self._record(conn, fresh)

    def _new_row(self, conn: Connection, node_id: str, account: str, name: str) -> dict[str, Any]:
        now = self._time.now(conn)
        return {
            "id": node_id,
            "account": account,
            "name": name,
            "pull": [],
            "tasks_done": 0,
            "registered_at": now,
            "last_seen_at": now,
            "rewarded_until": now,
            "checks_passed": 0,
            "checks_failed": 0,
        }


def _session(row: Any) -> Session:
    return Session(row.id, row.node_id, row.account, row.slots)
