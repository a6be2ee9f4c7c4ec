"""What nodes have installed, as rows of ``node_files``: written at registration, queried by
name, hash or prefix for the API's resolution of model names (dan.nodes.models)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Select, delete, func, insert, select

from dan.db.tables import node_families, node_files, nodes
from dan.domain import ModelFamily, ModelKind
from dan.nodes.base import NodeFile

INSERT_BATCH = 2000


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
    number of holders, most held first."""
    f = node_files
    holders = func.count(func.distinct(f.c.node_id)).label("holders")
    query = (
        select(
            f.c.sha256,
            f.c.name,
            f.c.file,
            func.max(f.c.size).label("size"),
            func.max(f.c.family).label("family"),  # "sdxl" over "sd15" if nodes disagree
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
