"""The honor nodes earn: whole online intervals, and the escrow of a node on probation.

Online honor is paid in whole intervals, in the transaction that records the node being seen
(dan.nodes.registration): ``rewarded_until`` is where the paid time ends. A node not heard from for
``offline_after_s`` was offline: the time since its last sighting is not paid, and payment
starts afresh when it is seen again. Only a node that earns it is paid: not suspect, past its
probation (:func:`established`), with an accepted result for
another account within ``honor_window_s``, and among the first ``rewarded_nodes_per_account``
of its account paid in the interval; other intervals pass unpaid. Task honor a node on
probation earned waits in ``honor_escrow`` and moves into the ledger when the probation is
through (a failed check drops it).

A node is past its probation when ``probation_checks`` of its results were checked and found
right, or when the operator trusts it: the local worker's node and admins' nodes, whose results
are never checked (dan.nodes.service), so that their count of passed checks stays 0 for good.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, delete, func, or_, select
from sqlalchemy.engine import RowMapping

from dan.db.tables import accounts, honor_escrow, honor_grants, nodes
from dan.nodes.base import NodeRules
from dan.nodes.trust import trusted_node

ONLINE_REASON, TASK_REASON = "online", "task"


def with_owner(query: Select[Any]) -> Select[Any]:
    """``query`` (over ``nodes``) joined to each node's owner in ``accounts``, which
    :func:`established` reads; a node whose account has no row keeps its place."""
    return query.join(accounts, accounts.c.id == nodes.c.account, isouter=True)


def established(probation_checks: int) -> ColumnElement[bool]:
    """SQL, over :func:`with_owner`: the node is past its probation (module docstring)."""
    return or_(nodes.c.checks_passed >= probation_checks, trusted_node())


def past_probation(conn: Connection, node_id: str, probation_checks: int) -> bool:
    """Whether the node ``node_id`` is past its probation (False for no such node)."""
    query = with_owner(select(established(probation_checks)).select_from(nodes))
    return bool(conn.execute(query.where(nodes.c.id == node_id)).scalar_one_or_none())


def settle(row: RowMapping, now: float, rules: NodeRules) -> tuple[int, float]:
    """Whole intervals to pay the node ``row`` for, and its new ``rewarded_until``."""
    paid_until, last_seen = row["rewarded_until"], row["last_seen_at"]
    was_offline = now - last_seen > rules.offline_after_s
    online_until = last_seen if was_offline else now
    interval = rules.online_interval_s
    intervals = max(0, math.floor((online_until - paid_until) / interval))
    if was_offline:
        return intervals, max(now, paid_until)
    return intervals, paid_until + intervals * interval


def earns(conn: Connection, row: RowMapping, now: float, rules: NodeRules) -> bool:
    """Whether the node ``row`` earns online honor now (see the module docstring)."""
    if row["suspect_since"] is not None:
        return False
    if row["worked_at"] is None or row["worked_at"] < now - rules.honor_window_s:
        return False
    if not past_probation(conn, row["id"], rules.probation_checks):
        return False
    paid_nodes = conn.execute(
        select(func.count(func.distinct(honor_grants.c.node_id))).where(
            honor_grants.c.account == row["account"],
            honor_grants.c.reason == ONLINE_REASON,
            honor_grants.c.created_at >= now - rules.online_interval_s,
            honor_grants.c.node_id != row["id"],
        )
    ).scalar_one()
    return bool(paid_nodes < rules.rewarded_nodes_per_account)


def grant_online(
    conn: Connection, row: RowMapping, intervals: int, amount: float, now: float, interval_s: float
) -> None:
    conn.execute(
        honor_grants.insert().values(
            account=row["account"],
            amount=intervals * amount,
            reason=ONLINE_REASON,
            node_id=row["id"],
            note=f"{intervals} x {interval_s:g} s online",
            created_at=now,
        )
    )


def release_escrow(conn: Connection, node_id: str, now: float) -> None:
    """Move the node's escrowed task honor into the ledger."""
    held = conn.execute(
        delete(honor_escrow).where(honor_escrow.c.node_id == node_id).returning(*honor_escrow.c)
    ).all()
    if held:
        conn.execute(
            honor_grants.insert(),
            [
                {
                    "account": grant.account,
                    "amount": grant.amount,
                    "reason": TASK_REASON,
                    "task_id": grant.task_id,
                    "node_id": node_id,
                    "note": "held until the node's first results were checked",
                    "created_at": now,
                }
                for grant in held
            ],
        )
