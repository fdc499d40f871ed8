"""What narrows a Django limit (issue 16): ``METHODS``/``methods``, ``EXEMPT_WHEN``/
``exempt_when``, ``DEDUCT_WHEN``/``deduct_when`` (the failed-logins limit), ``ratelimit_exempt``,
shared scopes, and django-ratelimit's spellings answered with ours; through Django's test
``Client`` (sync chain) and ``AsyncClient`` (async chain), on memory and every real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import django_project
import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client, override_settings
from django_project import rules

from tokenlimit import ConfigError, Limit
from tokenlimit.integrations._django import settings_state
from tokenlimit.integrations.django import ratelimit, ratelimit_exempt

django_project.setup()

ADDR = "127.0.0.1"
MODES = ["sync", "async"]


@pytest.fixture(autouse=True)
def _rules_urls() -> Iterator[None]:
    with (
        override_settings(**django_project.BASE),
        override_settings(ROOT_URLCONF="django_project.rules"),
    ):
        yield


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextmanager
def tokenlimit(url: str = "memory://", **options: Any) -> Iterator[None]:
    """``settings.TOKENLIMIT`` at ``url``: 3/minute, changed by ``options``."""
    setting = {"URL": url, "LIMIT": "3/minute", "TIMEOUT": 5.0, **options}
    with override_settings(TOKENLIMIT=setting):
        yield


def send(
    mode: str, method: str, path: str, n: int = 1, *, data: Any = None, **headers: str
) -> list[Any]:
    """``n`` requests in one client (sync: WSGI; async: ASGI), one after the other."""
    if mode == "sync":
        client = Client(REMOTE_ADDR=ADDR)
        call = getattr(client, method.lower())
        return [call(path, data, headers=headers) for _ in range(n)]

    async def run() -> list[Any]:
        aclient = AsyncClient(REMOTE_ADDR=ADDR)
        call = getattr(aclient, method.lower())
        return [await call(path, data, headers=headers) for _ in range(n)]

    return asyncio.run(run())


def codes(responses: list[Any]) -> list[int]:
    return [r.status_code for r in responses]


def limited(response: Any) -> bool:
    return "X-RateLimit-Limit" in response


def used(key: str, limit: str = "3/minute") -> int:
    parsed = Limit.parse(limit)
    return parsed.burst - settings_state().sync.peek(key, parsed).remaining


# -- methods ------------------------------------------------------------------------------------
def test_methods_narrow_the_middleware_and_a_view(url: str, mode: str) -> None:
    with tokenlimit(url, METHODS=["post", "PUT"]):
        gets = send(mode, "GET", "/page", 5)
        assert codes(gets) == [200] * 5
        assert not limited(gets[0])
        posts = send(mode, "POST", "/page", 2) + send(mode, "PUT", "/page", 2)
        assert codes(posts) == [200, 200, 200, 429]
    with tokenlimit(url, EXEMPT=["/post-only"]):
        assert codes(send(mode, "GET", "/post-only", 5)) == [200] * 5
        assert codes(send(mode, "POST", "/post-only", 4)) == [200, 200, 200, 429]
        assert used("route:django_project.rules.post_only|ip:127.0.0.1") == 3


# -- exempt_when -------------------------------------------------------------------------------
def test_exempt_when_skips_the_check_the_charge_and_the_headers(url: str, mode: str) -> None:
    staff = {"X-Staff": "yes"}
    with tokenlimit(url, EXEMPT_WHEN="django_project.rules.staff"):
        for path in ("/page", "/staff-free"):
            responses = send(mode, "GET", path, 5, **staff)
            assert codes(responses) == [200] * 5
            assert not limited(responses[0])
        assert codes(send(mode, "GET", "/page", 4)) == [200, 200, 200, 429]
    with tokenlimit(url, EXEMPT=["/staff-free"]):  # the view's own exempt_when
        assert codes(send(mode, "GET", "/staff-free", 4)) == [200, 200, 200, 429]


# -- deduct_when: five failed logins per 15 minutes per username --------------------------------
@pytest.mark.parametrize("path", ["/login", "/alogin"])
def test_five_failed_logins_then_429_while_successes_never_count(
    url: str, mode: str, path: str
) -> None:
    with tokenlimit(url, EXEMPT=["/login", "/alogin"]):

        def attempt(password: str, user: str = "alice") -> Any:
            (response,) = send(mode, "POST", path, data={"username": user, "password": password})
            return response

        for n in range(5):
            success = attempt("right")
            assert success.status_code == 200
            assert success["X-RateLimit-Remaining"] == str(5 - n)  # given back
            failure = attempt("wrong")
            assert failure.status_code == 401
            assert failure["X-RateLimit-Remaining"] == str(4 - n)
        assert attempt("wrong").status_code == 429
        assert attempt("right").status_code == 429  # locked, whatever the password
        assert attempt("wrong", "bob").status_code == 401  # a bucket per username
        view = path.strip("/")
        assert used(f"route:django_project.rules.{view}|login:alice", rules.LOGINS) == 5


def test_concurrent_failed_logins_never_pass_the_limit(url: str) -> None:
    """20 wrong passwords at once on the async view (each takes 0.2 s): exactly 5 run (and
    count), 15 are refused."""

    async def run() -> list[int]:
        aclient = AsyncClient(REMOTE_ADDR=ADDR)
        body = {"username": "carol", "password": "guess"}
        responses = await asyncio.gather(*(aclient.post("/alogin", body) for _ in range(20)))
        return sorted(r.status_code for r in responses)

    with tokenlimit(url, EXEMPT=["/alogin"]):
        assert asyncio.run(run()) == [401] * 5 + [429] * 15
        assert used("route:django_project.rules.alogin|login:carol", rules.LOGINS) == 5


def test_deduct_when_on_the_middleware(url: str, mode: str) -> None:
    with tokenlimit(url, DEDUCT_WHEN="django_project.rules.failed"):
        right = send(mode, "GET", "/checked", 5, **{"X-Password": "right"})
        assert codes(right) == [200] * 5
        assert right[-1]["X-RateLimit-Remaining"] == "3"
        assert codes(send(mode, "GET", "/checked", 4)) == [401, 401, 401, 429]


# -- ratelimit_exempt ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/exempted", "/aexempted", "/exempt-cbv", "/exempt-as-view"])
def test_ratelimit_exempt_frees_a_view_from_the_middleware(url: str, mode: str, path: str) -> None:
    with tokenlimit(url):
        responses = send(mode, "GET", path, 5)
        assert codes(responses) == [200] * 5
        assert not limited(responses[0])
        assert codes(send(mode, "GET", "/page", 4)) == [200, 200, 200, 429]


def test_an_exempt_view_keeps_its_own_limit(mode: str) -> None:
    with tokenlimit():
        responses = send(mode, "GET", "/exempted-own", 2)
        assert codes(responses) == [200, 429]
        assert responses[0]["X-RateLimit-Limit"] == "1"  # its own limit alone
        assert used("ip:127.0.0.1") == 0  # the middleware's bucket untouched


def test_ratelimit_exempt_takes_views_only() -> None:
    with pytest.raises(ConfigError, match=r"^view: "):
        ratelimit_exempt("not a view")


# -- shared scopes -------------------------------------------------------------------------------
def test_views_of_one_scope_share_a_bucket(url: str, mode: str) -> None:
    with tokenlimit(url, EXEMPT=["/daily", "/weekly"]):
        both = send(mode, "GET", "/daily", 2) + send(mode, "GET", "/weekly", 2)
        assert codes(both) == [200, 200, 200, 429]
        assert used("scope:reports|ip:127.0.0.1") == 3


# -- settings, and django-ratelimit's spellings ------------------------------------------------
GOOD = {"URL": "memory://", "LIMIT": "3/minute"}


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({**GOOD, "METHODS": "POST"}, "tokenlimit.E018"),
        ({**GOOD, "METHODS": ["POST", "FETCH"]}, "tokenlimit.E018"),
        ({**GOOD, "EXEMPT_WHEN": "django_project.rules.missing"}, "tokenlimit.E019"),
        ({**GOOD, "EXEMPT_WHEN": "django_project.rules.no_arguments"}, "tokenlimit.E019"),
        ({**GOOD, "DEDUCT_WHEN": "django_project.rules.LOGINS"}, "tokenlimit.E020"),
        ({**GOOD, "METHOD": "POST"}, "tokenlimit.E021"),
    ],
)
def test_checks_report_bad_rules(setting: Any, expected: str) -> None:
    with override_settings(TOKENLIMIT=setting):
        (message,) = checks.run_checks(tags=["tokenlimit"])
        assert message.id == expected
        assert message.is_serious()
        with pytest.raises(ImproperlyConfigured, match=expected.replace(".", r"\.")):
            settings_state()


def test_a_django_ratelimit_method_setting_names_ours() -> None:
    with override_settings(TOKENLIMIT={**GOOD, "METHOD": "POST"}):
        (message,) = checks.run_checks(tags=["tokenlimit"])
    assert "'METHODS': ['POST']" in message.msg


@pytest.mark.parametrize(
    ("spelling", "ours"),
    [({"method": "POST"}, "methods="), ({"group": "search"}, "scope=")],
)
def test_django_ratelimit_spellings_name_ours(spelling: dict[str, str], ours: str) -> None:
    (name,) = spelling
    with pytest.raises(ConfigError, match=rf"^{name}: ratelimit spells it {ours}"):
        ratelimit("5/minute", **spelling)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'grup'"):
        ratelimit("5/minute", grup="search")  # type: ignore[call-arg]


def test_bad_view_rules_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"^methods: "):
        ratelimit("5/minute", methods="POST")
    with pytest.raises(ConfigError, match=r"^exempt_when: "):
        ratelimit("5/minute", exempt_when=rules.no_arguments)
    with pytest.raises(ConfigError, match=r"^deduct_when: "):
        ratelimit("5/minute", deduct_when="django_project.rules.failed")  # type: ignore[arg-type]
