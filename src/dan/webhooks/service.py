"""WebhookService: the rules of webhooks (which URLs, which secret, when to retry)."""

from __future__ import annotations

from dataclasses import dataclass

from dan.config import Settings
from dan.domain import PUBLIC_ACCOUNT
from dan.errors import InvalidArgument, PermissionDenied
from dan.webhooks.addresses import (
    RefusedAddress,
    Unresolvable,
    check_addresses,
    parse_callback_url,
    port_of,
    resolve,
)
from dan.webhooks.store import Delivery, WebhookState, WebhookStore

RETRY_FACTOR = 3  # each retry waits this many times longer than the one before
BATCH = 16  # tries one sender claims (and sends concurrently) at once
LEASE_MARGIN_S = 30.0  # beyond a try's own time limits, before another sender may take it
FIELD = "callback_url"
SHARED_ACCOUNT = (
    "the public account is shared by everyone who uses the public key, so it has no webhook "
    "secret of its own; use an API key of your own account"
)


@dataclass(frozen=True)
class Failure:
    """Why a try failed; ``final`` when no later try can succeed (the address is refused)."""

    error: str
    final: bool = False


class WebhookService:
    """Checks callback URLs, keeps the accounts' secrets, and schedules the tries."""

    def __init__(self, store: WebhookStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    @property
    def allow_private(self) -> bool:
        return self._settings.webhook_allow_private

    @property
    def timeout_s(self) -> float:
        return self._settings.webhook_timeout_s

    @property
    def poll_s(self) -> float:
        return self._settings.webhook_poll_s

    def check_callback(self, account: str, url: str) -> str:
        """``url`` if ``account`` may have its task's webhook sent there; InvalidArgument
        (naming callback_url) if it is no http(s) URL, its host does not resolve, or (unless
        webhook_allow_private) it resolves to an address that is not public; PermissionDenied
        for the shared public account. Resolves the host (blocking)."""
        if account == PUBLIC_ACCOUNT:
            raise PermissionDenied(f"{FIELD} is refused: {SHARED_ACCOUNT}")
        try:
            parsed = parse_callback_url(url)
            addresses = resolve(parsed.host, port_of(parsed))
            check_addresses(parsed.host, addresses, allow_private=self.allow_private)
        except (ValueError, Unresolvable, RefusedAddress) as exc:
            raise InvalidArgument(f"Invalid {FIELD}: {exc}") from exc
        return url

    def secret(self, account: str) -> str:
        """The account's webhook secret (made on first use)."""
        self._check_own(account)
        return self._store.secret(account)

    def rotate_secret(self, account: str) -> str:
        """A new secret for the account: webhooks sent from now on are signed with it."""
        self._check_own(account)
        return self._store.rotate_secret(account)

    def state(self, task_id: str) -> WebhookState | None:
        return self._store.state(task_id)

    def claim(self) -> list[Delivery]:
        """Due tries for this process to send (see WebhookStore.claim_due)."""
        lease = 2 * self.timeout_s + LEASE_MARGIN_S  # resolving, then sending
        return self._store.claim_due(limit=BATCH, lease_s=lease)

    def signing_secret(self, delivery: Delivery) -> str:
        return self._store.secret(delivery.account)

    def record(self, delivery: Delivery, failure: Failure | None) -> None:
        """Record a try: delivered, retried later, or given up after the last try."""
        if failure is None:
            self._store.delivered(delivery)
        elif failure.final or delivery.attempt >= self._settings.webhook_max_attempts:
            self._store.give_up(delivery, failure.error)
        else:
            self._store.retry(delivery, failure.error, after_s=self.retry_delay(delivery.attempt))

    def retry_delay(self, attempt: int) -> float:
        """How long after try ``attempt`` failed the next one starts: webhook_retry_s, then
        three times longer each time."""
        return float(self._settings.webhook_retry_s * RETRY_FACTOR ** (attempt - 1))

    @staticmethod
    def _check_own(account: str) -> None:
        if account == PUBLIC_ACCOUNT:
            raise PermissionDenied(SHARED_ACCOUNT)
