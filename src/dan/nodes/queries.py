"""The read side of the node store, and what every part of it shares.

:class:`NodeQueries` holds the engine, the database clock and the store's rules (NodeRules);
:class:`dan.nodes.store.SqlNodeStore` is built from it and the parts that write
(dan.nodes.registration, and the checks, suspects and pulls in dan.nodes.store). Reads never
take the write lock: they run on a read-only connection (see dan.db). A node is online while
its last sighting is within ``offline_after_s`` of the database's now.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Engine, case, select
from sqlalchemy.engine import RowMapping

from dan.db.clock import DatabaseClock
from dan.db.tables import accounts, node_families, node_files, nodes
from dan.domain import ModelFamily, ModelKind
from dan.nodes.base import NetworkFile, NodeRecord, NodeRules, PublicNode
from dan.nodes.files import network_files

Clock = Callable[[], float]


class NodeQueries:
    """The node store's reads (see NodeStore), and the state its writing parts share."""

    def __init__(
        self, engine: Engine, *, rules: NodeRules | None = None, clock: Clock | None = None
    ) -> None:
        self._engine = engine
        self._rules = rules or NodeRules()
        self._time = DatabaseClock(clock)
        self._postgres = engine.dialect.name == "postgresql"

    @property
    def rules(self) -> NodeRules:
        return self._rules

    # -- reads -------------------------------------------------------------------------------
    def get(self, node_id: str) -> NodeRecord | None:
        with self._read() as conn:
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().first()
            return None if row is None else self._record(conn, row)

    def files(self, node_id: str) -> frozenset[str]:
        """The sha256 of every file the node has installed."""
        query = select(node_files.c.sha256).where(node_files.c.node_id == node_id)
        with self._read() as conn:
            return frozenset(conn.execute(query).scalars())

    def families(self, node_id: str) -> frozenset[ModelFamily]:
        """The model families the node runs (empty for an unknown node)."""
        query = select(node_families.c.family).where(node_families.c.node_id == node_id)
        with self._read() as conn:
            return frozenset(ModelFamily(family) for family in conn.execute(query).scalars())

    def list_for(self, account: str) -> list[NodeRecord]:
        """The nodes of ``account``, by name."""
        query = select(nodes).where(nodes.c.account == account).order_by(nodes.c.name)
        with self._read() as conn:
            return [self._record(conn, row) for row in conn.execute(query).mappings().all()]

    def list_public(self) -> list[PublicNode]:
        """Every node with its owner's nickname: online ones first, then by tasks done."""
        nickname = case((accounts.c.nickname.is_(None), nodes.c.account), else_=accounts.c.nickname)
        query = (
            select(nodes, nickname.label("owner"))
            .join_from(nodes, accounts, nodes.c.account == accounts.c.id, isouter=True)
            .order_by(nodes.c.tasks_done.desc(), nodes.c.name, nodes.c.id)
        )
        with self._read() as conn:
            now = self._time.now(conn)
            rows = conn.execute(query).mappings().all()
        listed = [
            PublicNode(
                row["id"], row["owner"], row["name"], row["tasks_done"], self._online(row, now)
            )
            for row in rows
        ]
        return sorted(listed, key=lambda node: not node.online)

    def find_files(
        self,
        kind: ModelKind,
        *,
        sha256: str | None = None,
        key: str | None = None,
        prefix: str | None = None,
        limit: int = 1000,
    ) -> list[NetworkFile]:
        """The described files of ``kind`` on online, unsuspected nodes: with that sha256,
        a model or file name whose casefold is ``key``, or a sha256 starting with ``prefix``
        (all of them without a filter); one per (sha256, name, file), most holders first,
        with the family its holders agree on (dan.nodes.files)."""
        with self._read() as conn:
            since = self._time.now(conn) - self._rules.offline_after_s
            checks = self._rules.probation_checks
            found = {"sha256": sha256, "key": key, "prefix": prefix}
            return network_files(conn, kind, since, checks, limit, **found)

    # -- helpers -----------------------------------------------------------------------------
    def _read(self) -> Connection:
        return self._engine.connect().execution_options(dan_read_only=True)

    def _online(self, row: RowMapping, now: float) -> bool:
        return bool(now - row["last_seen_at"] <= self._rules.offline_after_s)

    def _record(self, conn: Connection, row: RowMapping) -> NodeRecord:
        return NodeRecord(
            id=row["id"],
            account=row["account"],
            name=row["name"],
            capabilities=dict(row["capabilities"] or {}),
            loaded=frozenset(row["loaded"] or ()),
            pull=tuple(row["pull"] or ()),
            tasks_done=row["tasks_done"],
            registered_at=row["registered_at"],
            last_seen_at=row["last_seen_at"],
            rewarded_until=row["rewarded_until"],
            online=self._online(row, self._time.now(conn)),
            checks_passed=row["checks_passed"],
            checks_failed=row["checks_failed"],
            worked_at=row["worked_at"],
            suspect_since=row["suspect_since"],
            suspect_reason=row["suspect_reason"],
        )
