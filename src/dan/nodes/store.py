"""NodeStore: worker nodes in SQL, their files, their running processes, and the honor they
earn for being online.

The store is built of parts by job: reads (dan.nodes.queries), and registration, sessions and
sightings, with the online honor a sighting pays (dan.nodes.registration); the checks of
nodes' results, suspects and model pulls are here. A passed check that ends a node's probation
pays out the honor it earned in escrow (dan.nodes.honor); a failed one makes the node suspect
and drops its escrow.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, func, select, update

from dan.db.tables import honor_escrow, nodes
from dan.nodes.base import (
    NetworkFile,
    NodeFile,
    NodeRecord,
    NodeRules,
    NodeStore,
    PublicNode,
    Session,
    node_id_for,
    session_worker_id,
)
from dan.nodes.honor import release_escrow
from dan.nodes.registration import NodeRegistration

# What callers import from here (the seam itself lives in dan.nodes.base).
__all__ = [
    "NetworkFile",
    "NodeFile",
    "NodeRecord",
    "NodeRules",
    "NodeStore",
    "PublicNode",
    "Session",
    "SqlNodeStore",
    "node_id_for",
    "session_worker_id",
]


class SqlNodeStore(NodeRegistration):
    """Nodes on SQLAlchemy Core. Every method is one short transaction; thread-safe. Its reads
    are dan.nodes.queries', its registrations, sessions and sightings dan.nodes.registration'."""

    # -- checks and suspects -----------------------------------------------------------------
    def on_probation(self, node_id: str) -> bool:
        """Whether the node has fewer passed checks than its probation asks."""
        node = self.get(node_id)
        return node is None or node.checks_passed < self._rules.probation_checks

    def record_check(self, node_id: str, *, passed: bool, reason: str = "") -> NodeRecord | None:
        """Count a check of one of the node's results. Passed: once the probation is through,
        its escrowed honor is paid. Failed: the node becomes suspect (with ``reason``) and its
        escrowed honor is dropped."""
        with self._engine.begin() as conn:
            now = self._time.now(conn)
            if passed:
                conn.execute(
                    update(nodes)
                    .where(nodes.c.id == node_id)
                    .values(checks_passed=nodes.c.checks_passed + 1)
                )
                passed_count = conn.execute(
                    select(nodes.c.checks_passed).where(nodes.c.id == node_id)
                ).scalar_one_or_none()
                if passed_count is not None and passed_count >= self._rules.probation_checks:
                    release_escrow(conn, node_id, now)
            else:
                conn.execute(
                    update(nodes)
                    .where(nodes.c.id == node_id)
                    .values(
                        checks_failed=nodes.c.checks_failed + 1,
                        suspect_since=func.coalesce(nodes.c.suspect_since, now),
                        suspect_reason=reason[:2000],
                    )
                )
                conn.execute(delete(honor_escrow).where(honor_escrow.c.node_id == node_id))
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().first()
            return None if row is None else self._record(conn, row)

    def clear_suspect(self, node_id: str) -> NodeRecord | None:
        """An admin cleared the node: it works again, on probation from the start."""
        with self._engine.begin() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(suspect_since=None, suspect_reason=None, checks_passed=0)
            )
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().first()
            return None if row is None else self._record(conn, row)

    def suspects(self) -> list[NodeRecord]:
        """Every suspect node, most recent first."""
        query = (
            select(nodes)
            .where(nodes.c.suspect_since.is_not(None))
            .order_by(nodes.c.suspect_since.desc())
        )
        with self._read() as conn:
            return [self._record(conn, row) for row in conn.execute(query).mappings().all()]

    # -- model pulls -------------------------------------------------------------------------
    def request_pull(self, node_id: str, catalog_name: str) -> tuple[str, ...] | None:
        """Ask the node to download ``catalog_name``; its pending pulls, or None if there is
        no such node. Asking twice queues it once."""
        with self._engine.begin() as conn:
            pending = self._pulls(conn, node_id)
            if pending is None:
                return None
            if catalog_name not in pending:
                pending = (*pending, catalog_name)
                conn.execute(update(nodes).where(nodes.c.id == node_id).values(pull=list(pending)))
            return pending

    def take_pulls(self, node_id: str) -> tuple[str, ...]:
        """The node's pending pulls, which are cleared (each is handed out once)."""
        with self._engine.begin() as conn:
            pending = self._pulls(conn, node_id)
            if pending:
                conn.execute(update(nodes).where(nodes.c.id == node_id).values(pull=[]))
            return pending or ()

    # -- helpers -----------------------------------------------------------------------------
    def _pulls(self, conn: Connection, node_id: str) -> tuple[str, ...] | None:
        query = select(nodes.c.pull).where(nodes.c.id == node_id)
        if self._postgres:
            query = query.with_for_update()
        pull = conn.execute(query).scalar_one_or_none()
        return None if pull is None else tuple(pull)
