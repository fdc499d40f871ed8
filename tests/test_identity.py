"""The framework-free integration core: identities, trusted proxies, headers, bodies."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import tracemalloc
from typing import Any

import http_sfv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenlimit import AsyncRateLimiter, ConfigError, Decision, Limit, MemoryBackend, RateLimiter
from tokenlimit.integrations import _common
from tokenlimit.integrations._check import RequestFacts, acheck, check
from tokenlimit.integrations._common import (
    Policy,
    TrustedProxies,
    api_key_identity,
    default_identity,
    ip_identity,
    rate_limit_headers,
    raw_rate_limit_headers,
    refused_body,
)


def client(spec: object, peer: str, xff: str | None) -> str:
    address = TrustedProxies(spec).client_ip(peer, xff)  # type: ignore[arg-type]
    return str(address)


def test_no_trusted_proxies_ignores_forwarded_for() -> None:
    assert client(None, "203.0.113.9", "1.2.3.4") == "203.0.113.9"
    assert client(0, "203.0.113.9", "1.2.3.4") == "203.0.113.9"


def test_hop_count_takes_the_nth_from_the_right() -> None:
    assert client(1, "10.0.0.1", "1.2.3.4") == "1.2.3.4"
    # The client forged the first entry; one proxy appended the real address.
    assert client(1, "10.0.0.1", "6.6.6.6, 1.2.3.4") == "1.2.3.4"
    assert client(2, "10.0.0.2", "6.6.6.6, 1.2.3.4, 10.0.0.1") == "1.2.3.4"
    assert client(1, "10.0.0.1", None) == "10.0.0.1"


def test_cidr_list_walks_past_trusted_proxies_only() -> None:
    trusted = ["10.0.0.0/8"]
    assert client(trusted, "10.0.0.1", "6.6.6.6, 1.2.3.4, 10.1.1.1") == "1.2.3.4"
    # An untrusted peer cannot choose its address with a header.
    assert client(trusted, "203.0.113.9", "1.2.3.4") == "203.0.113.9"
    # Garbage after a trusted hop: no guess.
    assert TrustedProxies(trusted).client_ip("10.0.0.1", "nonsense") is None


@pytest.mark.parametrize("peer", [None, "", "/run/app.sock", "unix:/run/app.sock"])
def test_a_unix_socket_peer_is_a_local_proxy(peer: str | None) -> None:
    # uvicorn --uds, gunicorn on a unix socket: no peer address, or a path. Only a local
    # process can connect there, so its X-Forwarded-For entry names the client.
    def of(spec: object, xff: str | None) -> str:
        return str(TrustedProxies(spec).client_ip(peer, xff))  # type: ignore[arg-type]

    assert of(None, "198.51.100.7") == "198.51.100.7"
    assert of(None, "6.6.6.6, 198.51.100.7") == "198.51.100.7"  # left of it: forged
    assert of(["10.0.0.0/8"], "6.6.6.6, 198.51.100.7, 10.0.0.3") == "198.51.100.7"
    assert of(2, "6.6.6.6, 198.51.100.7, 10.0.0.3") == "198.51.100.7"  # a hop count: as ever
    assert of(None, None) == "None"
    assert of(None, "nonsense") == "None"  # no guess
    # A TCP peer still cannot choose its address; a name that is no socket path is unknown.
    assert client(None, "203.0.113.9", "198.51.100.7") == "203.0.113.9"
    assert client(["10.0.0.0/8"], "203.0.113.9", "198.51.100.7") == "203.0.113.9"
    assert client(None, "testclient", "198.51.100.7") == "None"


def test_an_unknown_client_is_reported_once_with_the_fix(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_common, "_unknown_reported", False, raising=False)
    kwargs = {"api_key": None, "user_id": None, "proxies": TrustedProxies()}
    with caplog.at_level(logging.WARNING, logger="tokenlimit"):
        assert default_identity(peer=None, forwarded_for=None, **kwargs) == "ip:unknown"  # type: ignore[arg-type]
        assert default_identity(peer="testclient", forwarded_for=None, **kwargs) == "ip:unknown"  # type: ignore[arg-type]
        assert default_identity(peer="203.0.113.9", forwarded_for=None, **kwargs) != "ip:unknown"  # type: ignore[arg-type]
    (record,) = [r for r in caplog.records if r.name == "tokenlimit"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "ip:unknown" in message
    assert "X-Forwarded-For" in message
    assert "trusted_proxies" in message


def test_the_address_cache_keeps_no_attacker_sized_strings() -> None:
    # X-Forwarded-For is the client's to write: 64 kB values, each new, must neither stay in
    # the client-address cache nor change whom a request is charged to.
    none, hops, cidrs = TrustedProxies(None), TrustedProxies(1), TrustedProxies(["10.0.0.0/8"])
    cases = (("203.0.113.9", none), ("10.0.0.1", hops), ("10.0.0.1", cidrs))
    _common._ip_key.cache_clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200):
            forwarded_for = f"{i:08d}" + "x" * 65_536 + ", 198.51.100.7"
            keys = [
                default_identity(
                    api_key=None, user_id=None, peer=peer, forwarded_for=forwarded_for, proxies=p
                )
                for peer, p in cases
            ]
            assert keys == ["ip:203.0.113.9", "ip:198.51.100.7", "ip:198.51.100.7"]
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 1_000_000, f"{retained:,} bytes kept"
    assert _common._ip_key.cache_info().currsize <= 1  # the untrusted peer alone


def test_ip_parsing_handles_ports_brackets_and_mapped_v4() -> None:
    assert client(1, "10.0.0.1", "[2001:db8::1]:443") == "2001:db8::1"
    assert client(1, "10.0.0.1", "203.0.113.7:5000") == "203.0.113.7"
    assert client(None, "::ffff:203.0.113.7", None) == "203.0.113.7"


def teredo(client_v4: str, server_v4: str = "192.0.2.1", port: int = 40000) -> str:
    """A Teredo address (RFC 4380): 2001::/32, the server, then the client's port and address
    obfuscated (every bit flipped)."""
    client_bits = int(ipaddress.IPv4Address(client_v4)) ^ 0xFFFFFFFF
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server_v4)) << 64)
    value |= (0x8000 << 48) | ((port ^ 0xFFFF) << 32) | client_bits
    return str(ipaddress.IPv6Address(value))


EMBEDDED_V4 = {
    "nat64": "64:ff9b::{}",  # RFC 6052 well-known prefix
    "siit": "::ffff:0:{}",  # RFC 7915 IPv4-translated
    "mapped": "::ffff:{}",
    "teredo": None,
}


@pytest.mark.parametrize("form", list(EMBEDDED_V4))
def test_ipv6_embedding_ipv4_is_unmapped_to_the_ipv4_client(form: str) -> None:
    # Each of these forms would put every IPv4 client behind it in one /64 bucket.
    clients = ["198.51.100.7", "198.51.100.8", "203.0.113.9", "192.0.2.200"]
    pattern = EMBEDDED_V4[form]
    peers = [teredo(v4) if pattern is None else pattern.format(v4) for v4 in clients]
    keys = [
        default_identity(
            api_key=None, user_id=None, peer=peer, forwarded_for=None, proxies=TrustedProxies()
        )
        for peer in peers
    ]
    assert keys == [f"ip:{v4}" for v4 in clients]
    # Through a trusted proxy's X-Forwarded-For too.
    assert [client(1, "10.0.0.1", peer) for peer in peers] == clients


def test_ipv6_groups_by_64() -> None:
    a = ip_identity(ipaddress.ip_address("2001:db8:1:2::1"))
    b = ip_identity(ipaddress.ip_address("2001:db8:1:2:ffff::9"))
    c = ip_identity(ipaddress.ip_address("2001:db8:1:3::1"))
    assert a == b == "ip:2001:db8:1:2::/64"
    assert c != a
    assert ip_identity(ipaddress.ip_address("203.0.113.7")) == "ip:203.0.113.7"
    assert ip_identity(None) == "ip:unknown"


def test_identity_order_and_hashing() -> None:
    proxies = TrustedProxies()
    kwargs = {"peer": "203.0.113.9", "forwarded_for": None, "proxies": proxies}
    key = default_identity(api_key="sk_live_secret", user_id=7, **kwargs)  # type: ignore[arg-type]
    assert key == api_key_identity("sk_live_secret")
    assert key.startswith("apikey:")
    assert "sk_live_secret" not in key
    assert default_identity(api_key=None, user_id=7, **kwargs) == "user:7"  # type: ignore[arg-type]
    assert default_identity(api_key=None, user_id=None, **kwargs) == "ip:203.0.113.9"  # type: ignore[arg-type]


def statuses(policy: Policy, keys: list[str], *, asynchronous: bool = False) -> list[int]:
    """One request per key, all from one client IP, through the framework-free check."""
    limiter: Any = (
        AsyncRateLimiter(MemoryBackend()) if asynchronous else RateLimiter(MemoryBackend())
    )

    def facts(key: str) -> RequestFacts:
        presented = key if policy.api_key_header else None  # the header is read only if named
        return RequestFacts(None, "/", "203.0.113.9", None, api_key=presented)

    if asynchronous:

        async def main() -> list[int]:
            return [(await acheck(policy, facts(k), limiter)).status for k in keys]

        return asyncio.run(main())
    return [check(policy, facts(k), limiter, resolve=asyncio.run).status for k in keys]


def test_api_keys_count_only_where_the_app_vouches_for_them() -> None:
    one = Limit(0.001, 1)
    # Off by default: made-up keys from one client share its IP's bucket.
    default = Policy.build(one)
    assert default.api_key_header is None
    assert statuses(default, ["made-up", "another"]) == [200, 429]
    # Opted in where authentication runs first: each key is its own bucket.
    opted_in = Policy.build(one, api_key_header="X-API-Key")
    assert statuses(opted_in, ["k1", "k2"]) == [200, 200]

    def known(key: str) -> bool:
        return key == "good"

    async def aknown(key: str) -> bool:
        return known(key)

    checked = Policy.build(one, api_key_validator=known)
    assert checked.api_key_header == "X-API-Key"  # a validator reads the usual header
    # "good" has its own bucket; unknown keys fall through to the IP's, which they share.
    assert statuses(checked, ["good", "bad", "worse"]) == [200, 200, 429]
    achecked = Policy.build(one, api_key_header="X-Key", api_key_validator=aknown)
    assert achecked.api_key_header == "X-Key"
    assert statuses(achecked, ["good", "bad", "worse"], asynchronous=True) == [200, 200, 429]
    # Sync code runs an async validator the framework's way (here: asyncio.run).
    assert statuses(achecked, ["good", "bad", "worse"]) == [200, 200, 429]


def test_policy_validates_and_matches_exempt_prefixes() -> None:
    policy = Policy.build("10/second", burst=20, exempt=["/health", "/static/"])
    assert policy.limits == (Limit.parse("10/second", burst=20),)
    assert policy.is_exempt("/health")
    assert policy.is_exempt("/health/live")
    assert policy.is_exempt("/static/app.js")
    assert not policy.is_exempt("/healthz")
    assert not policy.is_exempt("/v1/hello")
    with pytest.raises(ConfigError, match="exempt"):
        Policy.build("1/second", exempt=["health"])
    with pytest.raises(ConfigError, match="cost"):
        Policy.build("1/second", cost=5)


def parsed(value: str) -> list[tuple[object, dict[str, object]]]:
    items = http_sfv.List()
    items.parse(value.encode())
    return [(item.value, dict(item.params)) for item in items]


def test_headers_are_structured_fields_for_every_policy() -> None:
    per_second = Limit(10, 20, name="burst")
    per_day = Limit.per_day(1000, name='day "quota"')
    details = (
        Decision(True, 20, 19, 0.0, 0.1, policy=per_second),
        Decision(True, 1000, 999, 0.0, 86.4, policy=per_day),
    )
    decision = Decision(True, 20, 19, 0.0, 0.1, policy=per_second, details=details)
    headers = dict(rate_limit_headers(decision))
    assert headers["X-RateLimit-Limit"] == "20"
    assert headers["X-RateLimit-Remaining"] == "19"
    assert "Retry-After" not in headers
    assert parsed(headers["RateLimit-Policy"]) == [
        ("burst", {"q": 20, "w": 2}),
        ('day "quota"', {"q": 1000, "w": 86400}),
    ]
    assert parsed(headers["RateLimit"]) == [
        ("burst", {"r": 19, "t": 1}),
        ('day "quota"', {"r": 999, "t": 87}),
    ]


@given(
    allowed=st.booleans(),
    remaining=st.integers(0, 10**9),
    reset=st.floats(0, 1e9, allow_nan=False),
    retry=st.floats(0, 1e6, allow_nan=False),
    label=st.sampled_from(["10/second", 'day "quota"', "caf\u00e9", "a\\b", "x" * 80]),
    several=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_raw_headers_are_the_fields_encoded(
    allowed: bool, remaining: int, reset: float, retry: float, label: str, several: bool
) -> None:
    """What ASGI sends (bytes, formatted at once for one limit's admission) is exactly the
    fields Flask and Django send, lower-cased and encoded, one second boundary aside."""
    limit = Limit(7, 10**9, name=label)
    details = (
        (
            Decision(allowed, 10**9, remaining, retry, reset, policy=limit),
            Decision(True, 5, 4, 0.0, 0.5, policy=Limit(10, 5)),
        )
        if several
        else ()
    )
    decision = Decision(allowed, 10**9, remaining, 0.0 if allowed else retry, reset,
                        policy=limit, details=details)  # fmt: skip
    for _ in range(3):  # the reset field reads the clock: equal unless a second turned between
        raw = raw_rate_limit_headers(decision)
        text = rate_limit_headers(decision)
        if raw == [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in text]:
            return
    raise AssertionError(f"{raw!r} != {text!r}")


def test_refusal_headers_and_body() -> None:
    lim = Limit(1, 5)
    decision = Decision(False, 5, 0, 0.2, 4.2, policy=lim, details=())
    headers = dict(rate_limit_headers(decision))
    assert headers["Retry-After"] == "1"  # whole seconds, rounded up, at least 1
    assert parsed(headers["RateLimit-Policy"]) == [("5-per-5s", {"q": 5, "w": 5})]
    assert json.loads(refused_body(decision)) == {"detail": "rate limit exceeded", "retry_after": 1}
    late = Decision(False, 5, 0, 2.01, 6.0, policy=lim)
    assert dict(rate_limit_headers(late))["Retry-After"] == "3"
