"""tokenlimit.integrations.django: the middleware, the ``ratelimit`` decorator and the system
checks, through Django's test ``Client`` (WSGI: a sync chain) and ``AsyncClient`` (ASGI: an
async chain), on memory:// and on every real server."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import django
import django_project
import http_sfv
import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.core.signals import setting_changed
from django.http import HttpResponse
from django.test import AsyncClient, Client, override_settings
from django.views import View
from django_project import FAKE_AUTH, FAKE_LAZY_AUTH, MIDDLEWARE, SYNC_ONLY, views

from servers import free_port
from tokenlimit import ConfigError, Limit, RateLimiter
from tokenlimit.integrations import django as tl_django
from tokenlimit.integrations._common import api_key_identity
from tokenlimit.integrations._django import settings_state as tl_django_state

django_project.setup()

MODES = ["sync", "async"]
MINUTE3 = "3/minute"  # the label of "3/minute", as written: burst 3, one token every 20 s
MINUTE2 = "2/minute"  # the views' own limit


@pytest.fixture(autouse=True)
def _base_settings() -> Iterator[None]:
    with override_settings(**django_project.BASE):
        yield


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """``sync``: the test Client (WSGI); ``async``: the AsyncClient (ASGI)."""
    return str(request.param)


@contextmanager
def tokenlimit(**options: Any) -> Iterator[None]:
    """``settings.TOKENLIMIT``: memory:// and 3/minute, changed by ``options``."""
    with override_settings(TOKENLIMIT={"URL": "memory://", "LIMIT": "3/minute", **options}):
        yield


class PeerAsyncClient(AsyncClient):
    """An AsyncClient whose requests come from ``addr`` (the ASGI scope's ``client``)."""

    def __init__(self, addr: str | None) -> None:
        super().__init__()
        self.peer = addr

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope: dict[str, Any] = super()._base_scope(**request)
        scope["client"] = None if self.peer is None else [self.peer, 50000]
        return scope


def fetch(
    mode: str,
    path: str,
    n: int = 1,
    *,
    addr: str | None = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> list[Any]:
    """``n`` GETs of ``path`` from the client address ``addr``, in one client. ``None``: a
    unix socket's peer (WSGI: ``REMOTE_ADDR`` "", as gunicorn gives it; ASGI: no ``client``,
    so Django leaves ``REMOTE_ADDR`` out)."""
    if mode == "sync":
        client = Client(REMOTE_ADDR=addr or "")
        return [client.get(path, headers=headers) for _ in range(n)]

    async def run() -> list[Any]:
        aclient = PeerAsyncClient(addr)
        return [await aclient.get(path, headers=headers) for _ in range(n)]

    return asyncio.run(run())


def codes(responses: list[Any]) -> list[int]:
    return [r.status_code for r in responses]


def sf_list(value: str) -> list[tuple[Any, dict[str, Any]]]:
    """An RFC 8941 List, parsed strictly."""
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


def remaining(identity: str, limit: str = "3/minute") -> int:
    """Tokens left in the bucket of ``identity`` (the settings' store; consumes nothing)."""
    return tl_django_state().sync.peek(identity, Limit.parse(limit)).remaining


def assert_burst(responses: list[Any], *, burst: int, interval: int, label: str) -> None:
    """Admitted ``burst`` times with exact headers, then a 429 with exact headers and body."""
    assert codes(responses) == [200] * burst + [429]
    for i, response in enumerate(responses[:burst]):
        left = burst - 1 - i
        assert response["X-RateLimit-Limit"] == str(burst)
        assert response["X-RateLimit-Remaining"] == str(left)
        reset = int(response["X-RateLimit-Reset"])  # Unix seconds when full again
        assert abs(reset - (time.time() + interval * (i + 1))) <= 5  # the responses' ages
        assert sf_list(response["RateLimit-Policy"]) == [
            (label, {"q": burst, "w": burst * interval})
        ]
        assert sf_list(response["RateLimit"]) == [(label, {"r": left, "t": interval * (i + 1)})]
        assert "Retry-After" not in response
    refused = responses[burst]
    assert refused["Content-Type"] == "application/json"
    retry = int(refused["Retry-After"])
    assert retry == interval  # the next token, whole seconds rounded up
    assert json.loads(refused.content) == {"detail": "rate limit exceeded", "retry_after": retry}
    assert refused["X-RateLimit-Limit"] == str(burst)
    assert refused["X-RateLimit-Remaining"] == "0"
    assert sf_list(refused["RateLimit-Policy"]) == [(label, {"q": burst, "w": burst * interval})]
    assert sf_list(refused["RateLimit"]) == [(label, {"r": 0, "t": burst * interval})]


def assert_no_leak(response: Any, *secrets: str) -> None:
    text = response.content.decode() + "".join(f"{k}: {v}\n" for k, v in response.items())
    for secret in secrets:
        assert secret not in text


def rate_headers(response: Any) -> set[str]:
    return {k for k in response.headers if "ratelimit" in k.lower() or k == "Retry-After"}


# -- the middleware ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/plain", "/aplain"])
def test_middleware_admits_the_burst_then_refuses(url: str, mode: str, path: str) -> None:
    with tokenlimit(URL=url, TIMEOUT=5.0):
        assert_burst(fetch(mode, path, 4), burst=3, interval=20, label=MINUTE3)


@pytest.mark.parametrize("path", ["/cbv", "/acbv"])
def test_middleware_limits_class_based_views(mode: str, path: str) -> None:
    with tokenlimit():
        assert_burst(fetch(mode, path, 4), burst=3, interval=20, label=MINUTE3)


def test_one_bucket_per_client_across_views_and_chains() -> None:
    # memory:// makes one store for both twins: sync and async requests share the budget.
    with tokenlimit():
        assert codes(fetch("sync", "/plain")) == [200]
        assert codes(fetch("async", "/aplain")) == [200]
        assert codes(fetch("sync", "/acbv")) == [200]
        assert codes(fetch("async", "/cbv")) == [429]
        assert codes(fetch("async", "/cbv", addr="127.0.0.2")) == [200]
        assert remaining("ip:127.0.0.1") == 0


def test_several_limits_are_all_listed() -> None:
    hourly = Limit.per_hour(100, name="hourly")
    with tokenlimit(LIMIT=["3/minute", hourly]):
        first = fetch("sync", "/plain")[0]
    assert sf_list(first["RateLimit-Policy"]) == [
        (MINUTE3, {"q": 3, "w": 60}),
        ("hourly", {"q": 100, "w": 3600}),
    ]
    assert sf_list(first["RateLimit"]) == [
        (MINUTE3, {"r": 2, "t": 20}),
        ("hourly", {"r": 99, "t": 36}),
    ]
    assert first["X-RateLimit-Limit"] == "3"  # the most restrictive one
    assert first["X-RateLimit-Remaining"] == "2"


def test_async_chain_never_uses_the_sync_limiter(
    monkeypatch: pytest.MonkeyPatch, standalone: Any
) -> None:
    def blocking(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a sync Redis call on the event loop")

    with tokenlimit(URL=standalone.url, TIMEOUT=5.0):
        monkeypatch.setattr(RateLimiter, "try_acquire", blocking)
        assert codes(fetch("async", "/aplain", 4)) == [200, 200, 200, 429]
        assert codes(fetch("async", "/alimited", 1, addr="10.9.9.9")) == [200]
        assert codes(fetch("async", "/adispatch-limited", 1, addr="10.9.9.8")) == [200]


def test_sync_only_neighbour_puts_the_middleware_in_sync_mode() -> None:
    with tokenlimit(), override_settings(MIDDLEWARE=[FAKE_AUTH, MIDDLEWARE, SYNC_ONLY]):
        assert_burst(fetch("async", "/aplain", 4), burst=3, interval=20, label=MINUTE3)


def test_middleware_mode_follows_get_response() -> None:
    from asgiref.sync import iscoroutinefunction

    async def async_view(request: Any) -> Any:
        return None

    def sync_view(request: Any) -> Any:
        return None

    assert iscoroutinefunction(tl_django.RateLimitMiddleware(async_view))
    assert not iscoroutinefunction(tl_django.RateLimitMiddleware(sync_view))
    assert tl_django.RateLimitMiddleware.sync_capable
    assert tl_django.RateLimitMiddleware.async_capable


def test_exempt_paths_skip_the_middleware(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute", EXEMPT=["/health"]):
        for response in fetch(mode, "/health", 3) + fetch(mode, "/health/deep", 3):
            assert response.status_code == 200
            assert not rate_headers(response)
        assert remaining("ip:127.0.0.1", "1/minute") == 1
        # A prefix only matches whole path segments.
        assert codes(fetch(mode, "/healthz", 2)) == [404, 429]


def test_headers_off(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute", HEADERS=False):
        allowed, refused = fetch(mode, "/plain", 2)
    assert allowed.status_code == 200
    assert not rate_headers(allowed)
    assert refused.status_code == 429
    # Retry-After is HTTP's own answer to a 429: it stays.
    assert rate_headers(refused) == {"Retry-After"}
    assert refused["Retry-After"] == "60"
    assert json.loads(refused.content) == {"detail": "rate limit exceeded", "retry_after": 60}


# -- identity ----------------------------------------------------------------------------------
def test_custom_key_from_dotted_path(mode: str) -> None:
    for key in ("django_project.keys.tenant", "django_project.keys.atenant"):
        with tokenlimit(KEY=key, LIMIT="1/minute"):
            a = fetch(mode, "/plain", 2, headers={"X-Tenant": "acme-corp"})
            b = fetch(mode, "/plain", 1, addr="10.1.1.1", headers={"X-Tenant": "globex"})
            # The same tenant from another address: the same bucket.
            a2 = fetch(mode, "/plain", 1, addr="10.2.2.2", headers={"X-Tenant": "acme-corp"})
            # No tenant: None, so the default identity (the client IP).
            anonymous = fetch(mode, "/plain", 1)
            assert codes(a + b + a2 + anonymous) == [200, 429, 200, 429, 200]
            assert remaining("tenant:acme-corp", "1/minute") == 0
            assert remaining("ip:127.0.0.1", "1/minute") == 0
            for response in a + b + a2:
                assert_no_leak(response, "acme-corp", "globex", "tenant:")


@pytest.mark.parametrize("key", ["django_project.keys.empty", "django_project.keys.aempty"])
def test_custom_key_returning_empty_means_the_default_identity(mode: str, key: str) -> None:
    # One rule in every integration: None or "" from KEY means "use the default identity".
    with tokenlimit(KEY=key, LIMIT="1/minute"), override_settings(MIDDLEWARE=[MIDDLEWARE]):
        responses = fetch(mode, "/plain", 2)
        assert codes(responses) == [200, 429]
        assert remaining("ip:127.0.0.1", "1/minute") == 0
    with tokenlimit(KEY=key), override_settings(MIDDLEWARE=[]):
        assert codes(fetch(mode, "/limited", 3, addr="10.4.4.4")) == [200, 200, 429]


def made_up_keys(mode: str, n: int = 6, path: str = "/plain") -> list[Any]:
    """``n`` requests from one address, each with an API key never seen before."""
    responses: list[Any] = []
    for _ in range(n):
        responses += fetch(mode, path, 1, headers={"X-API-Key": secrets.token_hex(8)})
    return responses


def test_made_up_api_keys_choose_no_bucket_by_default(mode: str) -> None:
    # The API-key step is off unless the app vouches for keys: one client, one bucket.
    with tokenlimit():
        assert codes(made_up_keys(mode)) == [200, 200, 200, 429, 429, 429]
        assert remaining("ip:127.0.0.1") == 0


@pytest.mark.parametrize(
    "validator", ["django_project.keys.known_api_key", "django_project.keys.aknown_api_key"]
)
def test_api_key_validator_sends_unknown_keys_to_the_ip(mode: str, validator: str) -> None:
    # With a validator and no header name, the header is X-API-Key.
    with tokenlimit(API_KEY_VALIDATOR=validator):
        assert codes(made_up_keys(mode)) == [200, 200, 200, 429, 429, 429]
        known = fetch(mode, "/plain", 4, headers={"X-API-Key": "sk-known-1"})
        assert codes(known) == [200, 200, 200, 429]
        assert remaining(api_key_identity("sk-known-1")) == 0
    with tokenlimit(API_KEY_VALIDATOR=validator), override_settings(MIDDLEWARE=[]):
        # The decorator's default identity too (2/minute, its own bucket).
        assert codes(made_up_keys(mode, 3, "/limited")) == [200, 200, 429]


def test_api_key_is_the_identity_and_is_hashed(mode: str) -> None:
    raw = "sk_live_raw-secret-123"
    with tokenlimit(LIMIT="2/minute", API_KEY_HEADER="X-API-Key"):
        first = fetch(mode, "/plain", 1, addr="10.0.0.1", headers={"X-API-Key": raw})
        # The same key from another address and with a signed-in user: the key wins.
        second = fetch(
            mode, "/plain", 2, addr="10.0.0.2", headers={"X-API-Key": raw, "X-Test-User": "5"}
        )
        other = fetch(mode, "/plain", 1, addr="10.0.0.1", headers={"X-API-Key": "another"})
        assert codes(first + second + other) == [200, 200, 429, 200]
        assert remaining(api_key_identity(raw), "2/minute") == 0
        assert api_key_identity(raw).startswith("apikey:")
        assert raw not in api_key_identity(raw)
        for response in first + second + other:
            assert_no_leak(response, raw, "sk_live", "apikey:")


def test_api_key_header_setting(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute", API_KEY_HEADER="Authorization-Key"):
        responses = fetch(mode, "/plain", 1, headers={"Authorization-Key": "k1"})
        responses += fetch(mode, "/plain", 1, headers={"X-API-Key": "k2"})  # not read: the IP
        assert codes(responses) == [200, 200]
        assert remaining(api_key_identity("k1"), "1/minute") == 0
        assert remaining("ip:127.0.0.1", "1/minute") == 0


def test_api_key_identity_off(mode: str) -> None:
    # Unchecked keys would let a client mint buckets: API_KEY_HEADER None ignores them.
    with tokenlimit(LIMIT="1/minute", API_KEY_HEADER=None):
        responses = fetch(mode, "/plain", 1, headers={"X-API-Key": "made-up-1"})
        responses += fetch(mode, "/plain", 1, headers={"X-API-Key": "made-up-2"})
        assert codes(responses) == [200, 429]
        assert remaining("ip:127.0.0.1", "1/minute") == 0


def test_api_key_never_reaches_the_server_in_clear(target: Any, mode: str) -> None:
    raw = "sk_live_raw-secret-456"
    with tokenlimit(URL=target.url, TIMEOUT=5.0, API_KEY_HEADER="X-API-Key"):
        responses = fetch(mode, "/plain", 4, headers={"X-API-Key": raw})
        responses += fetch(mode, "/limited", 3, headers={"X-API-Key": raw})
    assert codes(responses) == [200, 200, 200, 429, 429, 429, 429]
    client = target.client()
    try:
        keys = [key.decode() for key in client.scan_iter(count=1000)]
    finally:
        client.close()
    assert keys
    for key in keys:
        assert raw not in key
        assert "sk_live" not in key
        assert "apikey" not in key
    for response in responses:
        assert_no_leak(response, raw, "sk_live", "127.0.0.1:", target.url)


@pytest.mark.parametrize("auth", [FAKE_AUTH, FAKE_LAZY_AUTH])
def test_signed_in_user_is_the_identity(mode: str, auth: str) -> None:
    with tokenlimit(LIMIT="2/minute"), override_settings(MIDDLEWARE=[auth, MIDDLEWARE]):
        user = fetch(mode, "/plain", 1, addr="10.0.0.1", headers={"X-Test-User": "7"})
        user += fetch(mode, "/plain", 2, addr="10.0.0.2", headers={"X-Test-User": "7"})
        anonymous = fetch(mode, "/plain", 1, addr="10.0.0.1")
        other = fetch(mode, "/plain", 1, addr="10.0.0.1", headers={"X-Test-User": "8"})
        assert codes(user + anonymous + other) == [200, 200, 429, 200, 200]
        assert remaining("user:7", "2/minute") == 0
        assert remaining("user:8", "2/minute") == 1
        assert remaining("ip:10.0.0.1", "2/minute") == 1
        for response in user:
            assert_no_leak(response, "user:")


def test_untrusted_peer_cannot_spoof_forwarded_for(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute"):
        first = fetch(mode, "/plain", 1, addr="203.0.113.9", headers={"X-Forwarded-For": "1.1.1.1"})
        spoof = fetch(mode, "/plain", 1, addr="203.0.113.9", headers={"X-Forwarded-For": "2.2.2.2"})
        assert codes(first + spoof) == [200, 429]
        assert remaining("ip:203.0.113.9", "1/minute") == 0
        assert remaining("ip:1.1.1.1", "1/minute") == 1


def test_trusted_proxies_by_hop_count(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute", TRUSTED_PROXIES=1):
        # One proxy in front of the app: the client is the last entry it appended.
        header = {"X-Forwarded-For": "6.6.6.6, 198.51.100.4"}
        responses = fetch(mode, "/plain", 1, addr="10.0.0.1", headers=header)
        responses += fetch(mode, "/plain", 1, addr="10.0.0.2", headers=header)
        responses += fetch(
            mode, "/plain", 1, addr="10.0.0.1", headers={"X-Forwarded-For": "6.6.6.6"}
        )
        assert codes(responses) == [200, 429, 200]
        assert remaining("ip:198.51.100.4", "1/minute") == 0
        assert remaining("ip:6.6.6.6", "1/minute") == 0
        assert remaining("ip:10.0.0.1", "1/minute") == 1


def test_trusted_proxies_by_cidr(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute", TRUSTED_PROXIES=["10.0.0.0/8"]):
        header = {"X-Forwarded-For": "9.9.9.9, 10.0.0.7"}
        via_proxy = fetch(mode, "/plain", 1, addr="10.0.0.1", headers=header)
        again = fetch(mode, "/plain", 1, addr="10.3.0.1", headers={"X-Forwarded-For": "9.9.9.9"})
        # From outside the trusted network the header is ignored: the peer is the client.
        direct = fetch(mode, "/plain", 1, addr="8.8.8.8", headers={"X-Forwarded-For": "7.7.7.7"})
        assert codes(via_proxy + again + direct) == [200, 429, 200]
        assert remaining("ip:9.9.9.9", "1/minute") == 0
        assert remaining("ip:8.8.8.8", "1/minute") == 0
        assert remaining("ip:7.7.7.7", "1/minute") == 1
        assert remaining("ip:10.0.0.7", "1/minute") == 1


@pytest.mark.parametrize("trusted", [None, ["10.0.0.0/8"]], ids=["no-proxies", "cidrs"])
def test_a_unix_socket_peer_is_a_local_proxy(mode: str, trusted: Any) -> None:
    with tokenlimit(LIMIT="1/minute", TRUSTED_PROXIES=trusted):
        alice = {"X-Forwarded-For": "198.51.100.7"}
        bob = {"X-Forwarded-For": "6.6.6.6, 203.0.113.5"}  # what bob wrote is not believed
        responses = fetch(mode, "/plain", 2, addr=None, headers=alice)
        responses += fetch(mode, "/plain", 2, addr=None, headers=bob)
        responses += fetch(mode, "/plain", 1, addr=None, headers={"X-Forwarded-For": "6.6.6.6"})
        assert codes(responses) == [200, 429, 200, 429, 200]
        assert remaining("ip:198.51.100.7", "1/minute") == 0
        assert remaining("ip:203.0.113.5", "1/minute") == 0
        assert remaining("ip:unknown", "1/minute") == 1


def test_ipv6_clients_group_by_64(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute"):
        responses = fetch(mode, "/plain", 1, addr="2001:db8::1")
        responses += fetch(mode, "/plain", 1, addr="2001:db8::ffff:2")
        responses += fetch(mode, "/plain", 1, addr="2001:db8:0:1::1")
        assert codes(responses) == [200, 429, 200]
        assert remaining("ip:2001:db8::/64", "1/minute") == 0
        assert remaining("ip:2001:db8:0:1::/64", "1/minute") == 0
    with tokenlimit(LIMIT="1/minute", IPV6_PREFIX=128):
        responses = fetch(mode, "/plain", 1, addr="2001:db8::1")
        responses += fetch(mode, "/plain", 1, addr="2001:db8::2")
        assert codes(responses) == [200, 200]


# -- storage failures --------------------------------------------------------------------------
def test_storage_down_closed_answers_503(mode: str) -> None:
    port = free_port()
    dead = f"redis://127.0.0.1:{port}/0"
    with tokenlimit(URL=dead, TIMEOUT=0.5):
        responses = fetch(mode, "/plain", 2)
        with override_settings(MIDDLEWARE=[FAKE_AUTH]):
            responses += fetch(mode, "/limited") + fetch(mode, "/alimited")
    for response in responses:
        assert response.status_code == 503
        assert response["Content-Type"] == "application/json"
        assert json.loads(response.content) == {"detail": "rate limiter unavailable"}
        assert not rate_headers(response)
        assert_no_leak(response, str(port), "127.0.0.1", "redis://")


def test_storage_down_closed_logs_why_once_without_the_password(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A bare 503 is logged by nothing else: say why, as FastAPI and Flask do, throttled.
    dead = f"redis://:pw-s3cret@127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="tokenlimit"), tokenlimit(URL=dead, TIMEOUT=0.5):
        responses = fetch(mode, "/plain", 3)
        with override_settings(MIDDLEWARE=[FAKE_AUTH]):
            responses += fetch(mode, "/limited")
    assert codes(responses) == [503] * 4
    warnings = [r for r in caplog.records if "answering 503" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].name == "tokenlimit"
    assert "storage failed" in warnings[0].getMessage()
    assert "pw-s3cret" not in caplog.text


def test_storage_down_open_admits(mode: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with tokenlimit(URL=dead, TIMEOUT=0.5, FAILURE_MODE="open", LIMIT="1/minute"):
        responses = fetch(mode, "/plain", 3) + fetch(mode, "/limited", 3)
    assert codes(responses) == [200] * 6


def test_exceptions_from_a_view_become_429_and_503(mode: str) -> None:
    views.own_limiter.backend.clear()
    with tokenlimit():
        admitted, refused = fetch(mode, "/raises-refusal", 2)
        failed = fetch(mode, "/raises-backend-error")[0]
    assert (admitted.status_code, refused.status_code) == (200, 429)
    assert json.loads(refused.content) == {"detail": "rate limit exceeded", "retry_after": 60}
    assert refused["Retry-After"] == "60"
    assert [name for name, _ in sf_list(refused["RateLimit-Policy"])] == [MINUTE3, "inner"]
    assert failed.status_code == 503
    assert json.loads(failed.content) == {"detail": "rate limiter unavailable"}
    assert_no_leak(failed, "10.1.2.3")


# -- the decorator -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/limited", "/alimited"])
def test_decorator_on_function_views(url: str, mode: str, path: str) -> None:
    with tokenlimit(URL=url, TIMEOUT=5.0), override_settings(MIDDLEWARE=[FAKE_AUTH]):
        assert_burst(fetch(mode, path, 3), burst=2, interval=30, label=MINUTE2)


@pytest.mark.parametrize(
    "path",
    [
        "/limited-cbv",
        "/alimited-cbv",
        "/method-limited",
        pytest.param(
            "/amethod-limited",
            marks=pytest.mark.skipif(
                django.VERSION < (5, 0),
                reason="Django < 5.0: method_decorator() wraps an async method in a sync "
                "function, so the View is sync and its coroutine is never awaited, whatever "
                "the decorator returns (fixed in Django 5.0; docs/integrations/django.md)",
            ),
        ),
        "/dispatch-limited",
        "/adispatch-limited",
        "/as-view-limited",
    ],
)
def test_decorator_on_class_based_views(mode: str, path: str) -> None:
    with tokenlimit(), override_settings(MIDDLEWARE=[FAKE_AUTH]):
        assert_burst(fetch(mode, path, 3), burst=2, interval=30, label=MINUTE2)


def test_decorated_view_has_its_own_bucket(mode: str) -> None:
    with tokenlimit(), override_settings(MIDDLEWARE=[FAKE_AUTH]):
        assert codes(fetch(mode, "/limited", 3)) == [200, 200, 429]
        assert codes(fetch(mode, "/limited-twin", 3)) == [200, 200, 429]
        scope = "route:django_project.views.limited|ip:127.0.0.1"
        assert remaining(scope, "2/minute") == 0
        assert remaining("ip:127.0.0.1", "2/minute") == 2  # the identity's own bucket untouched
        assert remaining("route:django_project.views.LimitedView|ip:127.0.0.1", "2/minute") == 2


def test_decorator_with_the_middleware_reports_both_limits(mode: str) -> None:
    with tokenlimit():  # the middleware: 3/minute; the view: 2/minute
        responses = fetch(mode, "/limited", 4)
    assert codes(responses) == [200, 200, 429, 429]
    first = responses[0]
    assert sf_list(first["RateLimit-Policy"]) == [
        (MINUTE3, {"q": 3, "w": 60}),
        (MINUTE2, {"q": 2, "w": 60}),
    ]
    assert sf_list(first["RateLimit"]) == [
        (MINUTE3, {"r": 2, "t": 20}),
        (MINUTE2, {"r": 1, "t": 30}),
    ]
    assert (first["X-RateLimit-Limit"], first["X-RateLimit-Remaining"]) == ("2", "1")
    view_refusal = responses[2]  # the view refuses; the middleware had admitted it
    assert view_refusal["Retry-After"] == "30"
    assert sf_list(view_refusal["RateLimit"]) == [
        (MINUTE3, {"r": 0, "t": 60}),
        (MINUTE2, {"r": 0, "t": 60}),
    ]
    middleware_refusal = responses[3]  # now the middleware's bucket is empty too
    assert middleware_refusal["Retry-After"] == "20"
    assert sf_list(middleware_refusal["RateLimit"]) == [(MINUTE3, {"r": 0, "t": 60})]


@contextmanager
def local_urls(**views: Any) -> Iterator[None]:
    """``/<name>`` for each view, as the whole URLconf (no middleware but the fake auth)."""
    from django.urls import path

    urls = types.ModuleType("local_urls")  # hashable: Django caches a resolver per urlconf
    urls.urlpatterns = [path(name, view) for name, view in views.items()]  # type: ignore[attr-defined]
    with override_settings(ROOT_URLCONF=urls, MIDDLEWARE=[FAKE_AUTH]):
        yield


def test_view_buckets_are_named_after_the_view_or_the_scope(mode: str) -> None:
    # One rule in every integration: route:<route>|<identity>, or scope:<name>|<identity>.
    # In Django the route is the view's dotted path; scope= shares one bucket across views.
    @tl_django.ratelimit("2/minute", scope="reports")
    def daily(request: Any) -> HttpResponse:
        return HttpResponse("daily")

    @tl_django.ratelimit("2/minute", scope="reports")
    async def weekly(request: Any) -> HttpResponse:
        return HttpResponse("weekly")

    with tokenlimit(), local_urls(daily=daily, weekly=weekly):
        responses = fetch(mode, "/daily") + fetch(mode, "/weekly") + fetch(mode, "/daily")
        assert codes(responses) == [200, 200, 429]
        assert remaining("scope:reports|ip:127.0.0.1", "2/minute") == 0
    with tokenlimit(), override_settings(MIDDLEWARE=[FAKE_AUTH]):
        assert codes(fetch(mode, "/limited", 1)) == [200]
        assert remaining("route:django_project.views.limited|ip:127.0.0.1", "2/minute") == 1
    with pytest.raises(ConfigError, match=r"^scope\b"):
        tl_django.ratelimit("2/minute", scope="a|b")


def test_a_view_key_falls_back_to_the_key_setting(mode: str) -> None:
    # As in Flask: the view's key, then KEY, then the default identity.
    def project(request: Any) -> str | None:
        value = request.headers.get("X-Project")
        return f"project:{value}" if value else None

    @tl_django.ratelimit("2/minute", key=project)
    def own(request: Any) -> HttpResponse:
        return HttpResponse("own")

    with tokenlimit(KEY="django_project.keys.atenant"), local_urls(own=own):
        assert codes(fetch(mode, "/own", 1, headers={"X-Project": "p", "X-Tenant": "t"})) == [200]
        assert codes(fetch(mode, "/own", 1, headers={"X-Tenant": "t"})) == [200]
        assert codes(fetch(mode, "/own", 1)) == [200]
        route = f"route:{own.__module__}.{own.__qualname__}"
        for identity in ("project:p", "tenant:t", "ip:127.0.0.1"):
            assert remaining(f"{route}|{identity}", "2/minute") == 1, identity


def test_middleware_and_view_limits_charge_different_buckets_once_each(mode: str) -> None:
    # The same limit in LIMIT and on the view: the app-wide bucket and the view's, each once.
    with tokenlimit(LIMIT="2/minute"):
        assert codes(fetch(mode, "/limited", 1)) == [200]
        assert remaining("ip:127.0.0.1", "2/minute") == 1
        assert remaining("route:django_project.views.limited|ip:127.0.0.1", "2/minute") == 1
        assert codes(fetch(mode, "/limited", 2)) == [200, 429]


def test_one_bucket_is_charged_once_per_request(mode: str) -> None:
    # Two limits naming the same bucket on one view (stacked, or one scope twice): one token.
    @tl_django.ratelimit("3/minute")
    @tl_django.ratelimit("3/minute")
    def twice(request: Any) -> HttpResponse:
        return HttpResponse("twice")

    with tokenlimit(), local_urls(twice=twice):
        responses = fetch(mode, "/twice", 4)
    assert codes(responses) == [200, 200, 200, 429]
    assert [r["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
    assert sf_list(responses[0]["RateLimit-Policy"]) == [(MINUTE3, {"q": 3, "w": 60})]


def test_one_scope_twice_on_a_view_is_charged_once(mode: str) -> None:
    @tl_django.ratelimit("3/minute", scope="s")
    @tl_django.ratelimit("3/minute", scope="s")
    async def scoped(request: Any) -> HttpResponse:
        return HttpResponse("scoped")

    with tokenlimit(), local_urls(scoped=scoped):
        assert codes(fetch(mode, "/scoped", 4)) == [200, 200, 200, 429]


def test_decorator_without_middleware_or_limit_setting(mode: str) -> None:
    with override_settings(MIDDLEWARE=[], TOKENLIMIT={"URL": "memory://"}):
        assert codes(fetch(mode, "/limited", 3)) == [200, 200, 429]
        assert codes(fetch(mode, "/plain", 5)) == [200] * 5


def test_decorator_without_any_setting(mode: str) -> None:
    from django.conf import settings

    with override_settings(MIDDLEWARE=[]):
        del settings.TOKENLIMIT
        setting_changed.send(sender=None, setting="TOKENLIMIT", value=None, enter=True)
        try:
            assert checks.run_checks(tags=["tokenlimit"]) == []
            assert codes(fetch(mode, "/limited", 3)) == [200, 200, 429]
        finally:
            setting_changed.send(sender=None, setting="TOKENLIMIT", value=None, enter=False)


def test_decorator_key_cost_and_several_limits(mode: str) -> None:
    with tokenlimit(), override_settings(MIDDLEWARE=[]):
        tenant = fetch(mode, "/by-tenant", 3, headers={"X-Tenant": "t1"})
        tenant += fetch(mode, "/by-tenant", 1, addr="10.0.0.9", headers={"X-Tenant": "t2"})
        assert codes(tenant) == [200, 200, 429, 200]
        assert remaining("route:django_project.views.by_tenant|tenant:t1", "2/minute") == 0
        # cost=2 from a burst of 4: two requests, then refused.
        expensive = fetch(mode, "/expensive", 3)
        assert codes(expensive) == [200, 200, 429]
        assert [r["X-RateLimit-Remaining"] for r in expensive] == ["2", "0", "0"]
        multi = fetch(mode, "/multi", 3)
        assert codes(multi) == [200, 200, 429]
        assert sf_list(multi[0]["RateLimit-Policy"]) == [
            (MINUTE2, {"q": 2, "w": 60}),
            ("hourly", {"q": 100, "w": 3600}),
        ]


def test_decorator_headers_off(mode: str) -> None:
    with tokenlimit(), override_settings(MIDDLEWARE=[]):
        responses = fetch(mode, "/quiet", 3)
    assert codes(responses) == [200, 200, 429]
    assert not rate_headers(responses[0])
    assert rate_headers(responses[2]) == {"Retry-After"}


def test_decorator_keeps_what_it_wraps() -> None:
    from asgiref.sync import iscoroutinefunction

    assert iscoroutinefunction(views.alimited)
    assert not iscoroutinefunction(views.limited)
    assert views.alimited.__name__ == "alimited"
    assert views.limited.__wrapped__.__name__ == "limited"  # type: ignore[attr-defined]
    assert issubclass(views.LimitedView, View)
    assert iscoroutinefunction(views.ALimitedView.as_view())
    assert not iscoroutinefunction(views.LimitedView.as_view())


@pytest.mark.parametrize(
    ("args", "kwargs", "param"),
    [
        ((), {}, "limit"),
        (("ten a minute",), {}, "limit"),
        ((0,), {}, "limit"),  # a number is a rate, as for rate_limit: 0 is not one
        ((b"42",), {}, "limit"),
        (("1/second",), {"cost": 2}, "cost"),
        (("1/second",), {"cost": 0}, "cost"),
        (("1/second",), {"cost": True}, "cost"),
        (("1/second",), {"key": "myapp.keys.tenant"}, "key"),
        (("1/second",), {"headers": "yes"}, "headers"),
        ((Limit(1.0),), {"burst": 5}, "burst"),
        (("1/second", 0), {}, "burst"),
    ],
)
def test_bad_decorator_arguments_name_the_parameter(
    args: tuple[Any, ...], kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{param}\b"):
        tl_django.ratelimit(*args, **kwargs)


def test_decorating_something_else_names_the_view() -> None:
    decorate = tl_django.ratelimit("1/second")
    with pytest.raises(TypeError, match=r"^view\b"):
        decorate(int)
    with pytest.raises(TypeError, match=r"^view\b"):
        decorate(42)


# -- settings and system checks ----------------------------------------------------------------
GOOD = {"URL": "memory://", "LIMIT": "3/minute"}


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (GOOD, []),
        ({**GOOD, "URL": "mysql://db/0"}, ["tokenlimit.E002"]),
        ({**GOOD, "URL": 6379}, ["tokenlimit.E002"]),
        ({**GOOD, "LIMIT": "ten a minute"}, ["tokenlimit.E003"]),
        ({**GOOD, "LIMIT": ["3/minute", 7]}, ["tokenlimit.E003"]),
        ({"URL": "memory://"}, ["tokenlimit.E003"]),  # the middleware needs a limit
        ({**GOOD, "KEY": "django_project.keys.missing"}, ["tokenlimit.E004"]),
        ({**GOOD, "KEY": "no_such_module.key"}, ["tokenlimit.E004"]),
        ({**GOOD, "KEY": "django_project.keys.NOT_CALLABLE"}, ["tokenlimit.E004"]),
        ({**GOOD, "FAILURE_MODE": "sometimes"}, ["tokenlimit.E005"]),
        ({**GOOD, "TRUSTED_PROXIES": ["10.0.0.0/33"]}, ["tokenlimit.E006"]),
        ({**GOOD, "TRUSTED_PROXIES": -1}, ["tokenlimit.E006"]),
        ({**GOOD, "TRUSTED_PROXIES": True}, ["tokenlimit.E006"]),
        ({**GOOD, "EXEMPT": ["health"]}, ["tokenlimit.E007"]),
        ({**GOOD, "HEADERS": "yes"}, ["tokenlimit.E008"]),
        ({**GOOD, "PREFIX": "a{b}"}, ["tokenlimit.E009"]),
        ({**GOOD, "TIMEOUT": 0}, ["tokenlimit.E010"]),
        ({**GOOD, "API_KEY_HEADER": ""}, ["tokenlimit.E011"]),
        ({**GOOD, "IPV6_PREFIX": 129}, ["tokenlimit.E012"]),
        ({**GOOD, "API_KEY_VALIDATOR": "django_project.keys.NOT_CALLABLE"}, ["tokenlimit.E015"]),
        ({**GOOD, "API_KEY_VALIDATOR": "django_project.keys.missing"}, ["tokenlimit.E015"]),
        ({**GOOD, "ENABLED": "no"}, ["tokenlimit.E016"]),
        ({**GOOD, "LIMITS": "3/minute"}, ["tokenlimit.W001"]),
        ({"LIMIT": "3/minute"}, ["tokenlimit.W002"]),
        ("redis://localhost", ["tokenlimit.E001"]),
        (
            {"URL": "ftp://x", "LIMIT": "x", "FAILURE_MODE": "", "TRUSTED_PROXIES": "nope"},
            ["tokenlimit.E002", "tokenlimit.E003", "tokenlimit.E005", "tokenlimit.E006"],
        ),
    ],
)
def test_checks_report_each_bad_setting(
    setting: Any, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)  # else no W002: it names the store
    with override_settings(TOKENLIMIT=setting):
        messages = checks.run_checks(tags=["tokenlimit"])
    assert sorted(m.id for m in messages) == expected
    for message in messages:
        assert message.msg.startswith("settings.TOKENLIMIT")


def test_check_names_the_setting_and_the_problem() -> None:
    with override_settings(TOKENLIMIT={**GOOD, "LIMIT": "ten a minute"}):
        (message,) = checks.run_checks(tags=["tokenlimit"])
    assert message.is_serious()
    assert "settings.TOKENLIMIT['LIMIT']" in message.msg
    assert "ten a minute" in message.msg


def test_check_warns_when_the_middleware_cannot_see_the_user() -> None:
    auth = "django.contrib.auth.middleware.AuthenticationMiddleware"
    with override_settings(MIDDLEWARE=[MIDDLEWARE, auth]):
        ids = [m.id for m in checks.run_checks(tags=["tokenlimit"])]
    assert ids == ["tokenlimit.W003"]
    with override_settings(MIDDLEWARE=[auth, MIDDLEWARE]):
        assert checks.run_checks(tags=["tokenlimit"]) == []


def test_manage_check_fails_on_a_bad_setting() -> None:
    bad = override_settings(TOKENLIMIT={**GOOD, "FAILURE_MODE": "maybe"})
    with bad, pytest.raises(SystemCheckError, match=r"tokenlimit\.E005"):
        call_command("check")
    call_command("check")  # and passes once it is fixed


@pytest.mark.parametrize(
    ("setting", "check_id"),
    [
        ({"URL": "memory://"}, "E003"),
        ({**GOOD, "LIMIT": "bogus"}, "E003"),
        ({**GOOD, "URL": "redis://h:port/0"}, "E002"),
    ],
)
def test_middleware_refuses_to_start_on_a_bad_setting(setting: Any, check_id: str) -> None:
    with override_settings(TOKENLIMIT=setting), pytest.raises(ImproperlyConfigured, match=check_id):
        Client().get("/plain")


def test_settings_changes_take_effect() -> None:
    with tokenlimit(LIMIT="1/minute"):
        assert codes(fetch("sync", "/plain", 2)) == [200, 429]
    with tokenlimit(LIMIT="2/minute"):  # a new store, a new limit
        assert codes(fetch("sync", "/plain", 3)) == [200, 200, 429]


def test_app_config_entry() -> None:
    from django.apps import AppConfig

    config = AppConfig.create("tokenlimit.integrations.django.TokenLimitConfig")
    assert config.label == "tokenlimit"
    assert AppConfig.create("tokenlimit.integrations.django").name == (
        "tokenlimit.integrations.django"
    )


# -- ENABLED, the store from the environment, request.tokenlimit, django-ratelimit's settings ---
def _reported(request: Any) -> HttpResponse:
    """What ``request.tokenlimit`` says, as JSON (null where nothing was decided)."""
    decision = request.tokenlimit
    shown = None
    if decision is not None:
        parts = len(decision.details) or 1
        shown = {"limit": decision.limit, "remaining": decision.remaining, "parts": parts}
    return HttpResponse(json.dumps(shown), content_type="application/json")


async def _areported(request: Any) -> HttpResponse:
    return _reported(request)


@contextmanager
def reporting_urls() -> Iterator[None]:
    """``/plain`` (the middleware's limit only), ``/own`` (and a 2/minute of its own),
    ``/health`` (exempt), each answering what ``request.tokenlimit`` says."""
    from django.urls import path

    urls = types.ModuleType("reporting_urls")
    urls.urlpatterns = [  # type: ignore[attr-defined]
        path("plain", _reported),
        path("own", tl_django.ratelimit("2/minute")(_areported)),
        path("health", _reported),
    ]
    with override_settings(ROOT_URLCONF=urls):
        yield


def test_request_tokenlimit_is_the_combined_decision(mode: str) -> None:
    with tokenlimit(EXEMPT=["/health"]), reporting_urls():
        assert [r.json() for r in fetch(mode, "/plain", 1)] == [
            {"limit": 3, "remaining": 2, "parts": 1}
        ]
        # The middleware's 3/minute and the view's 2/minute, one token left in each: the
        # middleware's, further from full, is the most restrictive.
        assert [r.json() for r in fetch(mode, "/own", 1)] == [
            {"limit": 3, "remaining": 1, "parts": 2}
        ]
        assert [r.json() for r in fetch(mode, "/health", 1)] == [None]
    with tokenlimit(), local_urls(own=tl_django.ratelimit("2/minute")(_reported)):
        assert [r.json() for r in fetch(mode, "/own", 1)] == [
            {"limit": 2, "remaining": 1, "parts": 1}
        ]


def test_enabled_false_checks_nothing(mode: str) -> None:
    with tokenlimit(LIMIT="1/minute", ENABLED=False), reporting_urls():
        for path in ("/plain", "/own"):
            responses = fetch(mode, path, 3)
            assert codes(responses) == [200, 200, 200]
            assert all(not rate_headers(r) for r in responses)
            assert [r.json() for r in responses] == [None] * 3
        assert remaining("ip:127.0.0.1", "1/minute") == 1  # nothing charged
    with tokenlimit(LIMIT="1/minute", ENABLED=True), reporting_urls():
        assert codes(fetch(mode, "/plain", 2)) == [200, 429]


@pytest.mark.parametrize("value", ["false", 0, None])
def test_enabled_must_be_a_bool(value: Any) -> None:
    with override_settings(TOKENLIMIT={**GOOD, "ENABLED": value}):
        messages = checks.run_checks(tags=["tokenlimit"])
    assert [m.id for m in messages] == ["tokenlimit.E016"]
    assert "ENABLED" in messages[0].msg


def test_url_from_the_environment(
    standalone: Any, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No URL entry: the environment's TOKENLIMIT_URL, as for the default limiter."""
    monkeypatch.setenv("TOKENLIMIT_URL", standalone.url)
    with override_settings(TOKENLIMIT={"LIMIT": "2/minute"}):
        assert checks.run_checks(tags=["tokenlimit"]) == []  # no W002: it names a server
        assert codes(fetch(mode, "/plain", 3)) == [200, 200, 429]
    with RateLimiter.from_url(standalone.url) as shared:
        assert shared.peek("ip:127.0.0.1", Limit.parse("2/minute")).remaining == 0
    # The URL entry wins over the environment.
    with override_settings(TOKENLIMIT={"URL": "memory://", "LIMIT": "2/minute"}):
        assert codes(fetch(mode, "/plain", 2)) == [200, 200]


def test_url_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENLIMIT_URL", "mysql://db/0")
    with override_settings(TOKENLIMIT={"LIMIT": "2/minute"}):
        messages = checks.run_checks(tags=["tokenlimit"])
        assert [m.id for m in messages] == ["tokenlimit.E002"]
        assert "TOKENLIMIT_URL" in messages[0].msg
    monkeypatch.delenv("TOKENLIMIT_URL")
    with override_settings(TOKENLIMIT={"LIMIT": "2/minute"}):
        assert [m.id for m in checks.run_checks(tags=["tokenlimit"])] == ["tokenlimit.W002"]


@pytest.mark.parametrize(
    ("setting", "ours"),
    [
        ("RATELIMIT_ENABLE", 'TOKENLIMIT["ENABLED"]'),
        ("RATELIMIT_USE_CACHE", 'TOKENLIMIT["URL"]'),
        ("RATELIMIT_FAIL_OPEN", 'TOKENLIMIT["FAILURE_MODE"] = "open"'),
        ("RATELIMIT_IPV6_MASK", 'TOKENLIMIT["IPV6_PREFIX"]'),
    ],
)
def test_django_ratelimit_settings_are_named_with_ours(setting: str, ours: str) -> None:
    with override_settings(**{setting: False}):
        messages = checks.run_checks(tags=["tokenlimit"])
    assert [m.id for m in messages] == ["tokenlimit.W004"]
    assert setting in messages[0].msg
    assert ours in messages[0].hint
