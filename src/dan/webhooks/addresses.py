"""The SSRF guard: which callback URLs DAN may POST a webhook to.

A ``callback_url`` is an http:// or https:// URL of at most ``MAX_URL_CHARS`` characters with a
host. Unless ``webhook_allow_private`` (``DAN_WEBHOOK_ALLOW_PRIVATE``) is on, every address its
host resolves to must be public: not loopback, private, link-local, shared (carrier-grade NAT),
multicast, reserved or unspecified; an IPv4 address inside an IPv6 one (mapped, 6to4 or NAT64)
is judged as the IPv4 address. Otherwise anyone who may submit a task could make the server
call what only it can reach: its own admin ports, a cloud's metadata service at
169.254.169.254, the machines of its private network.

The check runs at submit and again before every try, on the addresses the host resolves to
then; the request goes to the address that was checked (the URL's host stays in the Host
header and the TLS server name), so a name that resolves elsewhere a moment later (DNS
rebinding) cannot steer it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import httpx

MAX_URL_CHARS = 2048
SCHEMES = ("http", "https")
ALLOW_SETTING = "DAN_WEBHOOK_ALLOW_PRIVATE"
NAT64 = ip_network("64:ff9b::/96")

IPAddress = IPv4Address | IPv6Address


class RefusedAddress(Exception):
    """The callback URL's host is, or resolves to, an address DAN does not call."""


class Unresolvable(Exception):
    """The callback URL's host does not resolve (now)."""


@dataclass(frozen=True)
class Target:
    """Where one try goes: ``url`` with the checked address for its host, and the name the
    server knows itself by (the Host header; the TLS server name on https)."""

    url: httpx.URL
    host_header: str
    server_name: str | None

    @property
    def extensions(self) -> dict[str, str]:
        return {"sni_hostname": self.server_name} if self.server_name else {}


def parse_callback_url(value: str) -> httpx.URL:
    """The URL ``value`` names; ValueError (a sentence for the field) if it is not an
    http(s) URL with a host, or longer than ``MAX_URL_CHARS``."""
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"must be a URL of at most {MAX_URL_CHARS} characters, got {len(value)}")
    shown = value if len(value) <= 80 else value[:80] + "..."
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"must be an http:// or https:// URL, got {shown!r} ({exc})") from exc
    if url.scheme not in SCHEMES or not url.host:
        raise ValueError(
            "must be an http:// or https:// URL with a host, such as "
            f"https://example.com/hooks/dan, got {shown!r}"
        )
    return url


def refusal(address: IPAddress) -> str | None:
    """What kind of address ``address`` is when DAN must not call it ("loopback", "private",
    ...); None for a public address."""
    if isinstance(address, IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in NAT64:
            inner = IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return refusal(inner)
    kinds = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    )
    for kind, found in kinds:
        if found:
            return kind
    return None if address.is_global else "non-public"


def check_addresses(host: str, addresses: Sequence[IPAddress], *, allow_private: bool) -> None:
    """RefusedAddress naming the first of ``addresses`` (what ``host`` resolves to) that is
    not public, unless ``allow_private``."""
    if allow_private:
        return
    for address in addresses:
        kind = refusal(address)
        if kind is not None:
            named = f"{host} is" if literal(host) else f"{host} resolves to {address},"
            article = "an" if kind[0] in "aeiou" else "a"
            raise RefusedAddress(
                f"{named} {article} {kind} address; DAN calls only public addresses unless "
                f"{ALLOW_SETTING}=true (the SSRF guard; see the README's Webhooks)"
            )


def literal(host: str) -> IPAddress | None:
    """The address ``host`` is written as, or None for a name."""
    try:
        return ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (blocking); Unresolvable if none."""
    known = literal(host)
    if known is not None:
        return [known]
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"{host} does not resolve ({exc})") from exc
    return _addresses(host, found)


async def resolve_async(host: str, port: int) -> list[IPAddress]:
    """:func:`resolve`, on the event loop's resolver."""
    known = literal(host)
    if known is not None:
        return [known]
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"{host} does not resolve ({exc})") from exc
    return _addresses(host, found)


def _addresses(host: str, found: Sequence[tuple[object, ...]]) -> list[IPAddress]:
    addresses: list[IPAddress] = []
    for info in found:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        # An IPv6 sockaddr may carry a zone ("fe80::1%eth0"): judge the address itself.
        address = ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise Unresolvable(f"{host} resolves to no address")
    return addresses


def port_of(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def pinned(url: httpx.URL, address: IPAddress) -> Target:
    """The try of ``url`` that connects to ``address``, which its host was checked to be."""
    server_name = url.host if url.scheme == "https" and literal(url.host) is None else None
    return Target(url.copy_with(host=str(address)), url.netloc.decode("ascii"), server_name)
