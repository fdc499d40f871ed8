"""What narrows a Flask limit (issue 16): ``methods``, ``exempt_when``, ``deduct_when`` (the
failed-logins limit), Blueprint limits and exemptions, and shared scopes (``shared_limit``); on
memory and on every real server."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("flask")

from flask import Blueprint, Flask, Response, abort, g, request
from flask.testing import FlaskClient

from tokenlimit import ConfigError, Limit, RateLimiter
from tokenlimit.integrations.flask import TokenLimit

PEER = "203.0.113.7"
THREE = Limit(0.01, 3)  # one token per 100 s: nothing refills during a test
LOGINS = "5/15 minutes"  # five failed logins per 15 minutes per username
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "RateLimit-Policy", "RateLimit")


def codes(client: FlaskClient, n: int, path: str, method: str = "GET", **kwargs: Any) -> list[int]:
    environ = {"REMOTE_ADDR": PEER}
    return [client.open(path, method=method, environ_base=environ, **kwargs).status_code
            for _ in range(n)]  # fmt: skip


def used(limiter: RateLimiter, key: str, limit: Limit = THREE) -> int:
    return limit.burst - limiter.peek(key, limit).remaining


def ok() -> str:
    return "ok"


def page() -> Callable[[], str]:
    """A view function of its own: a limit or exemption marks the function it decorates."""

    def show() -> str:
        return "ok"

    return show


# -- methods ------------------------------------------------------------------------------------
def test_methods_narrow_the_default_and_a_view_limit(limiter: RateLimiter) -> None:
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=limiter, limit=THREE, methods=["post", "PUT"])
    app.add_url_rule("/items", "items", ok, methods=["GET", "POST", "PUT"])
    only_delete = ext.limit(THREE, methods=["DELETE"])(page())
    app.add_url_rule("/other", "other", only_delete, methods=["GET", "DELETE"])
    client = app.test_client()
    assert codes(client, 5, "/items") == [200] * 5
    response = client.get("/items", environ_base={"REMOTE_ADDR": PEER})
    assert not any(name in response.headers for name in RATE_HEADERS)
    assert codes(client, 2, "/items", "POST") + codes(client, 2, "/items", "PUT") == [
        200, 200, 200, 429,
    ]  # fmt: skip
    # A view's own limit replaces the default for every method; methods= narrows it further.
    assert codes(client, 5, "/other") == [200] * 5
    assert codes(client, 4, "/other", "DELETE") == [200, 200, 200, 429]
    assert used(limiter, f"ip:{PEER}") == 3
    assert used(limiter, f"route:other|ip:{PEER}") == 3


@pytest.mark.parametrize("methods", ["POST", ["GET", "FETCH"], [], 3])
def test_bad_methods_name_the_parameter(methods: Any) -> None:
    with pytest.raises(ConfigError, match=r"^methods: "):
        TokenLimit(limit="1/second", methods=methods)
    with pytest.raises(ConfigError, match=r"^methods: "):
        TokenLimit().limit("1/second", methods=methods)


# -- exempt_when -------------------------------------------------------------------------------
def test_exempt_when_skips_the_check_the_charge_and_the_headers(limiter: RateLimiter) -> None:
    app = Flask(__name__)

    def staff(req: Any) -> bool:
        return req.headers.get("X-Staff") == "yes"

    ext = TokenLimit(app, limiter=limiter, limit=THREE, exempt_when=staff)
    app.add_url_rule("/", "index", ok)
    app.add_url_rule("/view", "view", ext.limit(THREE, exempt_when=staff)(page()))
    client = app.test_client()
    for path in ("/", "/view"):
        assert codes(client, 5, path, headers={"X-Staff": "yes"}) == [200] * 5
        response = client.get(path, headers={"X-Staff": "yes"})
        assert not any(name in response.headers for name in RATE_HEADERS)
        assert codes(client, 4, path) == [200, 200, 200, 429]


def test_a_flask_limiter_predicate_fails_where_it_is_written() -> None:
    with pytest.raises(ConfigError, match=r"^exempt_when: must take one argument, the request"):
        TokenLimit(limit="1/second", exempt_when=lambda: True)
    with pytest.raises(ConfigError, match=r"^deduct_when: must take one argument, the response"):
        TokenLimit().limit("1/second", deduct_when=lambda: True)


# -- deduct_when: five failed logins per 15 minutes per username --------------------------------
def failed(response: Response) -> bool:
    return response.status_code == 401


def login_app(limiter: RateLimiter, *, pause: threading.Event | None = None) -> Flask:
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=limiter)

    @app.post("/login")
    @ext.limit(LOGINS, key=lambda req: f"login:{req.form['username']}", deduct_when=failed)
    def login() -> str:
        if pause is not None:
            pause.wait(5)
        if request.form["password"] != "right":
            abort(401)
        return "welcome"

    return app


def test_five_failed_logins_then_429_while_successes_never_count(limiter: RateLimiter) -> None:
    client = login_app(limiter).test_client()

    def attempt(password: str, user: str = "alice") -> Any:
        return client.post("/login", data={"username": user, "password": password})

    for n in range(5):
        success = attempt("right")
        assert success.status_code == 200
        # the headers report the bucket as the give-back left it
        assert success.headers["X-RateLimit-Remaining"] == str(5 - n)
        failure = attempt("wrong")
        assert failure.status_code == 401
        assert failure.headers["X-RateLimit-Remaining"] == str(4 - n)
    assert attempt("wrong").status_code == 429
    assert attempt("right").status_code == 429  # locked, whatever the password
    assert attempt("wrong", "bob").status_code == 401  # a bucket per username
    assert used(limiter, "route:login|login:alice", Limit.parse(LOGINS)) == 5


def test_concurrent_failed_logins_never_pass_the_limit(limiter: RateLimiter) -> None:
    """20 wrong passwords at once, held in the view until all have been decided: exactly 5
    run (and count), 15 are refused."""
    release = threading.Event()
    app = login_app(limiter, pause=release)
    results: list[int] = []
    lock = threading.Lock()

    def attempt() -> None:
        response = app.test_client().post("/login", data={"username": "carol", "password": "x"})
        with lock:
            results.append(response.status_code)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for thread in threads:
        thread.start()
    for _ in range(500):  # the 15 refused return at once; the 5 admitted wait in the view
        with lock:
            if len(results) == 15:
                break
        threading.Event().wait(0.01)
    release.set()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [401] * 5 + [429] * 15


def test_deduct_when_on_the_default_limit_sees_handled_errors(limiter: RateLimiter) -> None:
    app = Flask(__name__)
    TokenLimit(app, limiter=limiter, limit=THREE, deduct_when=lambda r: r.status_code >= 400)
    app.add_url_rule("/", "index", ok)

    @app.get("/missing")
    def missing() -> str:
        abort(404)

    client = app.test_client()
    assert codes(client, 5, "/") == [200] * 5  # given back each time
    assert codes(client, 4, "/missing") == [404, 404, 404, 429]


# -- blueprints --------------------------------------------------------------------------------
def test_a_blueprint_limit_applies_to_each_of_its_views(limiter: RateLimiter) -> None:
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=limiter, limit="1000/hour")
    shop = Blueprint("shop", __name__, url_prefix="/shop")
    admin = Blueprint("admin", __name__, url_prefix="/admin")
    nested = Blueprint("nested", __name__, url_prefix="/nested")
    reports = Blueprint("reports", __name__, url_prefix="/reports")
    shop.add_url_rule("/a", "a", page())
    shop.add_url_rule("/b", "b", page())
    shop.add_url_rule("/own", "own", ext.limit(Limit(0.01, 1))(page()))
    nested.add_url_rule("/c", "c", page())
    shop.register_blueprint(nested)
    admin.add_url_rule("/x", "x", page())
    reports.add_url_rule("/daily", "daily", page())
    reports.add_url_rule("/weekly", "weekly", page())
    ext.limit(THREE)(shop)
    ext.exempt(admin)
    ext.limit(THREE, scope="reports")(reports)
    for blueprint in (shop, admin, reports):
        app.register_blueprint(blueprint)
    client = app.test_client()
    # a bucket per endpoint, as a view's own limit has
    assert codes(client, 4, "/shop/a") == [200, 200, 200, 429]
    assert codes(client, 4, "/shop/b") == [200, 200, 200, 429]
    assert codes(client, 4, "/shop/nested/c") == [200, 200, 200, 429]  # the parent's limit
    assert codes(client, 2, "/shop/own") == [200, 429]  # the view's own wins
    response = client.get("/admin/x", environ_base={"REMOTE_ADDR": PEER})
    assert (response.status_code, "X-RateLimit-Limit" in response.headers) == (200, False)
    assert codes(client, 2, "/reports/daily") + codes(client, 2, "/reports/weekly") == [
        200, 200, 200, 429,
    ]  # fmt: skip
    assert used(limiter, f"route:shop.a|ip:{PEER}") == 3
    assert used(limiter, f"scope:reports|ip:{PEER}") == 3
    with pytest.raises(ConfigError, match=r"^limit: blueprint 'shop'"):
        ext.limit(THREE)(shop)


# -- shared scopes -------------------------------------------------------------------------------
def test_shared_limit_is_limit_with_a_scope(limiter: RateLimiter) -> None:
    app = Flask(__name__)
    ext = TokenLimit(app, limiter=limiter)
    search = ext.shared_limit(THREE, "search")
    app.add_url_rule("/s1", "s1", search(page()))
    app.add_url_rule("/s2", "s2", search(page()))
    app.add_url_rule("/s3", "s3", ext.limit(THREE, scope="search")(page()))
    client = app.test_client()
    assert codes(client, 1, "/s1") + codes(client, 1, "/s2") + codes(client, 2, "/s3") == [
        200, 200, 200, 429,
    ]  # fmt: skip
    assert used(limiter, f"scope:search|ip:{PEER}") == 3
    with pytest.raises(ConfigError, match=r"^scope: "):
        ext.shared_limit("1/hour", scope=lambda: "dynamic")  # type: ignore[arg-type]


def test_the_decision_on_g_is_the_one_after_a_give_back(limiter: RateLimiter) -> None:
    app = Flask(__name__)
    seen: list[int] = []
    ext = TokenLimit(app, limiter=limiter)

    @app.get("/")
    @ext.limit(THREE, deduct_when=lambda r: False)
    def index() -> str:
        seen.append(g.tokenlimit_decision.remaining)  # during the view: after the take
        return "ok"

    client = app.test_client()
    assert codes(client, 3, "/") == [200] * 3
    assert seen == [2, 2, 2]
