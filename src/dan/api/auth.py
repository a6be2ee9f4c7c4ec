"""Who is calling. In the embedded single-user mode every key is accepted.

A key (``Authorization: Bearer sk-...`` or the bare key, as the original accepted) only
selects the account whose queue lane the task joins, so several clients of one server share
the GPU fairly. Accounts with stored, hashed keys come with the network mode.
"""

from __future__ import annotations

import hashlib

from fastapi import Request

LOCAL_ACCOUNT = "local"


def api_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "").strip()
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    return header or None


def account_of(request: Request) -> str:
    key = api_key(request)
    if key is None:
        return LOCAL_ACCOUNT
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
