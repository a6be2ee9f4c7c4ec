"""Whose nodes the server trusts: the local worker's (the operator's own machine) and admins'.

A trusted node's results are never checked, so it never passes checks either: it is past its
probation from the start (task honor paid at once, online honor earned, an established vote on
a file's family). One definition here, in Python and in SQL, so that checks, honor and the
family vote never disagree about who is trusted.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, or_

from dan.db.tables import accounts, nodes
from dan.domain import LOCAL_ACCOUNT


def trusted(account_id: str | None, is_admin: bool) -> bool:
    """Whether nodes of the account ``account_id`` (an admin or not) are trusted."""
    return account_id == LOCAL_ACCOUNT or is_admin


def trusted_node() -> ColumnElement[bool]:
    """SQL, over ``nodes`` joined with its owner's ``accounts`` row: the node is trusted."""
    return or_(nodes.c.account == LOCAL_ACCOUNT, accounts.c.is_admin.is_(True))
