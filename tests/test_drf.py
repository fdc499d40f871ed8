"""tokenlimit.integrations.drf: the throttles through DRF's views (Django's test Client, and
DRF's view functions called directly), on memory:// and on every real server; and DRF's own
``UserRateThrottle`` on a shared Redis cache over-admitting where ours admits the burst."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import django_project
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import AsyncClient, Client, RequestFactory, override_settings
from rest_framework.exceptions import APIException

import tokenlimit
from servers import free_port
from tokenlimit import AsyncRateLimiter, ConfigError, Limit, RateLimiter
from tokenlimit._config import default_sync_limiter
from tokenlimit.integrations._common import api_key_identity
from tokenlimit.integrations._django import settings_state as tl_django_state

django_project.setup()  # rest_framework reads the settings as it is imported

from django_project import drf_views  # noqa: E402
from django_project.drf_views import REST, view  # noqa: E402

from tokenlimit.integrations import drf  # noqa: E402
from tokenlimit.integrations.drf import (  # noqa: E402
    ThrottleUnavailable,
    TokenBucketThrottle,
    UserTokenBucketThrottle,
)

THROTTLED = "Request was throttled. Expected available in {} seconds."


@contextmanager
def project(*, rest: dict[str, Any] | None = None, **tokenlimit_options: Any) -> Iterator[None]:
    """The DRF test project: its URLs, no middleware (DRF signs users in itself),
    ``REST_FRAMEWORK`` (``REST`` changed by ``rest``), and ``settings.TOKENLIMIT``."""
    with override_settings(
        ROOT_URLCONF="django_project.drf_urls",
        MIDDLEWARE=[],
        REST_FRAMEWORK={**REST, **(rest or {})},
        TOKENLIMIT={"URL": "memory://", **tokenlimit_options},
    ):
        yield


def get(path: str, n: int = 1, *, user: int | None = None, **extra: Any) -> list[Any]:
    """``n`` GETs of ``path`` through the test Client, as ``user`` (None: anonymous)."""
    headers = {} if user is None else {"X-Test-User": str(user)}
    client = Client(REMOTE_ADDR=extra.pop("addr", "127.0.0.1"))
    return [client.get(path, headers={**headers, **extra}) for _ in range(n)]


def call(*throttles: type[Any], n: int = 1, user: int | None = None, **extra: Any) -> list[Any]:
    """``n`` requests to a view with these throttles, called directly (throttles made here)."""
    endpoint = view(*throttles)
    factory = RequestFactory()
    headers = {} if user is None else {"X-Test-User": str(user)}
    return [endpoint(factory.get("/direct", headers={**headers, **extra})) for _ in range(n)]


def codes(responses: list[Any]) -> list[int]:
    return [r.status_code for r in responses]


def remaining(key: str, limit: str) -> int:
    """Tokens left in a bucket of the settings' store (consumes nothing)."""
    return tl_django_state().sync.peek(key, Limit.parse(limit)).remaining


# -- the three throttles -----------------------------------------------------------------------
def test_user_throttle_admits_the_burst_then_answers_429_with_retry_after(url: str) -> None:
    with project(URL=url, TIMEOUT=5.0):
        responses = get("/user", 4, user=7)
        assert codes(responses) == [200, 200, 200, 429]
        refused = responses[-1]
        assert refused["Retry-After"] == "20"  # "3/m": a token every 20 s
        assert refused.json() == {"detail": THROTTLED.format(20)}
        assert remaining("scope:user|user:7", "3/m") == 0
        assert codes(get("/user", 1, user=8)) == [200]  # another user, another bucket


def test_wait_is_the_exact_retry_after() -> None:
    with project():
        call(UserTokenBucketThrottle, n=3, user=1)  # the bucket is empty
        http = RequestFactory().get("/x", headers={"X-Test-User": "1"})
        request = drf_views.Base().initialize_request(http)
        throttle = UserTokenBucketThrottle()
        assert throttle.wait() is None
        assert throttle.allow_request(request, None) is False
        wait = throttle.wait()
        assert wait is not None
        assert 15 < wait <= 20  # the next of "3/m"'s tokens, not rounded
        assert wait != int(wait)
        later = tl_django_state().sync.peek("scope:user|user:1", Limit.parse("3/m"))
        assert 0 <= wait - later.retry_after < 5


def test_anon_throttle_limits_only_the_anonymous() -> None:
    with project():
        assert codes(get("/anon", 4)) == [200, 200, 200, 429]
        assert remaining("scope:anon|ip:127.0.0.1", "3/min") == 0
        assert codes(get("/anon", 6, user=1)) == [200] * 6  # signed in: untouched
        assert codes(get("/anon", 1, addr="127.0.0.2")) == [200]  # another client


def test_user_throttle_counts_the_anonymous_by_ip() -> None:
    with project():
        assert codes(get("/user", 4, addr="10.0.0.9")) == [200, 200, 200, 429]
        assert remaining("scope:user|ip:10.0.0.9", "3/m") == 0
        assert codes(get("/user", 1, user=3, addr="10.0.0.9")) == [200]


def test_the_scope_names_the_bucket_views_of_one_scope_share_it() -> None:
    with project():
        # "/user", "/user-twin" and the function view: one scope "user", one bucket (as DRF's
        # cache key throttle_user_<ident>).
        assert codes(get("/user", 1, user=1) + get("/user-twin", 1, user=1)) == [200, 200]
        assert codes(get("/function", 2, user=1)) == [200, 429]
        # ScopedTokenBucketThrottle: the view's throttle_scope, at its own rate ("2/min").
        assert codes(get("/uploads", 1, user=1) + get("/uploads-twin", 2, user=1)) == [
            200,
            200,
            429,
        ]
        assert remaining("scope:uploads|user:1", "2/min") == 0


def test_a_throttle_with_a_rate_and_no_scope_is_its_own_scope() -> None:
    with project():
        assert codes(get("/two", 1) + get("/two-twin", 2)) == [200, 200, 429]
        bucket = "scope:django_project.drf_views.TwoPerMinute|ip:127.0.0.1"
        assert remaining(bucket, "2/min") == 0


def test_a_view_without_throttle_scope_or_with_a_rate_of_none_is_not_throttled() -> None:
    with project():
        assert codes(get("/unscoped", 6)) == [200] * 6
        assert codes(get("/scope-off", 6)) == [200] * 6  # DEFAULT_THROTTLE_RATES["off"] = None


def test_each_throttle_decides_on_its_own() -> None:
    with project(rest={"DEFAULT_THROTTLE_RATES": {"anon": "2/min", "user": "3/min"}}):
        # Anonymous: both throttles charge; the anon bucket (2) runs out first.
        assert codes(get("/anon-and-user", 3)) == [200, 200, 429]
        assert remaining("scope:user|ip:127.0.0.1", "3/min") == 0  # its third token taken too
        # Signed in: only the user throttle looks.
        assert codes(get("/anon-and-user", 4, user=5)) == [200, 200, 200, 429]


def test_rates_are_read_per_request_so_override_settings_works() -> None:
    with project(rest={"DEFAULT_THROTTLE_RATES": {"user": "1/min"}}):
        assert codes(get("/user", 2, user=1)) == [200, 429]
    with project(rest={"DEFAULT_THROTTLE_RATES": {"user": "5/min"}}):
        assert codes(get("/user", 6, user=1)) == [200] * 5 + [429]


def test_async_server_runs_the_sync_throttle_in_its_thread() -> None:
    async def run() -> list[int]:
        client = AsyncClient(headers={"X-Test-User": "4"})
        return [(await client.get("/user")).status_code for _ in range(4)]

    with project():
        assert asyncio.run(run()) == [200, 200, 200, 429]


# -- DRF's rate spellings, burst and cost ------------------------------------------------------
@pytest.mark.parametrize(
    ("spelling", "count", "seconds"),
    [
        ("100/min", 100, 60),
        ("100/m", 100, 60),
        ("100/minute", 100, 60),
        ("1000/day", 1000, 86400),
        ("1000/d", 1000, 86400),
        ("10/s", 10, 1),
        ("10/sec", 10, 1),
        ("10/second", 10, 1),
        ("5/h", 5, 3600),
        ("5/hour", 5, 3600),
    ],
)
def test_drf_spellings_give_the_burst_drf_allows_at_once(
    spelling: str, count: int, seconds: int
) -> None:
    with project(rest={"DEFAULT_THROTTLE_RATES": {"user": spelling}}):
        rule = drf._rule_for(UserTokenBucketThrottle, "user")
        assert rule is not None
        limits = rule.policy(tl_django_state().base).limits
        assert limits == (Limit(count / seconds, count),)


def test_a_rate_setting_takes_every_spelling_a_limit_takes() -> None:
    # Two limits at once (all or nothing), as anywhere in tokenlimit.
    with project(rest={"DEFAULT_THROTTLE_RATES": {"user": ["2/min", "100/day"]}}):
        assert codes(get("/user", 3, user=1)) == [200, 200, 429]
        assert remaining("scope:user|user:1", "100/day") == 98
    with project(rest={"DEFAULT_THROTTLE_RATES": {"user": Limit.per_minute(5, burst=1)}}):
        assert codes(get("/user", 2, user=2)) == [200, 429]


def test_burst_and_cost() -> None:
    with project():
        assert codes(get("/burst2", 3)) == [200, 200, 429]  # "10/min" with burst 2
        assert codes(get("/cost2", 3)) == [200, 200, 429]  # "4/min", 2 tokens a request


def test_a_chooser_picks_the_rate_per_request() -> None:
    with project():
        assert codes(get("/tiered", 5, user=1)) == [200] * 4 + [429]
        assert codes(get("/tiered", 2, user=2)) == [200, 429]


# -- configuration errors ----------------------------------------------------------------------
def test_no_rate_for_the_scope_is_improperly_configured() -> None:
    with project(), pytest.raises(ImproperlyConfigured) as caught:
        get("/scope-unset")
    assert "no rate for the scope 'nowhere'" in str(caught.value)
    assert "REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']['nowhere']" in str(caught.value)


def test_no_rate_and_no_scope_is_improperly_configured() -> None:
    class NoRate(TokenBucketThrottle):
        pass

    with project(), pytest.raises(ImproperlyConfigured, match="NoRate needs a rate or a scope"):
        call(NoRate)


def test_a_bad_rate_setting_names_the_entry() -> None:
    with (
        project(rest={"DEFAULT_THROTTLE_RATES": {"user": "10/fortnight"}}),
        pytest.raises(ImproperlyConfigured) as caught,
    ):
        get("/user")
    message = str(caught.value)
    assert "REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']['user'] = '10/fortnight'" in message
    assert "cannot parse" in message


@pytest.mark.parametrize(
    ("attributes", "error"),
    [
        ({"rate": "10/fortnight"}, "Bad.rate: cannot parse '10/fortnight'"),
        ({"rate": True}, "Bad.rate"),
        ({"rate": "10/min", "burst": 0}, "Bad.burst: must be >= 1"),
        ({"burst": "5", "scope": "x"}, "Bad.burst: must be an int"),
        ({"rate": Limit.per_minute(10), "burst": 5}, "Bad.burst: goes with a number"),
        ({"rate": "2/min", "cost": 5}, "Bad.cost: 5 exceeds the burst 2"),
        ({"scope": "x", "cost": 0}, "Bad.cost: must be >= 1"),
        ({"scope": "a|b"}, "Bad.scope: must be a non-empty name without '|'"),
        ({"scope": 3}, "Bad.scope: must be a string"),
    ],
)
def test_a_bad_class_attribute_fails_where_the_throttle_is_written(
    attributes: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        type("Bad", (TokenBucketThrottle,), attributes)
    assert str(caught.value).startswith(error)


def test_an_async_limiter_is_refused_by_name() -> None:
    limiter = AsyncRateLimiter.from_url("memory://")
    with pytest.raises(ConfigError, match=r"Bad\.limiter: must be a sync RateLimiter"):
        type("Bad", (UserTokenBucketThrottle,), {"limiter": limiter})


def test_a_missing_extra_names_the_pip_install() -> None:
    code = (  # DRF hidden, as if it were not installed
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'rest_framework':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from tokenlimit import ConfigError\n"
        "try:\n"
        "    import tokenlimit.integrations.drf\n"
        "except ImportError as error:\n"
        "    print(isinstance(error, ConfigError), error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "True tokenlimit.integrations.drf: needs djangorestframework (module 'rest_framework' "
        "is not installed): pip install 'tokenlimit[drf]'"
    )


# -- the limiter -------------------------------------------------------------------------------
def test_the_throttles_own_limiter_comes_first(standalone: Any) -> None:
    own = RateLimiter.from_url(standalone.url, timeout=5.0)
    try:
        throttle = type("Own", (UserTokenBucketThrottle,), {"limiter": own, "rate": "2/min"})
        with project():  # settings.TOKENLIMIT says memory://: not used
            assert codes(call(throttle, n=3, user=1)) == [200, 200, 429]
            assert own.peek("scope:user|user:1", Limit.parse("2/min")).remaining == 0
            assert remaining("scope:user|user:1", "2/min") == 2
    finally:
        own.close()


def test_without_settings_tokenlimit_the_default_limiter(standalone: Any) -> None:
    tokenlimit.configure(standalone.url, timeout=5.0)
    with project(), override_settings(TOKENLIMIT=None):
        assert codes(get("/user", 4, user=2)) == [200, 200, 200, 429]
        default = default_sync_limiter()
        assert default.peek("scope:user|user:2", Limit.parse("3/m")).remaining == 0


def test_an_async_default_limiter_is_refused() -> None:
    tokenlimit.configure(AsyncRateLimiter.from_url("memory://"))
    with project(), override_settings(TOKENLIMIT=None), pytest.raises(ConfigError) as caught:
        get("/user")
    assert "DRF throttles decide in sync code" in str(caught.value)


def test_storage_down_closed_answers_503(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with project(URL=dead, FAILURE_MODE="closed"), caplog.at_level(logging.WARNING, "tokenlimit"):
        response = get("/user", user=1)[0]
    assert response.status_code == 503
    assert response.json() == {"detail": "rate limiter unavailable"}
    assert "Retry-After" not in response
    assert "storage failed, answering 503" in caplog.text
    assert issubclass(ThrottleUnavailable, APIException)


def test_storage_down_open_admits() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with project(URL=dead, FAILURE_MODE="open"):
        assert codes(get("/user", 5, user=1)) == [200] * 5


def test_shadow_decides_and_never_refuses() -> None:
    with project(SHADOW=True):
        assert codes(get("/user", 5, user=1)) == [200] * 5
        assert remaining("scope:user|user:1", "3/m") == 0


# -- identity ------------------------------------------------------------------------------------
def test_trusted_proxies_from_settings_tokenlimit() -> None:
    with project(TRUSTED_PROXIES=1):
        get("/anon", addr="10.0.0.1")  # no X-Forwarded-For: the peer
        get("/anon", addr="10.0.0.1", **{"X-Forwarded-For": "203.0.113.7"})
        assert remaining("scope:anon|ip:10.0.0.1", "3/min") == 2
        assert remaining("scope:anon|ip:203.0.113.7", "3/min") == 2


def test_drf_num_proxies_is_the_hop_count_when_tokenlimit_names_none() -> None:
    with project(rest={"NUM_PROXIES": 1}):
        get("/anon", addr="10.0.0.1", **{"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
        assert remaining("scope:anon|ip:203.0.113.7", "3/min") == 2
    with project(rest={"NUM_PROXIES": 1}, TRUSTED_PROXIES=None):  # TOKENLIMIT's comes first
        get("/anon", addr="10.0.0.1", **{"X-Forwarded-For": "203.0.113.7"})
        assert remaining("scope:anon|ip:10.0.0.1", "3/min") == 2


def test_drf_default_num_proxies_does_not_let_a_client_choose_its_bucket() -> None:
    # DRF's NUM_PROXIES = None believes the whole X-Forwarded-For; tokenlimit does not.
    with project():
        for fake in ("203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"):
            response = get("/anon", addr="10.0.0.1", **{"X-Forwarded-For": fake})[0]
        assert response.status_code == 429


def test_an_api_key_the_app_vouches_for_names_the_client() -> None:
    validator = "django_project.keys.known_api_key"
    with project(API_KEY_VALIDATOR=validator):
        get("/user", 2, **{"X-API-Key": "sk-known-1"})
        assert remaining(f"scope:user|{api_key_identity('sk-known-1')}", "3/m") == 1
        get("/user", 1, **{"X-API-Key": "sk-made-up"})  # unknown: the IP
        assert remaining("scope:user|ip:127.0.0.1", "3/m") == 2


def test_the_key_setting_names_the_identity() -> None:
    with project(KEY="django_project.keys.tenant"):
        get("/user", 3, **{"X-Tenant": "acme"})
        assert codes(get("/user", 1, user=9, **{"X-Tenant": "acme"})) == [429]
        assert codes(get("/user", 1, user=9)) == [200]  # no tenant: the default identity


# -- DRF's own throttle over-admits; ours admits the burst ------------------------------------
CLIENTS = 8  # threads firing at once, each with its own test Client
EACH = 5  # requests per thread per round
ROUNDS = 5  # each round a new user, so a fresh history and a fresh bucket


def _burst_of(path: str, user: int) -> int:
    """How many of CLIENTS x EACH concurrent requests by ``user`` were admitted."""
    barrier = threading.Barrier(CLIENTS)
    admitted: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        session = Client()
        barrier.wait(timeout=30)
        got = [session.get(path, headers={"X-Test-User": str(user)}) for _ in range(EACH)]
        with lock:
            admitted.extend(r.status_code for r in got if r.status_code == 200)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return len(admitted)


def test_drf_user_rate_throttle_over_admits_where_ours_admits_the_burst(standalone: Any) -> None:
    """DRF's UserRateThrottle keeps its history in the cache with get-then-set, so concurrent
    requests overwrite each other's history; ours decides in one atomic call. Both "10/min",
    one user, both on the same Valkey (Django's own RedisCache for DRF's)."""
    caches = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": standalone.url,
        }
    }
    drf_counts, ours_counts = [], []
    with project(URL=standalone.url, TIMEOUT=5.0), override_settings(CACHES=caches):
        for round_ in range(ROUNDS):
            drf_counts.append(_burst_of("/compare/drf", 1000 + round_))
            ours_counts.append(_burst_of("/compare/ours", 2000 + round_))
    print(f"\n{CLIENTS} clients x {EACH} requests, rate 10/min: DRF admitted {drf_counts}")
    print(f"tokenlimit admitted {ours_counts}")
    assert ours_counts == [10] * ROUNDS
    # Over-admission needs only two requests to overlap between DRF's get and set: in every
    # run so far every round showed it. One round in ROUNDS is asked for, so a loaded machine
    # that happens to serialise a few rounds does not fail the test.
    assert max(drf_counts) > 10, drf_counts
    assert min(drf_counts) >= 10, drf_counts  # never fewer: it only loses history


def test_enabled_false_throttles_nothing() -> None:
    with project(ENABLED=False):
        assert codes(get("/user", 5, user=7)) == [200] * 5
        assert remaining("scope:user|user:7", "3/m") == 3
    with project(ENABLED=True):
        assert codes(get("/user", 4, user=7)) == [200, 200, 200, 429]
