"""The SSRF guard's judgement of addresses and URLs, the pinned try, and the signature."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from ipaddress import ip_address

import httpx
import pytest

from dan.webhooks.addresses import (
    RefusedAddress,
    Unresolvable,
    check_addresses,
    parse_callback_url,
    pinned,
    refusal,
    resolve,
    resolve_async,
)
from dan.webhooks.signing import signature, signed_headers, verify

NOT_PUBLIC = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "fc00::1": "private",
    "169.254.169.254": "link-local",  # cloud metadata services
    "fe80::1": "link-local",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "100.64.0.1": "non-public",  # carrier-grade NAT
    "240.0.0.1": "reserved",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped
    "::ffff:10.0.0.1": "private",
    "64:ff9b::a00:1": "private",  # NAT64 of 10.0.0.1
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "kind"), NOT_PUBLIC.items())
def test_non_public_addresses_are_named_for_what_they_are(address: str, kind: str) -> None:
    assert refusal(ip_address(address)) == kind


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ip_address(address)) is None


def test_one_private_address_among_public_ones_refuses_the_host() -> None:
    addresses = [ip_address("8.8.8.8"), ip_address("10.0.0.7")]
    with pytest.raises(RefusedAddress, match=r"hooks\.example resolves to 10\.0\.0\.7, a private"):
        check_addresses("hooks.example", addresses, allow_private=False)
    check_addresses("hooks.example", addresses, allow_private=True)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://hooks.example/", "http:// or https://"),
        ("http://", "with a host"),
        ("mailto:a@hooks.example", "http:// or https://"),
        ("http://hooks.example/\n", "non-printable"),
        ("http://300.1.1.1/", "Invalid IPv4 address"),
        ("https://hooks.example/" + "x" * 2048, "at most 2048 characters"),
    ],
)
def test_malformed_urls_are_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_callback_url(url)


def test_localhost_resolves_to_loopback_and_nonsense_does_not_resolve() -> None:
    found = resolve("localhost", 80)
    assert found and all(address.is_loopback for address in found)
    assert asyncio.run(resolve_async("localhost", 80)) == found
    assert resolve("203.0.113.9", 80) == [ip_address("203.0.113.9")]  # no lookup for literals
    with pytest.raises(Unresolvable):
        resolve("no-such-host.invalid", 80)


def test_a_try_connects_to_the_checked_address_under_the_urls_name() -> None:
    target = pinned(httpx.URL("https://u:p@hooks.example:8443/dan?x=1"), ip_address("8.8.8.8"))
    assert str(target.url) == "https://u:p@8.8.8.8:8443/dan?x=1"
    assert (target.host_header, target.extensions) == (
        "hooks.example:8443",
        {"sni_hostname": "hooks.example"},
    )
    v6 = pinned(httpx.URL("http://hooks.example/dan"), ip_address("2606:4700::1"))
    assert (str(v6.url), v6.host_header, v6.extensions) == (
        "http://[2606:4700::1]/dan",
        "hooks.example",
        {},
    )


def test_the_signature_is_an_hmac_of_the_timestamp_and_the_body() -> None:
    secret, body = "ab" * 32, b'{"code":200}'
    expected = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(secret, 1_700_000_000, body) == "sha256=" + expected
    headers = signed_headers(secret, body, task_id="t", attempt=2, timestamp=1_700_000_000)
    assert headers["X-DAN-Signature"] == "sha256=" + expected
    assert (headers["X-DAN-Timestamp"], headers["X-DAN-Task-Id"]) == ("1700000000", "t")
    assert headers["X-DAN-Attempt"] == "2"


def test_verify_refuses_a_changed_body_another_secret_and_an_old_timestamp() -> None:
    secret, body, sent = "cd" * 32, b'{"code":200}', 1_700_000_000
    signed = signature(secret, sent, body)
    assert verify(secret, body, timestamp=str(sent), signed=signed, now=sent + 10)
    assert not verify(secret, body + b" ", timestamp=str(sent), signed=signed, now=sent)
    assert not verify("ef" * 32, body, timestamp=str(sent), signed=signed, now=sent)
    assert not verify(secret, body, timestamp=str(sent), signed=signed, now=sent + 301)
    assert not verify(secret, body, timestamp="soon", signed=signed, now=sent)
