"""Accounts: who calls the API, their hashed API keys, and the honor ledger.

``AccountStore`` (SQL) keeps accounts, keys (sha256 only) and honor grants; ``AccountService``
holds the rules: authentication, key management, admin grants, the donor leaderboard and the
queue weight that honor buys. ``SignInService`` makes the accounts people create by signing in
(identities in ``IdentityStore``) and their web keys.
"""

from dan.accounts.identities import IdentityStore, SqlIdentityStore
from dan.accounts.service import AccountService, queue_weight
from dan.accounts.signin import Identity, SignIn, SignInService
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
    "Identity",
    "IdentityStore",
    "LeaderboardEntry",
    "NewKey",
    "SignIn",
    "SignInService",
    "SqlAccountStore",
    "SqlIdentityStore",
    "queue_weight",
]
