"""Webhooks: when a task that was submitted with a ``callback_url`` ends (success, failure or
cancellation), DAN POSTs its final status there, signed with the account's webhook secret.

``addresses`` is the SSRF guard (which URLs may be called); ``signing`` the signature a
receiver checks; ``store`` the webhook rows (written with their task) and the secrets in SQL;
``service`` the rules (URL checks, secrets, the retry schedule); ``sender`` the loop every API
process runs, which claims due webhooks in SQL and POSTs them.
"""

from dan.webhooks.service import Failure, WebhookService
from dan.webhooks.store import Delivery, SqlWebhookStore, WebhookState, WebhookStore

__all__ = [
    "Delivery",
    "Failure",
    "SqlWebhookStore",
    "WebhookService",
    "WebhookState",
    "WebhookStore",
]
