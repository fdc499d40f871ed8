"""The Flask extension, through Flask's own test client, on memory:// and every real server."""

from __future__ import annotations

import functools
import json
import math
import secrets
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("flask")
pytest.importorskip("asgiref")  # async views

import http_sfv
from flask import Blueprint, Flask, g, request
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

import tokenlimit
from servers import free_port
from tokenlimit import AsyncRateLimiter, ConfigError, Limit, RateLimiter
from tokenlimit.integrations.flask import TokenLimit

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                "RateLimit-Policy", "RateLimit")  # fmt: skip
PEER = "203.0.113.7"


@pytest.fixture
def memory() -> Iterator[RateLimiter]:
    """For tests of identity and options, where the store does not matter."""
    with RateLimiter.from_url("memory://") as lim:
        yield lim


def hit(client: FlaskClient, path: str = "/", ip: str = PEER, **headers: str) -> TestResponse:
    return client.get(path, headers=headers, environ_base={"REMOTE_ADDR": ip})


def statuses(client: FlaskClient, n: int, path: str = "/", **kwargs: Any) -> list[int]:
    codes = []
    for _ in range(n):
        with hit(client, path, **kwargs) as response:  # closes static files' handles
            codes.append(response.status_code)
    return codes


def app_with(limiter: RateLimiter | None, **options: Any) -> tuple[Flask, TokenLimit]:
    """An app with ``/`` (default limit) and the extension applied to it."""
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=limiter, **options)

    @app.get("/")
    def index() -> dict[str, bool]:
        return {"ok": True}

    return app, ext


def sf_list(value: str) -> list[tuple[Any, dict[str, Any]]]:
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


# -- on every backend ------------------------------------------------------------------------
def test_allowed_then_refused_at_exactly_the_burst(limiter: RateLimiter) -> None:
    app, _ = app_with(limiter, limit=Limit.per_hour(3, name="api"))
    client = app.test_client()

    first = hit(client)
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit"] == "3"
    assert first.headers["X-RateLimit-Remaining"] == "2"
    # Unix seconds when full again: one token owed, 1200 s at 3 per hour
    assert abs(int(first.headers["X-RateLimit-Reset"]) - (time.time() + 1200)) <= 5
    assert sf_list(first.headers["RateLimit-Policy"]) == [("api", {"q": 3, "w": 3600})]
    assert sf_list(first.headers["RateLimit"]) == [("api", {"r": 2, "t": 1200})]
    assert "Retry-After" not in first.headers

    assert [hit(client).headers["X-RateLimit-Remaining"] for _ in range(2)] == ["1", "0"]

    refused = hit(client)
    assert refused.status_code == 429
    assert refused.mimetype == "application/json"
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert sf_list(refused.headers["RateLimit-Policy"]) == [("api", {"q": 3, "w": 3600})]
    assert sf_list(refused.headers["RateLimit"]) == [("api", {"r": 0, "t": 3600})]
    # One token comes back every 1200 s; a little of that has passed: ceil gives 1200.
    assert refused.headers["Retry-After"] == "1200"
    assert refused.get_json() == {"detail": "rate limit exceeded", "retry_after": 1200}


def test_retry_after_rounds_up_whole_seconds(limiter: RateLimiter) -> None:
    app, _ = app_with(limiter, limit=Limit(0.4, 1))  # one token every 2.5 s
    client = app.test_client()
    assert statuses(client, 2) == [200, 429]
    refused = hit(client)
    retry_after = int(refused.headers["Retry-After"])
    assert retry_after == 3  # ceil(2.5 - elapsed), never 2 while under half a second passed
    assert refused.get_json()["retry_after"] == retry_after


def test_several_default_limits_all_reported(limiter: RateLimiter) -> None:
    limits = [Limit.per_second(5, name="burst"), Limit.per_hour(2, name="hourly")]
    app, _ = app_with(limiter, limit=limits)
    client = app.test_client()
    response = hit(client)
    assert sf_list(response.headers["RateLimit-Policy"]) == [
        ("burst", {"q": 5, "w": 1}),
        ("hourly", {"q": 2, "w": 3600}),
    ]
    assert sf_list(response.headers["RateLimit"]) == [
        ("burst", {"r": 4, "t": 1}),
        ("hourly", {"r": 1, "t": 1800}),
    ]
    assert response.headers["X-RateLimit-Limit"] == "2"  # the most restrictive
    assert statuses(client, 2) == [200, 429]


def test_sync_and_async_views(limiter: RateLimiter) -> None:
    app, ext = app_with(limiter, limit="2/hour")

    @app.get("/async")
    async def default_async() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/async-own")
    @ext.limit("3/hour")
    async def own_async() -> dict[str, bool]:
        return {"ok": True}

    client = app.test_client()
    assert statuses(client, 3, "/async") == [200, 200, 429]
    assert statuses(client, 1, "/") == [429]  # the default bucket is shared with "/"
    assert statuses(client, 4, "/async-own") == [200, 200, 200, 429]
    assert hit(client, "/async-own").headers["Retry-After"] == "1200"


def test_view_limit_replaces_default_with_its_own_bucket(limiter: RateLimiter) -> None:
    app, ext = app_with(limiter, limit="2/hour")

    @app.get("/a")
    @ext.limit("3/hour")
    def a() -> str:
        return "a"

    @app.get("/b")
    @ext.limit("3/hour")  # the same limit as /a, and still its own bucket
    def b() -> str:
        return "b"

    client = app.test_client()
    assert statuses(client, 4, "/a") == [200, 200, 200, 429]
    assert sf_list(hit(client, "/a").headers["RateLimit-Policy"])[0][1] == {"q": 3, "w": 3600}
    assert statuses(client, 4, "/b") == [200, 200, 200, 429]
    assert statuses(client, 3, "/") == [200, 200, 429]  # /a and /b took nothing from the default


def made_up_keys(client: FlaskClient, n: int = 6) -> list[int]:
    """``n`` requests from one IP, each with an API key never seen before."""
    return [hit(client, **{"X-API-Key": secrets.token_hex(8)}).status_code for _ in range(n)]


def test_made_up_api_keys_choose_no_bucket_by_default(memory: RateLimiter) -> None:
    # The API-key step is off unless the app vouches for keys: one client, one bucket.
    app, _ = app_with(memory, limit=Limit.per_hour(3))
    assert made_up_keys(app.test_client()) == [200, 200, 200, 429, 429, 429]
    assert memory.peek(f"ip:{PEER}", Limit.per_hour(3)).remaining == 0


def test_api_key_header_from_config(memory: RateLimiter) -> None:
    app = Flask(__name__)
    app.config["TOKENLIMIT_API_KEY_HEADER"] = "X-API-Key"
    TokenLimit(app, limiter=memory, limit="1/hour")
    app.add_url_rule("/", "index", lambda: "ok")
    client = app.test_client()
    assert hit(client, **{"X-API-Key": "k-one"}).status_code == 200
    assert hit(client, **{"X-API-Key": "k-two"}).status_code == 200
    assert hit(client, **{"X-API-Key": "k-one"}).status_code == 429


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_api_key_validator_sends_unknown_keys_to_the_ip(memory: RateLimiter, kind: str) -> None:
    def known(key: str) -> bool:
        return key in {"sk-known-1", "sk-known-2"}

    async def aknown(key: str) -> bool:
        return known(key)

    # With a validator and no header name, the header is X-API-Key.
    app, _ = app_with(
        memory, limit=Limit.per_hour(3), api_key_validator=known if kind == "sync" else aknown
    )
    client = app.test_client()
    assert made_up_keys(client) == [200, 200, 200, 429, 429, 429]
    assert statuses(client, 4, **{"X-API-Key": "sk-known-1"}) == [200, 200, 200, 429]
    assert statuses(client, 1, **{"X-API-Key": "sk-known-2"}) == [200]


def test_api_key_is_the_identity(limiter: RateLimiter) -> None:
    app, _ = app_with(limiter, limit="1/hour", api_key_header="X-API-Key")
    client = app.test_client()
    assert hit(client, **{"X-API-Key": "k-one"}).status_code == 200
    assert hit(client, **{"X-API-Key": "k-one"}, ip="198.51.100.1").status_code == 429
    assert hit(client, **{"X-API-Key": "k-two"}).status_code == 200
    assert hit(client).status_code == 200  # no key: the IP, a bucket of its own


def test_raw_api_key_reaches_no_redis_key_header_or_body(standalone: Any) -> None:
    secret = "sk_live_S3CRET-do-not-store"
    with RateLimiter.from_url(standalone.url, timeout=5) as lim:
        app, _ = app_with(lim, limit="1/hour", api_key_header="X-API-Key")
        client = app.test_client()
        responses = [hit(client, **{"X-API-Key": secret}) for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 429]
    with standalone.client() as redis_client:
        keys = [k.decode("utf-8", "replace") for k in redis_client.scan_iter(count=1000)]
    assert keys  # the bucket is stored
    assert not any(secret in k or PEER in k for k in keys)
    for response in responses:
        shown = json.dumps(dict(response.headers)) + response.get_data(as_text=True)
        assert secret not in shown
        assert "apikey" not in shown
        assert PEER not in shown


def test_rate_limit_exceeded_inside_a_view_answers_429(limiter: RateLimiter) -> None:
    app, _ = app_with(limiter)

    @app.get("/sync")
    @limiter.limit("1/hour", key="sync")
    def sync_view() -> str:
        return "ok"

    @app.get("/async")
    @limiter.limit(limit=Limit.per_hour(1, name="job"), key="async")
    async def async_view() -> str:
        return "ok"

    client = app.test_client()
    for path in ("/sync", "/async"):
        first, refused = hit(client, path), hit(client, path)
        assert first.status_code == 200
        assert not any(name in first.headers for name in RATE_HEADERS)  # no extension limit here
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "3600"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert refused.get_json() == {"detail": "rate limit exceeded", "retry_after": 3600}
    assert sf_list(hit(client, "/async").headers["RateLimit"]) == [("job", {"r": 0, "t": 3600})]


# -- identity -------------------------------------------------------------------------------
def test_client_ip_is_the_identity_and_spoofed_forwarded_for_is_ignored(
    memory: RateLimiter,
) -> None:
    app, _ = app_with(memory, limit="1/hour")
    client = app.test_client()
    assert hit(client).status_code == 200
    assert hit(client, ip="203.0.113.8").status_code == 200
    # No trusted proxies: a client cannot mint new identities with the header.
    assert hit(client, **{"X-Forwarded-For": "198.51.100.1"}).status_code == 429
    assert hit(client, **{"X-Forwarded-For": "198.51.100.2"}).status_code == 429


def test_trusted_proxies_hop_count(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="1/hour", trusted_proxies=1)
    client = app.test_client()
    proxy = "10.0.0.1"
    assert hit(client, ip=proxy, **{"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert hit(client, ip=proxy, **{"X-Forwarded-For": "198.51.100.2"}).status_code == 200
    # What the client wrote left of its own address is not believed.
    spoofed = {"X-Forwarded-For": "192.0.2.99, 198.51.100.1"}
    assert hit(client, ip=proxy, **spoofed).status_code == 429
    assert hit(client, ip="10.0.0.2", **{"X-Forwarded-For": "198.51.100.1"}).status_code == 429


def test_trusted_proxies_cidr_list(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="1/hour", trusted_proxies=["10.0.0.0/8"])
    client = app.test_client()
    via_proxy = {"X-Forwarded-For": "198.51.100.1, 10.1.2.3"}  # the client, then an inner proxy
    assert hit(client, ip="10.0.0.1", **via_proxy).status_code == 200
    assert hit(client, ip="10.0.0.1", **{"X-Forwarded-For": "198.51.100.1"}).status_code == 429
    assert hit(client, ip="10.9.9.9", **{"X-Forwarded-For": "198.51.100.2"}).status_code == 200
    # An untrusted peer's header is ignored: the peer itself is the client.
    untrusted = {"X-Forwarded-For": "198.51.100.3"}
    assert hit(client, ip="192.0.2.50", **untrusted).status_code == 200
    assert hit(client, ip="192.0.2.50", **{"X-Forwarded-For": "198.51.100.4"}).status_code == 429


@pytest.mark.parametrize("trusted", [None, ["10.0.0.0/8"]], ids=["no-proxies", "cidrs"])
@pytest.mark.parametrize("remote", ["", None], ids=["empty", "absent"])
def test_a_unix_socket_peer_is_a_local_proxy(
    memory: RateLimiter, remote: str | None, trusted: Any
) -> None:
    # gunicorn on a unix socket: REMOTE_ADDR is "" (other servers leave it out).
    app, _ = app_with(memory, limit="1/hour", trusted_proxies=trusted)
    inner = app.wsgi_app

    def unix_socket(environ: dict[str, Any], start_response: Any) -> Any:
        environ.pop("REMOTE_ADDR", None)
        if remote is not None:
            environ["REMOTE_ADDR"] = remote
        return inner(environ, start_response)

    app.wsgi_app = unix_socket  # type: ignore[method-assign]
    client = app.test_client()
    alice = {"X-Forwarded-For": "198.51.100.7"}
    bob = {"X-Forwarded-For": "6.6.6.6, 203.0.113.5"}  # what bob wrote is not believed
    assert [client.get("/", headers=alice).status_code for _ in range(2)] == [200, 429]
    assert [client.get("/", headers=bob).status_code for _ in range(2)] == [200, 429]
    assert client.get("/", headers={"X-Forwarded-For": "6.6.6.6"}).status_code == 200
    assert memory.peek("ip:unknown", Limit.parse("1/hour")).remaining == 1


def test_forwarded_for_over_several_header_lines(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="1/hour", trusted_proxies=["10.0.0.0/8"])
    client = app.test_client()
    lines = [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.1.1.1")]
    environ = {"REMOTE_ADDR": "10.0.0.1"}
    assert client.get("/", headers=lines, environ_base=environ).status_code == 200
    assert hit(client, ip="10.0.0.1", **{"X-Forwarded-For": "198.51.100.1"}).status_code == 429


def test_ipv6_clients_group_by_64(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="1/hour")
    client = app.test_client()
    assert hit(client, ip="2001:db8:1:2::1").status_code == 200
    assert hit(client, ip="2001:db8:1:2:ffff:ffff:ffff:fffe").status_code == 429
    assert hit(client, ip="2001:db8:1:3::1").status_code == 200


def test_custom_key_and_fallback_to_default_identity(memory: RateLimiter) -> None:
    seen: list[Any] = []

    def tenant(req: Any) -> str | None:
        seen.append(req.path)
        return req.args.get("tenant")

    app, _ = app_with(memory, limit="1/hour", key=tenant)
    client = app.test_client()
    assert hit(client, "/?tenant=a").status_code == 200
    assert hit(client, "/?tenant=a", ip="198.51.100.1").status_code == 429  # same tenant
    assert hit(client, "/?tenant=b").status_code == 200
    assert hit(client, "/").status_code == 200  # None: the IP
    assert hit(client, "/").status_code == 429
    assert seen == ["/"] * 5  # called once per request, with the request


def test_custom_key_returning_empty_means_the_default_identity(memory: RateLimiter) -> None:
    # One rule in every integration: None or "" from a key function means the default identity.
    async def aempty(req: Any) -> str:
        return ""

    app, ext = app_with(memory, limit="1/hour", key=lambda req: "")

    @app.get("/own")
    @ext.limit("1/hour", key=aempty)
    def own() -> str:
        return "ok"

    client = app.test_client()
    assert statuses(client, 2) == [200, 429]
    assert statuses(client, 2, "/own") == [200, 429]
    assert statuses(client, 1, ip="198.51.100.1") == [200]  # another IP, another bucket


def test_view_key_falls_back_to_the_extension_key(memory: RateLimiter) -> None:
    async def tenant(req: Any) -> str | None:  # async key functions run through ensure_sync
        return req.headers.get("X-Tenant")

    app, ext = app_with(memory, key=tenant)

    @app.get("/own")
    @ext.limit("1/hour", key=lambda req: req.args.get("project"))
    def own() -> str:
        return "ok"

    client = app.test_client()
    assert hit(client, "/own?project=p", **{"X-Tenant": "t"}).status_code == 200
    assert hit(client, "/own?project=p", **{"X-Tenant": "u"}).status_code == 429
    assert hit(client, "/own", **{"X-Tenant": "t"}).status_code == 200  # no project: the tenant
    assert hit(client, "/own", **{"X-Tenant": "t"}, ip="192.0.2.1").status_code == 429
    assert hit(client, "/own").status_code == 200  # neither: the IP


def test_user_identity(memory: RateLimiter) -> None:
    def user(req: Any) -> str | None:
        return req.headers.get("X-User")

    app, _ = app_with(memory, limit="1/hour", user=user, api_key_header="X-API-Key")
    client = app.test_client()
    assert hit(client, **{"X-User": "alice"}).status_code == 200
    assert hit(client, **{"X-User": "alice"}, ip="198.51.100.1").status_code == 429
    assert hit(client, **{"X-User": "bob"}).status_code == 200
    assert hit(client, **{"X-User": "bob", "X-API-Key": "k"}).status_code == 200  # key first


def test_user_from_flask_g(memory: RateLimiter) -> None:
    app = Flask(__name__)

    @app.before_request
    def authenticate() -> None:  # registered before init_app: runs first
        g.user_id = request.headers.get("X-User")

    TokenLimit(app, limiter=memory, limit="1/hour")
    app.add_url_rule("/", "index", lambda: "ok")
    client = app.test_client()
    assert hit(client, **{"X-User": "7"}).status_code == 200
    assert hit(client, **{"X-User": "7"}, ip="198.51.100.1").status_code == 429
    assert hit(client).status_code == 200  # anonymous: by IP


def test_user_from_flask_login(memory: RateLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
    class User:
        is_authenticated = True

        def get_id(self) -> str:
            return request.headers["X-User"]

    fake = types.ModuleType("flask_login")
    fake.current_user = User()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flask_login", fake)
    app, _ = app_with(memory, limit="1/hour")
    app.login_manager = object()  # type: ignore[attr-defined]
    client = app.test_client()
    assert hit(client, **{"X-User": "42"}).status_code == 200
    assert hit(client, **{"X-User": "42"}, ip="198.51.100.1").status_code == 429
    assert hit(client, **{"X-User": "43"}).status_code == 200


# -- what is limited --------------------------------------------------------------------------
def test_exempt_paths_and_views(memory: RateLimiter) -> None:
    app, ext = app_with(memory, limit="1/hour", exempt=["/health"])
    for path in ("/health", "/health/deep", "/healthy"):
        app.add_url_rule(path, path, lambda: "ok")

    @app.get("/open")
    @ext.exempt
    def open_view() -> str:
        return "ok"

    client = app.test_client()
    assert statuses(client, 2) == [200, 429]
    for path in ("/health", "/health/deep", "/open"):
        response = hit(client, path)
        assert response.status_code == 200
        assert not any(name in response.headers for name in RATE_HEADERS)
    assert hit(client, "/healthy").status_code == 429  # a prefix of a segment is not under it


def test_a_view_limit_applies_under_an_exempt_path(memory: RateLimiter) -> None:
    app, ext = app_with(memory, limit="1/hour", exempt=["/admin"])

    @app.get("/admin/export")
    @ext.limit("2/hour")
    def export() -> str:
        return "ok"

    assert statuses(app.test_client(), 3, "/admin/export") == [200, 200, 429]


def test_without_a_default_only_decorated_views_are_limited(memory: RateLimiter) -> None:
    app, ext = app_with(memory)

    @app.get("/limited")
    @ext.limit("1/hour")
    def limited() -> str:
        return "ok"

    client = app.test_client()
    assert statuses(client, 3) == [200, 200, 200]
    assert not any(name in hit(client).headers for name in RATE_HEADERS)
    assert statuses(client, 2, "/limited") == [200, 429]


def test_unrouted_and_static_requests_are_not_limited(memory: RateLimiter, tmp_path: Any) -> None:
    (tmp_path / "app.css").write_text("body {}")
    app = Flask(__name__, static_folder=str(tmp_path), static_url_path="/static")
    TokenLimit(app, limiter=memory, limit="1/hour")
    client = app.test_client()
    assert statuses(client, 2, "/nowhere") == [404, 404]
    assert statuses(client, 2, "/static/app.css") == [200, 200]


def test_shared_scope_and_view_key_and_cost(memory: RateLimiter) -> None:
    app, ext = app_with(memory)

    @app.get("/one")
    @ext.limit("4/hour", scope="reports", cost=2)
    def one() -> str:
        return "ok"

    @app.get("/two")
    @ext.limit("4/hour", scope="reports", cost=2)
    def two() -> str:
        return "ok"

    @app.get("/org/<org>")
    @ext.limit("1/hour", key=lambda req: f"org:{req.view_args['org']}")
    def org(org: str) -> str:
        return org

    client = app.test_client()
    assert statuses(client, 1, "/one") + statuses(client, 2, "/two") == [200, 200, 429]
    assert hit(client, "/org/x").status_code == 200
    assert hit(client, "/org/x", ip="198.51.100.1").status_code == 429
    assert hit(client, "/org/y").status_code == 200


def test_view_buckets_are_named_after_the_endpoint_or_the_scope(memory: RateLimiter) -> None:
    # One rule in every integration: route:<route>|<identity>, or scope:<name>|<identity>.
    # In Flask the route is the endpoint (a blueprint's is "blueprint.view").
    app, ext = app_with(memory)
    shop = Blueprint("shop", __name__)
    shop.add_url_rule("/search", "search", ext.limit("2/hour")(lambda: "ok"))
    app.add_url_rule("/search", "search_all", ext.limit("2/hour")(lambda: "ok"))
    app.add_url_rule("/report", "report", ext.limit("2/hour", scope="reports")(lambda: "ok"))
    app.register_blueprint(shop, url_prefix="/shop")
    client = app.test_client()
    assert statuses(client, 3, "/shop/search") == [200, 200, 429]
    assert statuses(client, 1, "/search") + statuses(client, 1, "/report") == [200, 200]
    two = Limit.parse("2/hour")
    assert memory.peek(f"route:shop.search|ip:{PEER}", two).remaining == 0
    assert memory.peek(f"route:search_all|ip:{PEER}", two).remaining == 1
    assert memory.peek(f"scope:reports|ip:{PEER}", two).remaining == 1
    with pytest.raises(ConfigError, match=r"^scope\b"):
        ext.limit("1/hour", scope="a|b")


def test_default_and_view_limit_never_charge_one_bucket_twice(memory: RateLimiter) -> None:
    # The same Limit as the default and on a view: the view's replaces the default there, so a
    # request takes one token, from the view's own bucket.
    three = Limit.per_hour(3, name="three")
    app, ext = app_with(memory, limit=three)

    @app.get("/own")
    @ext.limit(three)
    def own() -> str:
        return "ok"

    client = app.test_client()
    assert statuses(client, 4, "/own") == [200, 200, 200, 429]
    assert memory.peek(f"route:own|ip:{PEER}", three).remaining == 0
    assert memory.peek(f"ip:{PEER}", three).remaining == 3
    assert statuses(client, 4) == [200, 200, 200, 429]


def test_an_async_chooser_object_runs_from_sync_flask(memory: RateLimiter) -> None:
    # A chooser may be an object whose __call__ is a coroutine function: Flask runs it.
    class Plans:
        async def __call__(self, request: Any) -> Limit:
            return Limit.per_hour(2, name="plan")

    app, ext = app_with(memory)

    @app.get("/planned")
    @ext.limit(Plans())
    def planned() -> str:
        return "ok"

    client = app.test_client()
    assert statuses(client, 3, "/planned") == [200, 200, 429]
    assert hit(client, "/planned").headers["RateLimit-Policy"] == '"plan";q=2;w=3600'


def test_decorator_order_and_wrapping_views(memory: RateLimiter) -> None:
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=memory)

    def wrapped(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)

        return wrapper

    @ext.limit("1/hour")  # above the route: marks the same function Flask registered
    @app.get("/above")
    def above() -> str:
        return "ok"

    @app.get("/inner")
    @wrapped
    @ext.limit("1/hour")  # under another decorator: found through __wrapped__
    def inner() -> str:
        return "ok"

    client = app.test_client()
    assert statuses(client, 2, "/above") == [200, 429]
    assert statuses(client, 2, "/inner") == [200, 429]


def test_view_sees_the_decision_on_g(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="5/hour")

    @app.get("/me")
    def me() -> dict[str, int]:
        return {"remaining": g.tokenlimit_decision.remaining}

    assert hit(app.test_client(), "/me").get_json() == {"remaining": 4}


def test_custom_429_handler_keeps_the_headers(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="1/hour")

    @app.errorhandler(tokenlimit.RateLimitExceeded)
    def slow_down(error: tokenlimit.RateLimitExceeded) -> tuple[str, int]:
        return f"slow down for {math.ceil(error.retry_after)} s", 429

    client = app.test_client()
    hit(client)
    refused = hit(client)
    assert refused.status_code == 429
    assert refused.get_data(as_text=True) == "slow down for 3600 s"
    assert refused.headers["Retry-After"] == "3600"
    assert refused.headers["X-RateLimit-Remaining"] == "0"


def test_custom_handler_for_a_view_refusal_gets_no_stale_headers(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="5/hour")

    @app.get("/job")
    @memory.limit("1/hour", key="job")
    def job() -> str:
        return "ok"

    @app.errorhandler(tokenlimit.RateLimitExceeded)
    def busy(error: tokenlimit.RateLimitExceeded) -> tuple[str, int]:
        return "busy", 429

    client = app.test_client()
    assert hit(client, "/job").headers["X-RateLimit-Remaining"] == "4"  # the default's
    refused = hit(client, "/job")
    assert refused.status_code == 429
    assert "X-RateLimit-Remaining" not in refused.headers  # not the default's "3"


# -- storage failure --------------------------------------------------------------------------
def dead_limiter(failure_mode: str) -> RateLimiter:
    url = f"redis://127.0.0.1:{free_port()}/0"
    return RateLimiter.from_url(url, timeout=1, failure_mode=failure_mode)


def test_storage_down_closed_answers_503() -> None:
    with dead_limiter("closed") as dead:
        app, ext = app_with(dead, limit="10/minute")

        @app.get("/in-view")
        @ext.exempt
        @dead.limit("1/hour", key="x")
        def in_view() -> str:
            return "ok"

        client = app.test_client()
        for path in ("/", "/in-view"):
            response = hit(client, path)
            assert response.status_code == 503
            assert response.get_json() == {"detail": "rate limiter unavailable"}
            assert "Retry-After" not in response.headers
            assert not any(name in response.headers for name in RATE_HEADERS)
            shown = json.dumps(dict(response.headers)) + response.get_data(as_text=True)
            assert "127.0.0.1" not in shown
            assert "redis" not in shown.lower()


def test_storage_down_open_admits() -> None:
    with dead_limiter("open") as dead:
        app, _ = app_with(dead, limit="10/minute")
        response = hit(app.test_client())
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "10"


def test_failure_mode_from_config() -> None:
    app = Flask(__name__)
    app.config["TOKENLIMIT_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    app.config["TOKENLIMIT_FAILURE_MODE"] = "open"
    TokenLimit(app, limit="10/minute")
    app.add_url_rule("/", "index", lambda: "ok")
    assert hit(app.test_client()).status_code == 200


# -- options ----------------------------------------------------------------------------------
def test_headers_off(memory: RateLimiter) -> None:
    app, _ = app_with(memory, limit="1/hour", headers=False)
    client = app.test_client()
    allowed, refused = hit(client), hit(client)
    assert allowed.status_code == 200
    assert not any(name in allowed.headers for name in (*RATE_HEADERS, "Retry-After"))
    assert refused.status_code == 429
    assert not any(name in refused.headers for name in RATE_HEADERS)
    assert refused.headers["Retry-After"] == "3600"  # the refusal still says when
    assert refused.get_json()["retry_after"] == 3600


def test_app_factory_with_init_app(url: str) -> None:
    ext = TokenLimit(limit="1/hour", exempt=["/health"])

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["TOKENLIMIT_URL"] = url
        ext.init_app(app)

        @app.get("/")
        def index() -> str:
            return "ok"

        @app.get("/own")
        @ext.limit("2/hour")
        def own() -> str:
            return "ok"

        app.add_url_rule("/health", "health", lambda: "ok")
        return app

    app = create_app()
    client = app.test_client()
    assert statuses(client, 2) == [200, 429]
    assert statuses(client, 3, "/own") == [200, 200, 429]
    assert statuses(client, 2, "/health") == [200, 200]
    assert isinstance(app.extensions["tokenlimit"].limiter, RateLimiter)
    with pytest.raises(RuntimeError, match="already"):
        ext.init_app(app)
    # A second app from the same factory and the same store shares the budget, not the views.
    # A second app from the same factory: on a shared server it shares the budget (the same
    # identities and endpoints); memory:// is one store per limiter.
    second = create_app()
    other = second.test_client()
    if url == "memory://":
        assert statuses(other, 2) == [200, 429]
        assert statuses(other, 3, "/own") == [200, 200, 429]
    else:
        assert statuses(other, 1) == [429]
        assert statuses(other, 1, "/own") == [429]
    for each in (app, second):
        each.extensions["tokenlimit"].limiter.close()


def test_config_supplies_defaults_and_the_constructor_wins(memory: RateLimiter) -> None:
    app = Flask(__name__)
    app.config.update(
        TOKENLIMIT_LIMIT="1/hour",
        TOKENLIMIT_EXEMPT=["/health"],
        TOKENLIMIT_TRUSTED_PROXIES=["10.0.0.0/8"],
    )
    TokenLimit(app, limiter=memory)
    app.add_url_rule("/", "index", lambda: "ok")
    app.add_url_rule("/health", "health", lambda: "ok")
    client = app.test_client()
    forwarded = {"X-Forwarded-For": "198.51.100.1"}
    assert [hit(client, ip="10.0.0.1", **forwarded).status_code for _ in range(2)] == [200, 429]
    assert hit(client, ip="10.0.0.1").status_code == 200  # the proxy itself: another client
    assert statuses(client, 2, "/health") == [200, 200]

    wins = Flask(__name__)
    wins.config["TOKENLIMIT_LIMIT"] = "1/hour"
    TokenLimit(wins, limiter=memory, limit="3/hour")
    wins.add_url_rule("/", "index", lambda: "ok")
    assert statuses(wins.test_client(), 4, ip="192.0.2.1") == [200, 200, 200, 429]


def test_default_limiter_from_configure(memory: RateLimiter) -> None:
    tokenlimit.configure(memory)
    app, _ = app_with(None, limit="1/hour")
    assert statuses(app.test_client(), 2) == [200, 429]
    assert memory.peek("ip:203.0.113.7", Limit.parse("1/hour")).remaining == 0


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"limit": "lots"}, "limit"),
        ({"limit": 0}, "limit"),  # a number is a rate, as for rate_limit: 0 is not one
        ({"limit": b"5/second"}, "limit"),
        ({"limit": "1/hour", "burst": 0}, "burst"),
        ({"limit": Limit(1), "burst": 5}, "burst"),
        ({"limit": "1/hour", "cost": 2}, "cost"),
        ({"limit": "1/hour", "cost": 0}, "cost"),
        ({"key": "user"}, "key"),
        ({"user": "g.user"}, "user"),
        ({"exempt": ["health"]}, "exempt"),
        ({"exempt": 5}, "exempt"),
        ({"trusted_proxies": ["not-a-network"]}, "trusted_proxies"),
        ({"trusted_proxies": -1}, "trusted_proxies"),
        ({"trusted_proxies": True}, "trusted_proxies"),
        ({"headers": "yes"}, "headers"),
        ({"api_key_header": ""}, "api_key_header"),
        ({"api_key_validator": "myapp.known_key"}, "api_key_validator"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"limiter": "redis://localhost"}, "limiter"),
    ],
)
def test_bad_options_name_the_parameter(options: dict[str, Any], param: str) -> None:
    with pytest.raises((ConfigError, TypeError), match=param):
        TokenLimit(**options)


def test_async_limiter_is_a_type_error_naming_limiter() -> None:
    with pytest.raises(TypeError, match="limiter"):
        TokenLimit(limiter=AsyncRateLimiter.from_url("memory://"))


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("TOKENLIMIT_LIMIT", "lots"),
        ("TOKENLIMIT_EXEMPT", ["health"]),
        ("TOKENLIMIT_TRUSTED_PROXIES", ["nope"]),
        ("TOKENLIMIT_URL", 5),
    ],
)
def test_bad_config_names_the_setting(setting: str, value: Any) -> None:
    app = Flask(__name__)
    app.config[setting] = value
    with pytest.raises(ConfigError, match=setting):
        TokenLimit(app)


def test_bad_view_limits_name_the_parameter(memory: RateLimiter) -> None:
    ext = TokenLimit(limiter=memory)
    with pytest.raises(ConfigError, match="limit"):
        ext.limit("lots")
    with pytest.raises(ConfigError, match="cost"):
        ext.limit("1/hour", cost=2)
    with pytest.raises(ConfigError, match="burst"):
        ext.limit(Limit(1), burst=5)
    with pytest.raises(ConfigError, match="scope"):
        ext.limit("1/hour", scope="")
    with pytest.raises(TypeError, match="key"):
        ext.limit("1/hour", key="user")

    def view() -> str:
        return "ok"

    ext.limit("1/hour")(view)
    with pytest.raises(ConfigError, match="exempt"):
        ext.exempt(view)


# -- config: read when needed, incumbents' keys, the app's kill switch, g.tokenlimit -----------
def test_url_set_after_init_app_is_used(standalone: Any) -> None:
    """The factory pattern that loads config after ``init_app``: the first request reads it."""
    app = Flask(__name__)
    TokenLimit(app, limit="2/hour")
    app.add_url_rule("/", "index", lambda: "ok")
    app.config["TOKENLIMIT_URL"] = standalone.url  # after init_app
    try:
        assert statuses(app.test_client(), 3) == [200, 200, 429]
        with RateLimiter.from_url(standalone.url) as shared:
            assert shared.peek(f"ip:{PEER}", Limit.parse("2/hour")).remaining == 0
    finally:
        app.extensions["tokenlimit"].limiter.close()


def test_config_changed_between_init_app_and_the_first_request(url: str) -> None:
    app = Flask(__name__)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # would answer 503, were it still read
    app.config.update(TOKENLIMIT_URL=dead, TOKENLIMIT_LIMIT="5/hour")
    TokenLimit(app)
    first = app.extensions["tokenlimit"].limiter
    app.add_url_rule("/", "index", lambda: "ok")
    app.config.update(TOKENLIMIT_URL=url, TOKENLIMIT_LIMIT="1/hour", TOKENLIMIT_HEADERS=False)
    client = app.test_client()
    allowed, refused = hit(client), hit(client)
    assert (allowed.status_code, refused.status_code) == (200, 429)
    assert "X-RateLimit-Limit" not in allowed.headers  # TOKENLIMIT_HEADERS, read late too
    state = app.extensions["tokenlimit"]
    assert state.limiter is not first  # init_app's, for the old URL, is replaced
    # Read once: after the first request, the config is what it was then.
    app.config["TOKENLIMIT_LIMIT"] = "100/hour"
    assert hit(client).status_code == 429
    state.limiter.close()


def test_same_url_keeps_the_limiter_made_at_init_app(memory: RateLimiter) -> None:
    app = Flask(__name__)
    app.config.update(TOKENLIMIT_URL="memory://", TOKENLIMIT_LIMIT="5/hour")
    TokenLimit(app)
    first = app.extensions["tokenlimit"].limiter
    app.add_url_rule("/", "index", lambda: "ok")
    assert hit(app.test_client()).status_code == 200
    assert app.extensions["tokenlimit"].limiter is first


def test_without_a_url_the_default_limiter_reads_the_environment(
    standalone: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No TOKENLIMIT_URL in app.config: the default limiter, which reads the environment."""
    monkeypatch.setenv("TOKENLIMIT_URL", standalone.url)
    app, _ = app_with(None, limit="1/hour")
    assert statuses(app.test_client(), 2) == [200, 429]
    with RateLimiter.from_url(standalone.url) as shared:
        assert shared.peek(f"ip:{PEER}", Limit.parse("1/hour")).remaining == 0


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        ("RATELIMIT_DEFAULT", "TOKENLIMIT_LIMIT"),
        ("RATELIMIT_STORAGE_URI", "TOKENLIMIT_URL"),
        ("RATELIMIT_STORAGE_URL", "TOKENLIMIT_URL"),
        ("RATELIMIT_ENABLED", "TOKENLIMIT_ENABLED"),
        ("RATELIMIT_HEADERS_ENABLED", "TOKENLIMIT_HEADERS"),
        ("RATELIMIT_STRATEGY", "tokenlimit always uses a token bucket"),
        ("RATELIMIT_SWALLOW_ERRORS", "TOKENLIMIT_FAILURE_MODE"),
        ("RATELIMIT_HEADER_RESET", "header names are fixed"),
        ("RATELIMIT_META", "docs/migrating.md"),
    ],
)
def test_flask_limiter_keys_name_ours(key: str, ours: str) -> None:
    app = Flask(__name__)
    app.config[key] = "200 per day"
    with pytest.raises(ConfigError, match=key) as raised:
        TokenLimit(app, limit="1/hour")
    assert ours in str(raised.value)
    assert "flask-limiter" in str(raised.value)


def test_flask_limiter_keys_all_named_at_once() -> None:
    app = Flask(__name__)
    app.config.update(RATELIMIT_DEFAULT="200 per day", RATELIMIT_STORAGE_URI="redis://x")
    with pytest.raises(ConfigError) as raised:
        TokenLimit(app)
    message = str(raised.value)
    assert "TOKENLIMIT_LIMIT" in message
    assert "RATELIMIT_STORAGE_URI: use TOKENLIMIT_URL" in message


def test_flask_limiter_keys_are_its_own_while_it_is_imported(
    monkeypatch: pytest.MonkeyPatch, memory: RateLimiter
) -> None:
    """Moving one app over gradually: flask-limiter beside tokenlimit still reads them."""
    monkeypatch.setitem(sys.modules, "flask_limiter", types.ModuleType("flask_limiter"))
    app = Flask(__name__)
    app.config["RATELIMIT_DEFAULT"] = "200 per day"
    TokenLimit(app, limiter=memory, limit="1/hour")


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("TOKENLIMIT_LIMITS", "did you mean TOKENLIMIT_LIMIT?"),
        ("TOKENLIMIT_URI", "did you mean TOKENLIMIT_URL?"),
        ("TOKENLIMIT_ENABLE", "did you mean TOKENLIMIT_ENABLED?"),
        ("TOKENLIMIT_KEY", "pass key= to TokenLimit(...)"),
        ("TOKENLIMIT_PREFIX", "prefix="),
        ("TOKENLIMIT_WHATEVER", "known: TOKENLIMIT_URL"),
    ],
)
def test_unknown_tokenlimit_keys_are_errors(key: str, said: str) -> None:
    app = Flask(__name__)
    app.config[key] = "x"
    with pytest.raises(ConfigError, match=key) as raised:
        TokenLimit(app, limit="1/hour")
    assert said in str(raised.value)


def test_a_bad_key_added_after_init_app_fails_every_request_until_fixed(
    memory: RateLimiter,
) -> None:
    app, _ = app_with(memory, limit="1/hour")
    app.config["TOKENLIMIT_LIMITS"] = "10/hour"  # a typo: the app would be unlimited
    app.testing = True  # the error propagates to the test client
    client = app.test_client()
    for _ in range(2):
        with pytest.raises(ConfigError, match="TOKENLIMIT_LIMITS"):
            hit(client)
    del app.config["TOKENLIMIT_LIMITS"]
    assert statuses(client, 2) == [200, 429]


def test_enabled_false_turns_the_extension_off(memory: RateLimiter) -> None:
    app, ext = app_with(memory, limit="1/hour")

    @app.get("/own")
    @ext.limit("1/hour")
    def own() -> dict[str, object]:
        return {"decision": g.tokenlimit}

    app.config["TOKENLIMIT_ENABLED"] = False
    client = app.test_client()
    for path in ("/", "/own"):
        responses = [hit(client, path) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert not any(name in r.headers for r in responses for name in RATE_HEADERS)
    assert hit(client, "/own").get_json() == {"decision": None}
    assert memory.peek(f"ip:{PEER}", Limit.parse("1/hour")).remaining == 1  # nothing charged
    # Read at each request: switched back on, it limits again.
    app.config["TOKENLIMIT_ENABLED"] = True
    assert statuses(client, 2) == [200, 429]


def test_enabled_false_from_the_start_and_validated(memory: RateLimiter) -> None:
    app = Flask(__name__)
    app.config["TOKENLIMIT_ENABLED"] = False
    TokenLimit(app, limiter=memory, limit="1/hour")
    app.add_url_rule("/", "index", lambda: "ok")
    assert statuses(app.test_client(), 3) == [200, 200, 200]
    for bad in ("false", 0):
        wrong = Flask(__name__)
        wrong.config["TOKENLIMIT_ENABLED"] = bad
        with pytest.raises(ConfigError, match="TOKENLIMIT_ENABLED"):
            TokenLimit(wrong, limiter=memory)
    app.config["TOKENLIMIT_ENABLED"] = "no"  # set later: refused at the request, never read
    app.testing = True
    with pytest.raises(ConfigError, match="TOKENLIMIT_ENABLED"):
        hit(app.test_client())


def test_headers_from_config_and_the_constructor_wins(memory: RateLimiter) -> None:
    app = Flask(__name__)
    app.config["TOKENLIMIT_HEADERS"] = False
    TokenLimit(app, limiter=memory, limit="5/hour")
    app.add_url_rule("/", "index", lambda: "ok")
    assert "X-RateLimit-Limit" not in hit(app.test_client()).headers
    wins = Flask(__name__)
    wins.config["TOKENLIMIT_HEADERS"] = False
    TokenLimit(wins, limiter=memory, limit="5/hour", headers=True)
    wins.add_url_rule("/", "index", lambda: "ok")
    assert hit(wins.test_client(), ip="192.0.2.9").headers["X-RateLimit-Limit"] == "5"
    bad = Flask(__name__)
    bad.config["TOKENLIMIT_HEADERS"] = "yes"
    with pytest.raises(ConfigError, match="TOKENLIMIT_HEADERS"):
        TokenLimit(bad, limiter=memory)


def test_g_tokenlimit_is_the_decision_and_none_where_nothing_was_decided(
    memory: RateLimiter,
) -> None:
    app, ext = app_with(memory, limit="5/hour", exempt=["/health"])

    @app.get("/me")
    def me() -> dict[str, object]:
        decision = g.tokenlimit
        assert decision is g.tokenlimit_decision  # the older name still works
        return {"remaining": decision.remaining, "limit": decision.limit}

    @app.get("/health")
    def health() -> dict[str, object]:
        return {"decision": g.tokenlimit}

    @app.get("/free")
    @ext.exempt
    def free() -> dict[str, object]:
        return {"decision": g.tokenlimit}

    client = app.test_client()
    assert hit(client, "/me").get_json() == {"remaining": 4, "limit": 5}
    assert hit(client, "/health").get_json() == {"decision": None}
    assert hit(client, "/free").get_json() == {"decision": None}


def test_bad_failure_mode_config_names_the_setting() -> None:
    app = Flask(__name__)
    app.config.update(TOKENLIMIT_URL="memory://", TOKENLIMIT_FAILURE_MODE="sometimes")
    with pytest.raises(ConfigError, match="TOKENLIMIT_FAILURE_MODE"):
        TokenLimit(app)
