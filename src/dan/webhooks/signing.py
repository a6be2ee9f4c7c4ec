"""Webhook signatures: an HMAC-SHA256, keyed with the account's webhook secret, of the
timestamp, a dot and the raw body, so a receiver can tell a webhook came from this server, was
not altered, and is not an old one sent again (it refuses timestamps older than a few minutes).
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-DAN-Signature"  # "sha256=" + 64 hex digits
TIMESTAMP_HEADER = "X-DAN-Timestamp"  # UNIX seconds when this try was signed
TASK_HEADER = "X-DAN-Task-Id"
ATTEMPT_HEADER = "X-DAN-Attempt"  # 1 for the first try
SCHEME = "sha256="
TOLERANCE_S = 300.0


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-DAN-Signature`` value of ``body`` sent at ``timestamp``."""
    signed = f"{timestamp}.".encode() + body
    return SCHEME + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def verify(
    secret: str,
    body: bytes,
    *,
    timestamp: str,
    signed: str,
    now: float,
    tolerance_s: float = TOLERANCE_S,
) -> bool:
    """Whether ``signed`` (the signature header) signs ``body`` at ``timestamp`` (the
    timestamp header) with ``secret``, and ``timestamp`` is within ``tolerance_s`` of ``now``:
    what a receiver checks."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, int(timestamp), body), signed)


def signed_headers(
    secret: str, body: bytes, *, task_id: str, attempt: int, timestamp: int
) -> dict[str, str]:
    """The headers of one try of a webhook."""
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        TIMESTAMP_HEADER: str(timestamp),
        TASK_HEADER: task_id,
        ATTEMPT_HEADER: str(attempt),
    }
