"""SignInService: accounts that people make themselves by signing in with GitHub or an OpenID
Connect provider, and the API key each gets (and rotates) through the web page.

The first sign-in of a subject creates an account with the signup honor, named after what the
provider calls the person (``preferred_username``, GitHub's ``login``, the local part of the
email), made unique with a suffix ("alice", "alice-2", ...). Later sign-ins of that subject find
the same account. Subjects are unique only within a provider, so identities are stored under
the provider's namespace: its issuer URL (GitHub's web address), not the name of a setting, so
pointing ``DAN_OIDC_ISSUER`` at another provider never signs its users into the old one's
accounts.

Keys made here (``issue_key``) have ids starting with ``SIGN_IN_KEY_TAG``; making one revokes
the account's earlier ones, never the keys an admin made with ``dan keys create``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import secrets
from collections.abc import Iterable, Iterator

from dan.accounts.identities import IdentityStore
from dan.accounts.service import ANONYMOUS_PREFIX, BUILT_IN_ACCOUNTS, NICKNAME
from dan.accounts.store import AccountStore, NewKey
from dan.config import Settings
from dan.domain import Account
from dan.errors import InvalidArgument, PermissionDenied

SIGN_IN_KEY_ORIGIN = "web"  # api_keys.origin of the keys signed-in people make
FALLBACK_NICKNAME = "user"
NICKNAME_BASE_CHARS = 56  # leaves room for a suffix within the 64 characters of a nickname
NUMBERED_TRIES = 20  # "alice-2" ... "alice-20", then random suffixes
MAX_TRIES = 50
MAX_NAMESPACE_CHARS = 64  # identities.provider
MAX_SUBJECT_CHARS = 255  # identities.subject


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a provider says signed in: ``subject`` within ``namespace`` (see
    ``provider_namespace``), and names for a new account's nickname, best first."""

    namespace: str
    subject: str
    names: tuple[str | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class SignIn:
    """The account signed in to, and whether this sign-in created it."""

    account: Account
    created: bool


def provider_namespace(url: str) -> str:
    """The key under which a provider's subjects are stored: its URL without a trailing slash,
    or, when that is too long for the column, "sha256:" and (most of) the URL's digest."""
    url = url.rstrip("/")
    if len(url) <= MAX_NAMESPACE_CHARS:
        return url
    return "sha256:" + hashlib.sha256(url.encode()).hexdigest()[: MAX_NAMESPACE_CHARS - 7]


def nickname_base(names: Iterable[str | None]) -> str:
    """The first of ``names`` that makes a usable nickname (an email counts by its local part;
    other characters become "-"), or "user"."""
    for name in names:
        if not name:
            continue
        local = name.split("@", 1)[0]
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", local).lstrip("_.-")[:NICKNAME_BASE_CHARS]
        base = base.rstrip("_.-")
        if NICKNAME.fullmatch(base) and not _reserved(base):
            return base
    return FALLBACK_NICKNAME


def nickname_candidates(base: str) -> Iterator[str]:
    """``base``, then ``base-2`` ... ``base-20``, then ``base-`` and six random hex digits."""
    yield base
    for number in range(2, NUMBERED_TRIES + 1):
        yield f"{base}-{number}"
    while True:
        yield f"{base}-{secrets.token_hex(3)}"


class SignInService:
    """Sign-in accounts and their keys, over the account and identity stores."""

    def __init__(self, accounts: AccountStore, identities: IdentityStore, settings: Settings):
        self._accounts = accounts
        self._identities = identities
        self._settings = settings

    def sign_in(self, identity: Identity) -> SignIn:
        """The account of ``identity``, created (with the signup honor) on its first sign-in.
        InvalidArgument if the provider's subject is empty or too long."""
        if not identity.subject or len(identity.subject) > MAX_SUBJECT_CHARS:
            raise InvalidArgument(
                f"the sign-in provider gave a subject of {len(identity.subject)} characters; "
                f"it must have 1 to {MAX_SUBJECT_CHARS}"
            )
        known = self._identities.account_of(identity.namespace, identity.subject)
        if known is not None:
            return SignIn(self.session_account(known), created=False)
        account_id = self._create(identity)
        return SignIn(self.session_account(account_id), created=True)

    def session_account(self, account_id: str) -> Account:
        """The account a sign-in session belongs to; PermissionDenied if it no longer exists."""
        account = self._accounts.get(account_id)
        if account is None:
            raise PermissionDenied("the account of this session no longer exists; sign in again")
        return account

    def issue_key(self, account: Account) -> NewKey:
        """A new API key for a signed-in ``account`` (shown once); the keys made here before
        for it are revoked, the keys an admin made are kept. TooManyKeys if those leave no
        room under ``max_keys_per_account``."""
        return self._accounts.add_key(
            account.id,
            max_active=self._settings.max_keys_per_account,
            origin=SIGN_IN_KEY_ORIGIN,
        )

    def _create(self, identity: Identity) -> str:
        honor = self._settings.signup_honor
        candidates = nickname_candidates(nickname_base(identity.names))
        for nickname in itertools.islice(candidates, MAX_TRIES):
            try:
                return self._identities.create_account(
                    identity.namespace, identity.subject, nickname, signup_honor=honor
                )
            except InvalidArgument:  # the nickname is taken: try the next
                continue
        raise InvalidArgument(f"found no free nickname in {MAX_TRIES} tries; sign in again")


def _reserved(nickname: str) -> bool:
    return nickname.startswith(ANONYMOUS_PREFIX) or nickname in BUILT_IN_ACCOUNTS.values()
