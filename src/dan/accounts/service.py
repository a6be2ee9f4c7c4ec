"""AccountService: who a request is, what it may do, and how much its honor weighs.

Authentication rules (``authenticate``), in order:

0. Keys are required when the ``auth`` setting says so (``keys_required``), and also, with
   ``auth=auto``, for a request that came through a proxy or tunnel (it carries a header such as
   ``X-Forwarded-For``): the embedded server trusts its loopback address, but a reverse proxy or
   tunnel on the same machine makes every client on the internet arrive from loopback.
   ``auth=optional``, set by the operator, keeps keys optional even then.
1. No key: the built-in local account when keys are optional; PermissionDenied when required.
2. The public key, when the ``public_key`` setting is on: the built-in public account.
3. A stored, active key: its account, whatever the mode. A revoked key is always refused.
4. Any other key: when keys are optional, one of ``anonymous_lanes`` anonymous accounts (id and
   nickname "anon-" + the lane's number), chosen by the key's sha256, made on first use without
   a signup grant (so that inventing keys earns nothing). A client keeps its lane, so clients of
   a shared embedded server are served fairly unless their keys share a lane, and inventing keys
   can never add more than ``anonymous_lanes`` rows. When keys are required: PermissionDenied.

Accounts made by an older version for loose keys ("key-" + 16 hex digits) stay anonymous.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import re

from dan.accounts.store import AccountStore, ApiKey, HonorReason, LeaderboardEntry, NewKey
from dan.config import Settings
from dan.domain import LOCAL_ACCOUNT, PUBLIC_ACCOUNT, Account
from dan.errors import InvalidArgument, PermissionDenied

ANONYMOUS_PREFIX = "anon-"  # the id and nickname of an anonymous lane
LEGACY_ANONYMOUS_ID_PREFIX = "key-"  # an account per loose key, before lanes
BUILT_IN_ACCOUNTS: dict[str, str] = {LOCAL_ACCOUNT: "local", PUBLIC_ACCOUNT: "public"}
NICKNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_GRANT = 1_000_000.0
MAX_NOTE_CHARS = 1000
MAX_KEY_CHARS = 512
MAX_LEADERBOARD = 100

# The queue weight (see ``queue_weight``).
PUBLIC_WEIGHT = 0.25
HONOR_SCALE = 10.0

HOW_TO_SEND = (
    "send it as 'Authorization: Bearer sk-...' (an admin creates keys with `dan keys create`)"
)
NO_KEY = f"this server needs an API key: {HOW_TO_SEND}"


def queue_weight(account: Account) -> float:
    """How strongly the queue favours ``account``'s tasks (1 is a plain account's share).

    ``1 + ln(1 + honor / 10)``, with negative honor counted as 0; the public account gets
    0.25, below every other account. Honor helps with diminishing returns: 0 honor weighs 1,
    10 (the signup gift) 1.69, 100 weighs 3.40, 1000 weighs 5.62, so a hundred times the honor
    never buys a hundred times the share.
    """
    if account.id == PUBLIC_ACCOUNT:
        return PUBLIC_WEIGHT
    return 1.0 + math.log1p(max(account.honor, 0.0) / HONOR_SCALE)


def anonymous_lane(key: str, lanes: int) -> str:
    """The id (and nickname) of the anonymous account an unknown key joins when keys are
    optional: one of ``lanes``, always the same for the same key."""
    digest = hashlib.sha256(key.encode()).digest()
    return f"{ANONYMOUS_PREFIX}{int.from_bytes(digest[:8], 'big') % lanes}"


def is_registered(account: Account) -> bool:
    """Whether the account was created by an admin (not built in, not an anonymous lane)."""
    anonymous = (ANONYMOUS_PREFIX, LEGACY_ANONYMOUS_ID_PREFIX)
    return account.id not in BUILT_IN_ACCOUNTS and not account.id.startswith(anonymous)


@dataclasses.dataclass(frozen=True)
class IssuedKey:
    """What ``issue_key`` did: the account (``created`` if it is new) and its new key."""

    account: Account
    key: NewKey
    created: bool


class AccountService:
    """Accounts, keys and honor; ``public_key`` is the public key's text (None: none here)."""

    def __init__(
        self, store: AccountStore, settings: Settings, *, public_key: str | None = None
    ) -> None:
        self._store = store
        self._settings = settings
        self._public_key = public_key

    # -- who is calling ----------------------------------------------------------------------
    def authenticate(self, key: str | None, *, proxy_header: str | None = None) -> Account:
        """The caller's account by the rules in the module docstring; ``proxy_header`` names
        the header that shows the request came through a proxy (None: it came directly).
        PermissionDenied if the key is missing (keys required), unknown (keys required) or
        revoked."""
        why_required = self._why_keys_required(proxy_header)
        if key is None:
            if why_required is not None:
                raise PermissionDenied(f"no API key: {why_required}")
            return self._built_in(LOCAL_ACCOUNT)
        if self._is_public_key(key):
            return self._built_in(PUBLIC_ACCOUNT)
        if len(key) <= MAX_KEY_CHARS:
            account = self._store.find_by_key(key)
            if account is not None:
                return account
            if self._store.key_revoked(key):
                raise PermissionDenied("this API key was revoked; use another key")
        if why_required is not None:
            raise PermissionDenied(f"invalid API key: {why_required}")
        lane = anonymous_lane(key, self._settings.anonymous_lanes)
        return self._store.ensure_account(lane, lane)

    def key_id(self, key: str | None) -> str | None:
        """The id of ``key`` when it is a stored, active key (None for no key, an unknown or
        revoked key, or the public key): what per-key settings are kept under."""
        if key is None or len(key) > MAX_KEY_CHARS or self._is_public_key(key):
            return None
        return self._store.key_id(key)

    def public_api_key(self) -> str:
        """The key anonymous clients may use. With ``public_key`` off it is handed out only
        while keys are optional (it is then a key like any other); otherwise PermissionDenied."""
        if self._public_key is not None and (
            self._settings.public_key or not self._settings.keys_required
        ):
            return self._public_key
        raise PermissionDenied(
            "this server offers no public API key; ask its admin for a key of your own"
        )

    def queue_weight(self, account: Account) -> float:
        """See the module function ``queue_weight``."""
        return queue_weight(account)

    def weight_of(self, account_id: str) -> float:
        """The queue weight of the account ``account_id`` (1.0 for one not stored)."""
        account = self._store.get(account_id)
        return 1.0 if account is None else self.queue_weight(account)

    def ensure_built_in(self) -> None:
        """Make sure the local and public accounts exist (no signup grant for them)."""
        for account_id, nickname in BUILT_IN_ACCOUNTS.items():
            self._store.ensure_account(account_id, nickname)

    # -- accounts ----------------------------------------------------------------------------
    def find(self, *, account_id: str | None = None, nickname: str | None = None) -> Account:
        """The account named by exactly one of its id or its nickname; InvalidArgument if
        neither or both are given, or there is no such account."""
        if (account_id is None) == (nickname is None):
            raise InvalidArgument("name the account by exactly one of account (id) or nickname")
        account = (
            self._store.get(account_id)
            if account_id is not None
            else self._store.by_nickname(nickname or "")
        )
        if account is None:
            what = f"id {account_id!r}" if account_id is not None else f"nickname {nickname!r}"
            raise InvalidArgument(f"no account with {what}")
        return account

    def issue_key(
        self,
        nickname: str,
        *,
        email: str | None = None,
        is_admin: bool = False,
        can_run_nodes: bool = False,
    ) -> IssuedKey:
        """A new key for the account ``nickname``, created first (with the signup honor) if
        it does not exist. Roles asked for are added to an existing account, never removed
        (``set_roles`` removes them). TooManyKeys if the account has ``max_keys_per_account``
        active keys (then its roles are left as they were)."""
        existing = self._store.by_nickname(nickname)
        if existing is None:
            account = self._store.create_account(
                _check_nickname(nickname),
                _check_email(email),
                is_admin,
                can_run_nodes,
                signup_honor=self._settings.signup_honor,
            )
            return IssuedKey(account, self._add_key(account), created=True)
        self._check_registered(existing)
        key = self._add_key(existing)
        account = self._add_roles(existing, is_admin=is_admin, can_run_nodes=can_run_nodes)
        return IssuedKey(account, key, created=False)

    def set_roles(
        self, account: Account, *, is_admin: bool | None = None, can_run_nodes: bool | None = None
    ) -> Account:
        """Give (True) or take (False) the admin and node roles of ``account`` (None: keep);
        for admins and the operator. The account with its new roles; InvalidArgument if no
        role is named or it would take the admin role from the only admin (which would leave
        the network's admin endpoints to nobody); PermissionDenied for a built-in or anonymous
        account."""
        if is_admin is None and can_run_nodes is None:
            raise InvalidArgument("name a role to give or take: admin, nodes, or both")
        self._check_registered(account)
        updated = self._store.set_roles(account.id, is_admin=is_admin, can_run_nodes=can_run_nodes)
        if updated is None:  # deleted under us
            raise InvalidArgument(f"no account with id {account.id!r}")
        return updated

    # -- keys of one's own account -----------------------------------------------------------
    def create_key(self, account: Account) -> NewKey:
        """Another key for the caller's account (its text is in the result only);
        TooManyKeys if it has ``max_keys_per_account`` active keys."""
        self._check_registered(account)
        return self._add_key(account)

    def list_keys(self, account: Account) -> list[ApiKey]:
        """The caller's active keys."""
        return self._store.list_keys(account.id)

    def all_keys(self, nickname: str | None = None) -> list[ApiKey]:
        """Every key, revoked ones too, of every account or of ``nickname`` (for admins)."""
        if nickname is None:
            return self._store.list_keys(include_revoked=True)
        return self._store.list_keys(self.find(nickname=nickname).id, include_revoked=True)

    def revoke_key(self, account: Account | None, key_id: str) -> ApiKey:
        """Revoke one of ``account``'s keys (any key when None, for admins); InvalidArgument
        if it has no key ``key_id``."""
        revoked = self._store.revoke_key(None if account is None else account.id, key_id)
        if revoked is None:
            whose = "" if account is None else " of this account"
            raise InvalidArgument(f"no API key{whose} with id {key_id!r}")
        return revoked

    def revoke_keys(self, account: Account, *, keep_key: str | None = None) -> list[ApiKey]:
        """Revoke every active key of ``account`` but ``keep_key`` (the text of the key in
        use, when its holder asks; None when an admin does); the keys revoked. A key minted
        with a stolen key dies with it this way. PermissionDenied for an account that has no
        keys (built in or anonymous)."""
        self._check_registered(account)
        return self._store.revoke_keys(account.id, keep_key=keep_key)

    # -- honor -------------------------------------------------------------------------------
    def grant_honor(
        self, target: Account, amount: float, *, by: Account | None, note: str | None = None
    ) -> Account:
        """An admin's grant of ``amount`` (negative to correct a mistake) to ``target``;
        ``by`` None is the operator at the command line. Returns the target with its new
        honor; PermissionDenied unless ``by`` is an admin."""
        if by is not None and not by.is_admin:
            raise PermissionDenied("only an admin may grant honor")
        _check_amount(amount)
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise InvalidArgument(f"note must be at most {MAX_NOTE_CHARS} characters")
        honor = self._store.grant(
            target.id,
            amount,
            HonorReason.ADMIN,
            granted_by=None if by is None else by.id,
            note=note,
        )
        return dataclasses.replace(target, honor=honor)

    def leaderboard(self, limit: int = 20) -> list[LeaderboardEntry]:
        """Donors by the honor their nodes earned (tasks and time online)."""
        if not 1 <= limit <= MAX_LEADERBOARD:
            raise InvalidArgument(f"limit must be between 1 and {MAX_LEADERBOARD}, got {limit}")
        return self._store.leaderboard(limit)

    # -- helpers -----------------------------------------------------------------------------
    def _built_in(self, account_id: str) -> Account:
        account = self._store.get(account_id)
        if account is None:  # the database was reset under a running server
            account = self._store.ensure_account(account_id, BUILT_IN_ACCOUNTS[account_id])
        return account

    def _why_keys_required(self, proxy_header: str | None) -> str | None:
        """Why this request needs a key (for the error message), or None if it does not."""
        if self._settings.keys_required:
            return NO_KEY
        if proxy_header is not None and self._settings.auth == "auto":
            return (
                f"this request came through a proxy or tunnel (it has a {proxy_header} header), "
                "and keys are optional only for clients that connect to this machine directly; "
                f"{HOW_TO_SEND}"
            )
        return None

    def _add_key(self, account: Account) -> NewKey:
        return self._store.add_key(account.id, max_active=self._settings.max_keys_per_account)

    def _is_public_key(self, key: str) -> bool:
        if not self._settings.public_key or self._public_key is None:
            return False
        return hmac.compare_digest(key.encode(), self._public_key.encode())

    def _add_roles(self, account: Account, *, is_admin: bool, can_run_nodes: bool) -> Account:
        if (is_admin and not account.is_admin) or (can_run_nodes and not account.can_run_nodes):
            updated = self._store.set_roles(
                account.id, is_admin=is_admin or None, can_run_nodes=can_run_nodes or None
            )
            assert updated is not None
            return updated
        return account

    @staticmethod
    def _check_registered(account: Account) -> None:
        if not is_registered(account):
            raise PermissionDenied(
                f"the account {account.nickname!r} is built in or anonymous and has no keys "
                "or roles; only accounts an admin created (`dan keys create`) do"
            )


def _check_nickname(nickname: str) -> str:
    if not NICKNAME.fullmatch(nickname):
        raise InvalidArgument(
            "nickname must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit; got {nickname!r}"
        )
    if nickname.startswith(ANONYMOUS_PREFIX) or nickname in BUILT_IN_ACCOUNTS.values():
        raise InvalidArgument(
            f"the nickname {nickname!r} is reserved (names starting with "
            f"{ANONYMOUS_PREFIX!r} and {', '.join(BUILT_IN_ACCOUNTS.values())} are "
            "given to anonymous and built-in accounts)"
        )
    return nickname


def _check_email(email: str | None) -> str | None:
    if email is not None and (len(email) > 256 or not re.fullmatch(r"[^@\s]+@[^@\s]+", email)):
        raise InvalidArgument(f"email must look like name@example.org, got {email!r}")
    return email


def _check_amount(amount: float) -> None:
    if not (math.isfinite(amount) and amount != 0 and abs(amount) <= MAX_GRANT):
        raise InvalidArgument(
            f"amount must be a non-zero number between {-MAX_GRANT:g} and {MAX_GRANT:g}, "
            f"got {amount!r}"
        )
