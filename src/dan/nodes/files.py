"""What nodes have installed, as rows of ``node_files``: written at registration, queried by
name, hash or prefix for the API's resolution of model names (dan.nodes.models).

The family of a file is a vote of the accounts whose online, unsuspected nodes hold it (each
node reads it from the file's header): one node must not decide it for everyone, or it could
say an SD 1.x checkpoint is SDXL and hide it from SD 1.x cards. An account has one vote however
many nodes it runs, because nodes cost nothing (any name registers one, up to
``max_nodes_per_account``), while only an admin can let an account run nodes. Its vote is what
most of its nodes read: those past their probation (dan.nodes.honor: checked, or trusted by the
operator) if it has any, and it then votes as established; else its nodes on probation. Accounts
voting as established outvote the others, which vote only where no established account says. A
tie, among an account's nodes or among accounts, goes to the family that asks more of a node
(SDXL): an SD 1.x file sent as SDXL work still runs, on a bigger card, while an SDXL file sent
as SD 1.x work reaches cards without the memory for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Select, case, delete, func, insert, select

from dan.db.tables import node_families, node_files, nodes
from dan.domain import ModelFamily, ModelKind
from dan.nodes.base import NetworkFile, NodeFile
from dan.nodes.honor import established, with_owner

INSERT_BATCH = 2000
CAUTIOUS_FIRST = (ModelFamily.SDXL, ModelFamily.SD15)  # a tied vote goes to the first
# Votes for each family: (established voters, all voters).
Tally = dict[ModelFamily, tuple[int, int]]


def replace_files(conn: Connection, node_id: str, files: Sequence[NodeFile]) -> None:
    """The node's files become ``files`` (one row per sha256)."""
    conn.execute(delete(node_files).where(node_files.c.node_id == node_id))
    rows = [_row(node_id, f) for f in {f.sha256: f for f in files}.values()]
    for start in range(0, len(rows), INSERT_BATCH):
        conn.execute(insert(node_files), rows[start : start + INSERT_BATCH])


def replace_families(
    conn: Connection, node_id: str, families: Iterable[ModelFamily] | None
) -> None:
    """The node runs ``families`` from now; None (a node from before families, which does
    not say) means SD 1.x only, what every node ran then."""
    chosen = {ModelFamily.SD15} if families is None else set(families)
    conn.execute(delete(node_families).where(node_families.c.node_id == node_id))
    rows = [{"node_id": node_id, "family": family.value} for family in sorted(chosen)]
    if rows:
        conn.execute(insert(node_families), rows)


def account_files(conn: Connection, account: str, *, besides: str) -> int:
    """How many files the account's nodes other than ``besides`` have."""
    query = (
        select(func.count())
        .select_from(node_files.join(nodes, nodes.c.id == node_files.c.node_id))
        .where(nodes.c.account == account, nodes.c.id != besides)
    )
    return int(conn.execute(query).scalar_one())


def network_files(
    conn: Connection,
    kind: ModelKind,
    online_since: float,
    probation_checks: int,
    limit: int,
    **found: str | None,
) -> list[NetworkFile]:
    """At most ``limit`` rows of :func:`described_files` (``found``: its filters), each with
    the family its holders agree on (:func:`agreed_families`)."""
    query = described_files(kind, online_since, **found)
    rows = conn.execute(query.limit(limit)).all()
    shas = {row.sha256 for row in rows}
    families = agreed_families(conn, kind, online_since, shas, probation_checks=probation_checks)
    return [
        NetworkFile(kind, r.sha256, r.name, r.file, r.size or 0, r.holders, families.get(r.sha256))
        for r in rows
    ]


def described_files(
    kind: ModelKind,
    online_since: float,
    *,
    sha256: str | None = None,
    key: str | None = None,
    prefix: str | None = None,
) -> Select[Any]:
    """The described files of ``kind`` on nodes seen since ``online_since`` and not suspect:
    with that sha256, a model or file name whose casefold is ``key``, or a sha256 starting
    with ``prefix`` (all of them without a filter); one row per (sha256, name, file) with its
    number of holders, most held first. Their family is :func:`agreed_families`' to ask."""
    f = node_files
    holders = func.count(func.distinct(f.c.node_id)).label("holders")
    query = (
        select(
            f.c.sha256,
            f.c.name,
            f.c.file,
            func.max(f.c.size).label("size"),
            holders,
        )
        .join(nodes, nodes.c.id == f.c.node_id)
        .where(
            f.c.kind == kind.value,
            nodes.c.last_seen_at >= online_since,
            nodes.c.suspect_since.is_(None),
        )
        .group_by(f.c.sha256, f.c.name, f.c.file)
        .order_by(holders.desc(), f.c.sha256, f.c.name)
    )
    if sha256 is not None:
        query = query.where(f.c.sha256 == sha256)
    if key is not None:
        query = query.where((f.c.name_key == key) | (f.c.file_key == key))
    if prefix is not None:
        query = query.where(f.c.sha256.startswith(prefix, autoescape=True))
    return query


def agreed_families(
    conn: Connection,
    kind: ModelKind,
    online_since: float,
    sha256s: Iterable[str],
    *,
    probation_checks: int,
) -> dict[str, ModelFamily]:
    """The family of each of ``sha256s`` (files of ``kind``) as the accounts of its online,
    unsuspected holders vote (see the module docstring); absent where none of them read one."""
    f = node_files
    settled = func.sum(case((established(probation_checks), 1), else_=0))
    query = with_owner(
        select(
            f.c.sha256,
            nodes.c.account,
            f.c.family,
            settled.label("settled"),
            func.count().label("holders"),
        ).join(nodes, nodes.c.id == f.c.node_id)
    ).where(
        f.c.kind == kind.value,
        f.c.sha256.in_(sorted(set(sha256s))),
        f.c.family.is_not(None),
        nodes.c.last_seen_at >= online_since,
        nodes.c.suspect_since.is_(None),
    )
    ballots: dict[str, dict[str, Tally]] = {}  # by sha256, then by account
    for row in conn.execute(query.group_by(f.c.sha256, nodes.c.account, f.c.family)):
        family = _known(row.family)
        if family is not None:
            tally = ballots.setdefault(row.sha256, {}).setdefault(row.account, {})
            tally[family] = (int(row.settled), int(row.holders))
    return {sha256: _winner(_by_account(by_account)) for sha256, by_account in ballots.items()}


def _by_account(ballots: dict[str, Tally]) -> Tally:
    """One vote per account, from each account's tally of its nodes: the family its nodes
    elect (:func:`_winner`), established if any of them is."""
    tally: Tally = {}
    for nodes_tally in ballots.values():
        family = _winner(nodes_tally)
        settled, holders = tally.get(family, (0, 0))
        tally[family] = (settled + int(_any_settled(nodes_tally)), holders + 1)
    return tally


def _winner(tally: Tally) -> ModelFamily:
    """Most established voters; only where there are none, most voters on probation; on a
    tie, the first of CAUTIOUS_FIRST."""
    standing = 0 if _any_settled(tally) else 1
    most = max(counts[standing] for counts in tally.values())
    tied = {family for family, counts in tally.items() if counts[standing] == most}
    return min(tied, key=_caution)


def _any_settled(tally: Tally) -> bool:
    return any(settled for settled, _ in tally.values())


def _caution(family: ModelFamily) -> int:
    return CAUTIOUS_FIRST.index(family) if family in CAUTIOUS_FIRST else len(CAUTIOUS_FIRST)


def _known(value: str) -> ModelFamily | None:
    try:
        return ModelFamily(value)
    except ValueError:
        return None  # a family this server does not know (a newer node's) does not vote


def _row(node_id: str, file: NodeFile) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "sha256": file.sha256,
        "kind": file.kind.value if file.kind else None,
        "name": file.name,
        "file": file.file,
        "size": file.size,
        "name_key": file.name.casefold() if file.name else None,
        "file_key": file.file.casefold() if file.file else None,
        "family": file.family.value if file.family else None,
    }
