"""WebhookSender: the loop in every API process that POSTs finished tasks' webhooks.

Each round claims up to a batch of due tries in SQL (dan.webhooks.store: replicas never send
one try twice at once), sends them concurrently, and records each outcome. One try:

1. build the body (the caller's ``body`` function: the task's status, as JSON bytes);
2. resolve the URL's host and check every address (dan.webhooks.addresses); a refused
   address ends the webhook at once, an unresolvable host is retried;
3. POST to the checked address, signed (dan.webhooks.signing), within the time limit, never
   following a redirect and reading no more of the answer than its status;
4. a 2xx answer is delivered; anything else is retried after a growing delay, until the
   last try (see WebhookService.record).

The loop sleeps ``webhook_poll_s`` between rounds, or less when :meth:`wake` is called (a task
finished: PostgreSQL's NOTIFY, see dan.api.app). Errors are logged; they never end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from dan import __version__
from dan.webhooks.addresses import (
    IPAddress,
    RefusedAddress,
    Target,
    Unresolvable,
    check_addresses,
    parse_callback_url,
    pinned,
    port_of,
    resolve_async,
)
from dan.webhooks.service import BATCH, Failure, WebhookService
from dan.webhooks.signing import signed_headers
from dan.webhooks.store import Delivery

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
USER_AGENT = f"DAN-Webhook/{__version__}"


class WebhookSender:
    """Sends the webhooks ``service`` claims; ``body(task_id)`` is what a try POSTs (it
    blocks: it runs in a thread)."""

    def __init__(
        self,
        service: WebhookService,
        body: Callable[[str], bytes],
        *,
        resolve: Resolver = resolve_async,
    ) -> None:
        self._service = service
        self._body = body
        self._resolve = resolve
        self._wakeup = asyncio.Event()

    def client(self) -> httpx.AsyncClient:
        """The HTTP client tries go through: no redirects, no proxies from the environment
        (a proxy would connect to the name, not to the checked address)."""
        return httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=self._service.timeout_s,
            headers={"User-Agent": USER_AGENT},
        )

    async def run(self) -> None:
        """Send due webhooks until cancelled."""
        async with self.client() as client:
            while True:
                self._wakeup.clear()
                try:
                    sent = await self.send_due(client)
                except Exception:
                    log.exception("webhooks: a round failed; will retry")
                    sent = 0
                if sent < BATCH:  # a full batch: more may be due at once
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._service.poll_s):
                            await self._wakeup.wait()

    def wake(self) -> None:
        """Look for due webhooks now (event-loop thread only)."""
        self._wakeup.set()

    async def send_due(self, client: httpx.AsyncClient) -> int:
        """One round: claim, send and record the due tries; how many there were."""
        claimed = await asyncio.to_thread(self._service.claim)
        await asyncio.gather(*(self._try(client, delivery) for delivery in claimed))
        return len(claimed)

    async def _try(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        try:
            failure = await self._send(client, delivery)
        except Exception as exc:  # a bug or the database: retried like a failed answer
            log.exception("webhooks: the try of task %s failed", delivery.task_id)
            failure = Failure(f"the try failed on the server: {type(exc).__name__}")
        if failure is not None:
            log.info("webhook of task %s, try %d: %s", *_ids(delivery), failure.error)
        await asyncio.to_thread(self._service.record, delivery, failure)

    async def _send(self, client: httpx.AsyncClient, delivery: Delivery) -> Failure | None:
        body = await asyncio.to_thread(self._body, delivery.task_id)
        secret = await asyncio.to_thread(self._service.signing_secret, delivery)
        try:
            target = await self._target(delivery.url)
        except RefusedAddress as exc:
            return Failure(f"not sent: {exc}", final=True)
        except (Unresolvable, TimeoutError) as exc:
            return Failure(f"not sent: {str(exc) or 'resolving the host took too long'}")
        headers = signed_headers(
            secret,
            body,
            task_id=delivery.task_id,
            attempt=delivery.attempt,
            timestamp=int(time.time()),
        )
        return await _post(client, target, body, headers, self._service.timeout_s)

    async def _target(self, url: str) -> Target:
        """Where ``url`` may be sent now; RefusedAddress or Unresolvable if nowhere."""
        parsed = parse_callback_url(url)
        async with asyncio.timeout(self._service.timeout_s):
            addresses = await self._resolve(parsed.host, port_of(parsed))
        allow = self._service.allow_private
        check_addresses(parsed.host, addresses, allow_private=allow)
        return pinned(parsed, addresses[0])


async def _post(
    client: httpx.AsyncClient,
    target: Target,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
) -> Failure | None:
    """POST one try; None if it was answered with a 2xx within ``timeout_s`` in all (httpx's
    own limits are per step: a server trickling its answer would outlast them)."""
    request = client.build_request(
        "POST",
        target.url,
        content=body,
        headers={**headers, "Host": target.host_header},
        extensions=target.extensions,
    )
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.send(request, stream=True)  # its body is never read
            await response.aclose()
    except TimeoutError:
        return Failure(f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Failure(f"no answer: {type(exc).__name__}: {exc}".rstrip(": "))
    if response.is_success:
        return None
    if response.is_redirect:
        return Failure(f"answered HTTP {response.status_code}; redirects are not followed")
    return Failure(f"answered HTTP {response.status_code}")


def _ids(delivery: Delivery) -> tuple[str, int]:
    return delivery.task_id, delivery.attempt


@contextlib.asynccontextmanager
async def sending(sender: WebhookSender) -> AsyncIterator[WebhookSender]:
    """Run the sender's loop for the duration of the block."""
    task = asyncio.create_task(sender.run(), name="webhooks")
    try:
        yield sender
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
