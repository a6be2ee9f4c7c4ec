"""NodeStore: worker nodes in SQL (the ``nodes`` table), and the honor they earn for being online.

A node is known by its owner and its name: the same account registering the same name again
gets the same id (a uuid5 of both), so a restarted or reinstalled machine keeps its history and
two replicas registering it at once cannot create two rows.

Online honor is paid in whole intervals, in the transaction that records the node being seen:
``rewarded_until`` is where the paid time ends, and the update that moves it forward is guarded
by its old value (``WHERE rewarded_until = :old``), so two API replicas seeing the same node at
the same moment never pay the same interval twice. A node not heard from for
``offline_after_s`` was offline: the time since its last sighting is not paid, and payment
starts afresh when it is seen again.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, case, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from dan.accounts.store import HonorReason
from dan.db.tables import accounts, honor_grants, nodes

Clock = Callable[[], float]
NODE_NAMESPACE = uuid.UUID("5b0f6f43-3c4e-4d0c-9a57-3f1e8f0c2d11")


@dataclass(frozen=True)
class NodeRecord:
    """A node as stored. Times are UNIX seconds; ``online`` is computed when read."""

    id: str
    account: str
    name: str
    capabilities: dict[str, Any]
    installed: frozenset[str]
    loaded: frozenset[str]
    pull: tuple[str, ...]
    tasks_done: int
    registered_at: float
    last_seen_at: float
    rewarded_until: float
    online: bool


@dataclass(frozen=True)
class PublicNode:
    """What anyone may know of a node: never its owner's email or what it has installed."""

    id: str
    owner: str  # the owner's nickname
    name: str
    tasks_done: int
    online: bool


def node_id_for(account: str, name: str) -> str:
    """The id of the node ``name`` of ``account`` (stable across registrations)."""
    return str(uuid.uuid5(NODE_NAMESPACE, f"{account}\x00{name}"))


class NodeStore(Protocol):
    """The nodes' persistence seam (see SqlNodeStore for the contract of each method)."""

    def register(
        self,
        account: str,
        name: str,
        capabilities: dict[str, Any],
        installed: Iterable[str],
        loaded: Iterable[str],
        *,
        honor_per_interval: float = 0.0,
    ) -> str: ...

    def seen(
        self,
        node_id: str,
        *,
        loaded: Iterable[str] | None = None,
        honor_per_interval: float = 0.0,
    ) -> NodeRecord | None: ...

    def mark_offline(self, node_id: str) -> None: ...

    def get(self, node_id: str) -> NodeRecord | None: ...

    def list_for(self, account: str) -> list[NodeRecord]: ...

    def list_online(self) -> list[NodeRecord]: ...

    def list_public(self) -> list[PublicNode]: ...

    def request_pull(self, node_id: str, catalog_name: str) -> tuple[str, ...] | None: ...

    def take_pulls(self, node_id: str) -> tuple[str, ...]: ...


class SqlNodeStore:
    """Nodes on SQLAlchemy Core. Every method is one short transaction; thread-safe."""

    def __init__(
        self,
        engine: Engine,
        *,
        offline_after_s: float,
        online_interval_s: float,
        clock: Clock = time.time,
    ) -> None:
        self._engine = engine
        self._offline_after_s = offline_after_s
        self._interval_s = online_interval_s
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    # -- registration and sightings ----------------------------------------------------------
    def register(
        self,
        account: str,
        name: str,
        capabilities: dict[str, Any],
        installed: Iterable[str],
        loaded: Iterable[str],
        *,
        honor_per_interval: float = 0.0,
    ) -> str:
        """Create the node, or update the one ``account`` registered as ``name`` before (its
        online time is settled as by :meth:`seen`); returns its id."""
        node_id = node_id_for(account, name)
        described = {
            "capabilities": capabilities,
            "installed": sorted(set(installed)),
            "loaded": sorted(set(loaded)),
        }
        for _ in range(2):
            if self._seen(node_id, described, honor_per_interval) is not None:
                return node_id
            try:
                with self._engine.begin() as conn:
                    row = {**self._new_row(node_id, account, name), **described}
                    conn.execute(nodes.insert().values(**row))
                return node_id
            except IntegrityError:
                continue  # registered at the same moment elsewhere: update that row instead
        raise RuntimeError(f"could not register node {name!r} of {account!r}")

    def seen(
        self,
        node_id: str,
        *,
        loaded: Iterable[str] | None = None,
        honor_per_interval: float = 0.0,
    ) -> NodeRecord | None:
        """Record that the node is alive now (with the checkpoints it has ``loaded``, if
        given) and pay its owner ``honor_per_interval`` for each whole online interval since
        the last payment. None if there is no such node."""
        values = {} if loaded is None else {"loaded": sorted(set(loaded))}
        return self._seen(node_id, values, honor_per_interval)

    def mark_offline(self, node_id: str) -> None:
        """The node said it stops: it counts as offline from now (its last sighting is moved
        just past the offline limit; online time not yet paid is forfeited)."""
        cutoff = self._clock() - self._offline_after_s - 1.0
        with self._engine.begin() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.last_seen_at > cutoff)
                .values(last_seen_at=cutoff)
            )

    # -- reads -------------------------------------------------------------------------------
    def get(self, node_id: str) -> NodeRecord | None:
        with self._read() as conn:
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().first()
        return None if row is None else self._record(row)

    def list_for(self, account: str) -> list[NodeRecord]:
        """The nodes of ``account``, by name."""
        query = select(nodes).where(nodes.c.account == account).order_by(nodes.c.name)
        with self._read() as conn:
            return [self._record(row) for row in conn.execute(query).mappings()]

    def list_online(self) -> list[NodeRecord]:
        """The nodes seen within ``offline_after_s``, by id."""
        since = self._clock() - self._offline_after_s
        query = select(nodes).where(nodes.c.last_seen_at >= since).order_by(nodes.c.id)
        with self._read() as conn:
            return [self._record(row) for row in conn.execute(query).mappings()]

    def list_public(self) -> list[PublicNode]:
        """Every node with its owner's nickname: online ones first, then by tasks done."""
        nickname = case((accounts.c.nickname.is_(None), nodes.c.account), else_=accounts.c.nickname)
        query = (
            select(nodes, nickname.label("owner"))
            .join_from(nodes, accounts, nodes.c.account == accounts.c.id, isouter=True)
            .order_by(nodes.c.tasks_done.desc(), nodes.c.name, nodes.c.id)
        )
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        listed = [
            PublicNode(row["id"], row["owner"], row["name"], row["tasks_done"], self._online(row))
            for row in rows
        ]
        return sorted(listed, key=lambda node: not node.online)

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
    def _seen(
        self, node_id: str, values: dict[str, Any], honor_per_interval: float
    ) -> NodeRecord | None:
        now = self._clock()
        with self._engine.begin() as conn:
            row = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().first()
            if row is None:
                return None
            intervals, until = self._settle(row, now)
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
            elif intervals and honor_per_interval > 0:
                self._grant(conn, row, intervals, honor_per_interval, now)
            fresh = conn.execute(select(nodes).where(nodes.c.id == node_id)).mappings().one()
            return self._record(fresh)

    def _settle(self, row: RowMapping, now: float) -> tuple[int, float]:
        """Whole intervals to pay, and the new ``rewarded_until``."""
        paid_until, last_seen = row["rewarded_until"], row["last_seen_at"]
        was_offline = now - last_seen > self._offline_after_s
        online_until = last_seen if was_offline else now
        intervals = max(0, math.floor((online_until - paid_until) / self._interval_s))
        if was_offline:
            return intervals, max(now, paid_until)
        return intervals, paid_until + intervals * self._interval_s

    def _grant(
        self, conn: Connection, row: RowMapping, intervals: int, amount: float, now: float
    ) -> None:
        conn.execute(
            honor_grants.insert().values(
                account=row["account"],
                amount=intervals * amount,
                reason=HonorReason.ONLINE.value,
                node_id=row["id"],
                note=f"{intervals} x {self._interval_s:g} s online",
                created_at=now,
            )
        )

    def _pulls(self, conn: Connection, node_id: str) -> tuple[str, ...] | None:
        query = select(nodes.c.pull).where(nodes.c.id == node_id)
        if self._postgres:
            query = query.with_for_update()
        pull = conn.execute(query).scalar_one_or_none()
        return None if pull is None else tuple(pull)

    def _new_row(self, node_id: str, account: str, name: str) -> dict[str, Any]:
        now = self._clock()
        return {
            "id": node_id,
            "account": account,
            "name": name,
            "pull": [],
            "tasks_done": 0,
            "registered_at": now,
            "last_seen_at": now,
            "rewarded_until": now,
        }

    def _online(self, row: RowMapping) -> bool:
        return bool(self._clock() - row["last_seen_at"] <= self._offline_after_s)

    def _record(self, row: RowMapping) -> NodeRecord:
        return NodeRecord(
            id=row["id"],
            account=row["account"],
            name=row["name"],
            capabilities=dict(row["capabilities"] or {}),
            installed=frozenset(row["installed"] or ()),
            loaded=frozenset(row["loaded"] or ()),
            pull=tuple(row["pull"] or ()),
            tasks_done=row["tasks_done"],
            registered_at=row["registered_at"],
            last_seen_at=row["last_seen_at"],
            rewarded_until=row["rewarded_until"],
            online=self._online(row),
        )

    def _read(self) -> Connection:
        return self._engine.connect().execution_options(dan_read_only=True)
