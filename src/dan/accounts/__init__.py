"""Accounts: who calls the API, their hashed API keys, and the honor ledger.

``AccountStore`` (SQL) keeps accounts, keys (sha256 only) and honor grants; ``AccountService``
holds the rules: authentication, key management, admin grants, the donor leaderboard and the
queue weight that honor buys.
"""

from dan.accounts.service import AccountService, queue_weight
from dan.accounts.store import (
    AccountStore,
    ApiKey,
    HonorReason,
    LeaderboardEntry,
    NewKey,
    SqlAccountStore,
)

__all__ = [
    "AccountService",
    "AccountStore",
    "ApiKey",
    "HonorReason",
    "LeaderboardEntry",
    "NewKey",
    "SqlAccountStore",
    "queue_weight",
]
