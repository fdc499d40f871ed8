"""Keyed identity hashing (issue 17): ``hash_secret=`` / ``TOKENLIMIT_HASH_SECRET`` keys the
BLAKE2b behind bucket and slot keys. Without a secret, keys are byte for byte those of before;
with one, limiters sharing it share buckets (sync and async, memory and real servers), others
do not, even through the in-process request cache; the secret reaches no repr, error, log line
or command-line output; the environment is read by ``configure``, the default limiter, Django's
settings, Flask's config and ``tokenlimit peek``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from typing import Any

import django_project
import pytest
from conftest import Target
from django.core import checks
from django.test import Client, override_settings
from flask import Flask

import tokenlimit
from servers import free_port
from tokenlimit import AsyncRateLimiter, ConfigError, Limit, MemoryBackend, RateLimiter, _request
from tokenlimit._cli import EXIT_USAGE, main
from tokenlimit._concurrency import slots_key
from tokenlimit._hash_secret import hasher_for
from tokenlimit._request import build_request
from tokenlimit.integrations._common import api_key_identity
from tokenlimit.integrations._django import settings_state
from tokenlimit.integrations._settings import read
from tokenlimit.integrations.flask import TokenLimit
from tokenlimit.testing import async_memory_limiter, memory_limiter

django_project.setup()

SECRET = "s3cr3t-for-the-hash-tests-Zq8wK"  # searched for in every output below
OTHER = "another-secret-entirely-9vT2pLm"
LIMIT = Limit(10, 20)
# Where a loaded machine's pauses would refill a 10/s bucket (and expire its key) between a
# charge and the check: one token per 100 s.
SLOW_LIMIT = Limit(0.01, 20)
ENV = "TOKENLIMIT_HASH_SECRET"


def tag_of(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def keyed_tag(identity: bytes, key: bytes) -> str:
    digest = hashlib.blake2b(identity, digest_size=12, key=key).digest()
    return base64.urlsafe_b64encode(digest).decode()


@pytest.fixture(autouse=True)
def _no_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own TOKENLIMIT_HASH_SECRET must not change what these tests see."""
    monkeypatch.delenv(ENV, raising=False)


# -- keys ---------------------------------------------------------------------------------------
def test_without_a_secret_keys_are_those_of_before() -> None:
    """Pinned from the release before hash_secret: existing buckets keep working on upgrade."""
    assert build_request("tl:", "user:42", LIMIT).keys == ("tl:{-4ZJm6VjLNCWROnO}K6_tSfG-",)
    assert build_request("tl:", "user:42", (LIMIT, Limit.per_day(1000))).keys == (
        "tl:{-4ZJm6VjLNCWROnO}K6_tSfG-",
        "tl:{-4ZJm6VjLNCWROnO}7kEozCLN",
    )
    assert slots_key("tl:", "user:42") == "tl:{-4ZJm6VjLNCWROnO}:c"
    assert api_key_identity("sk_live_pinned") == "apikey:50aef386f80a2e46049bc643fbad8370"
    limiter = memory_limiter()
    assert limiter._request("user:42", LIMIT).keys == ("tl:{-4ZJm6VjLNCWROnO}K6_tSfG-",)
    assert not limiter.hashes_with_secret


def test_a_secret_keys_every_key() -> None:
    keyed = memory_limiter(hash_secret=SECRET)
    assert keyed.hashes_with_secret
    (key,) = keyed._request("user:42", LIMIT).keys
    assert tag_of(key) == keyed_tag(b"user:42", SECRET.encode())  # keyed BLAKE2b, 96 bits
    assert key.endswith("}K6_tSfG-")
    assert tag_of(key) != "-4ZJm6VjLNCWROnO"
    # Several limits and a chooser's limits: the same keyed tag.
    both = keyed._request("user:42", [LIMIT, Limit.per_day(1000)]).keys
    assert {tag_of(k) for k in both} == {tag_of(key)}
    assert tag_of(keyed._request("user:42", lambda key: LIMIT).keys[0]) == tag_of(key)
    # Another secret, another key; the same secret spelled as bytes or with a file's newline,
    # the same key.
    assert memory_limiter(hash_secret=OTHER)._request("user:42", LIMIT).keys != (key,)
    for same in (SECRET.encode(), f"  {SECRET}\n"):
        assert memory_limiter(hash_secret=same)._request("user:42", LIMIT).keys == (key,)
    # Concurrency slots: keyed alike, on the same tag as the identity's buckets.
    assert slots_key("tl:", "user:42", hasher_for(SECRET)) == f"tl:{{{tag_of(key)}}}:c"


def test_a_secret_longer_than_a_blake2b_key_is_hashed_down() -> None:
    long_one, long_two = "x" * 64 + "a" * 40, "x" * 64 + "b" * 40  # alike in the first 64 bytes
    derived = hashlib.blake2b(long_one.encode(), digest_size=64, person=b"tokenlimit:key").digest()
    (key,) = memory_limiter(hash_secret=long_one)._request("user:42", LIMIT).keys
    assert tag_of(key) == keyed_tag(b"user:42", derived)
    assert memory_limiter(hash_secret=long_two)._request("user:42", LIMIT).keys != (key,)
    # Exactly 64 bytes is used as the key itself.
    exact = "k" * 64
    (key,) = memory_limiter(hash_secret=exact)._request("user:42", LIMIT).keys
    assert tag_of(key) == keyed_tag(b"user:42", exact.encode())


@pytest.mark.parametrize(
    ("value", "kind", "says"),
    [
        ("", ConfigError, "must not be empty"),
        ("   \n", ConfigError, "must not be empty"),
        (b"", ConfigError, "must not be empty"),
        ("short-secret", ConfigError, "at least 16 bytes"),
        (b"\x00" * 15, ConfigError, "at least 16 bytes"),
        ("bad-surrogate-\ud800-0123456789", ConfigError, "UTF-8"),
        (12345678901234567890, TypeError, "str or bytes"),
        (bytearray(b"x" * 32), TypeError, "str or bytes"),
    ],
)
def test_bad_secrets_are_refused_naming_the_parameter(value: Any, kind: type, says: str) -> None:
    makers = [
        lambda: RateLimiter(MemoryBackend(), hash_secret=value),
        lambda: AsyncRateLimiter(MemoryBackend(), hash_secret=value),
        lambda: RateLimiter.from_url("memory://", hash_secret=value),
        lambda: AsyncRateLimiter.from_url("memory://", hash_secret=value),
        lambda: memory_limiter(hash_secret=value),
        lambda: async_memory_limiter(hash_secret=value),
        lambda: tokenlimit.configure("memory://", hash_secret=value),
    ]
    for make in makers:
        with pytest.raises(kind, match=says) as info:
            make()
        assert isinstance(info.value, ConfigError)
        assert info.value.param == "hash_secret"
        text = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
        if isinstance(value, (str, bytes)) and len(value.strip()) > 3:
            assert str(value.strip()) not in text
            assert repr(value) not in text


# -- shared buckets -----------------------------------------------------------------------------
def test_one_secret_shares_buckets_in_memory() -> None:
    store = MemoryBackend()
    sync = RateLimiter(store, hash_secret=SECRET)
    twin = AsyncRateLimiter(store, hash_secret=SECRET.encode())
    other = RateLimiter(store, hash_secret=OTHER)
    plain = RateLimiter(store)
    sync.try_acquire("user:1", SLOW_LIMIT, cost=5)
    assert asyncio.run(twin.peek("user:1", SLOW_LIMIT)).remaining == 15
    asyncio.run(twin.try_acquire("user:1", SLOW_LIMIT, cost=5))
    assert sync.peek("user:1", SLOW_LIMIT).remaining == 10
    assert other.peek("user:1", SLOW_LIMIT).remaining == 20
    assert plain.peek("user:1", SLOW_LIMIT).remaining == 20


def test_one_secret_shares_buckets_on_a_server(target: Target) -> None:
    identity = "user:shared-by-secret"

    async def charge_async(secret: str, cost: int) -> int:
        limiter = AsyncRateLimiter.from_url(target.url, timeout=5.0, hash_secret=secret)
        try:
            return (await limiter.try_acquire(identity, SLOW_LIMIT, cost=cost)).remaining
        finally:
            await limiter.aclose()

    with (
        RateLimiter.from_url(target.url, timeout=5.0, hash_secret=SECRET) as keyed,
        RateLimiter.from_url(target.url, timeout=5.0, hash_secret=OTHER) as other,
        RateLimiter.from_url(target.url, timeout=5.0) as plain,
    ):
        assert keyed.try_acquire(identity, SLOW_LIMIT, cost=4).remaining == 16
        assert asyncio.run(charge_async(SECRET, 3)) == 13
        assert keyed.peek(identity, SLOW_LIMIT).remaining == 13
        assert other.peek(identity, SLOW_LIMIT).remaining == 20
        assert plain.try_acquire(identity, SLOW_LIMIT).remaining == 19
        assert keyed.peek(identity, SLOW_LIMIT).remaining == 13
    client = target.client()
    try:
        stored = {key.decode() for key in client.scan_iter(match="tl:*")}
    finally:
        client.close()
    keyed_key = f"tl:{{{keyed_tag(identity.encode(), SECRET.encode())}}}{SLOW_LIMIT._id}"
    assert keyed_key in stored
    assert build_request("tl:", identity, SLOW_LIMIT).keys[0] in stored  # the unkeyed limiter's
    assert not any(SECRET in key or identity in key for key in stored)


def test_one_secret_shares_concurrency_slots(url: str) -> None:
    with (
        RateLimiter.from_url(url, timeout=5.0, hash_secret=SECRET) as keyed,
        RateLimiter.from_url(url, timeout=5.0, hash_secret=SECRET) as same,
        RateLimiter.from_url(url, timeout=5.0) as plain,
    ):
        if url == "memory://":  # one store for all three
            same = RateLimiter(keyed.backend, hash_secret=SECRET)
            plain = RateLimiter(keyed.backend)
        with keyed.concurrency("export:1", 1):
            with pytest.raises(tokenlimit.RateLimitExceeded), same.concurrency("export:1", 1):
                pass
            with plain.concurrency("export:1", 1) as decision:  # unkeyed: other slots
                assert decision.allowed


def test_the_request_cache_never_crosses_secrets() -> None:
    """One process, one store, limiters on different secrets (and none): a request cached for
    one is never handed to another, however hot the key."""
    store = MemoryBackend()
    first = RateLimiter(store, hash_secret=SECRET)
    second = RateLimiter(store, hash_secret=OTHER)
    plain = RateLimiter(store)
    _request._cache.clear()
    for _ in range(3):  # hot: cached after the first
        first.try_acquire("user:hot", LIMIT)
    assert second.try_acquire("user:hot", LIMIT).remaining == 19
    assert plain.try_acquire("user:hot", LIMIT).remaining == 19
    assert first.try_acquire("user:hot", LIMIT).remaining == 16
    tags = {tag_of(request.keys[0]) for entry, request in _request._cache.items()}
    assert len(tags) == 3
    # Equal secrets share one hasher, hence cache entries (and buckets).
    assert RateLimiter(store, hash_secret=SECRET)._hasher is first._hasher


# -- never shown --------------------------------------------------------------------------------
def test_the_secret_is_in_no_repr_error_or_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenlimit")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    shown: list[str] = []
    with RateLimiter.from_url(dead, timeout=0.2, failure_mode="open", hash_secret=SECRET) as lim:
        shown.append(repr(lim))
        shown.append(repr(lim.as_shadow()))
        lim.try_acquire("user:1", LIMIT)  # fails open: logged
    with RateLimiter.from_url(dead, timeout=0.2, hash_secret=SECRET) as closed:
        with pytest.raises(tokenlimit.BackendError) as info:
            closed.try_acquire("user:1", LIMIT)
        shown += [str(info.value), repr(info.value), repr(info.value.__cause__)]
    assert "hash_secret=<set>" in shown[0]
    assert "hash_secret" not in repr(memory_limiter())
    shown += [record.getMessage() for record in caplog.records]
    shown += [str(record.exc_info) for record in caplog.records]
    assert caplog.records  # the open failure was logged
    assert not any(SECRET in text for text in shown), shown


# -- the environment ----------------------------------------------------------------------------
def test_configure_and_the_default_limiter_read_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, SECRET)
    expected = memory_limiter(hash_secret=SECRET)._request("user:1", LIMIT).keys
    tokenlimit.configure("memory://")
    default = tokenlimit._config.default_sync_limiter()
    assert default.hashes_with_secret
    assert default._request("user:1", LIMIT).keys == expected
    assert tokenlimit._config.default_async_limiter().hashes_with_secret
    tokenlimit.configure("memory://", hash_secret=None)  # explicit: unkeyed
    assert not tokenlimit._config.default_sync_limiter().hashes_with_secret
    tokenlimit.configure("memory://", hash_secret=OTHER)  # explicit: its own
    assert tokenlimit._config.default_sync_limiter()._hasher is hasher_for(OTHER)
    tokenlimit.configure(None)  # nothing configured: TOKENLIMIT_URL (or memory://) and the env
    monkeypatch.setenv("TOKENLIMIT_URL", "memory://")
    assert tokenlimit._config.default_sync_limiter()._request("user:1", LIMIT).keys == expected
    # A limiter passed to configure is used as it was made.
    tokenlimit.configure(memory_limiter())
    assert not tokenlimit._config.default_sync_limiter().hashes_with_secret


def test_a_bad_secret_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOKENLIMIT_URL", "memory://")
    for bad in ("", "too-short"):
        monkeypatch.setenv(ENV, bad)
        for make in (
            lambda: tokenlimit.configure("memory://"),
            tokenlimit._config.default_sync_limiter,
        ):
            with pytest.raises(ConfigError, match=ENV) as info:
                make()
            assert info.value.param == ENV
            if bad:
                assert bad not in str(info.value)


def test_rate_limit_decorator_uses_the_environment_secret(
    standalone: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, SECRET)
    # configure() reads the environment as the unconfigured default does (the memory test above
    # shows both); it is used here for a deadline a loaded 2-core CI machine always meets.
    tokenlimit.configure(standalone.url, timeout=5.0)

    @tokenlimit.rate_limit("2/minute", key="user:{who}")
    def work(who: str) -> str:
        return who

    work("ann")
    with RateLimiter.from_url(standalone.url, timeout=5.0, hash_secret=SECRET) as keyed:
        assert keyed.peek("user:ann", Limit.parse("2/minute")).remaining == 1
    with RateLimiter.from_url(standalone.url, timeout=5.0) as plain:
        assert plain.peek("user:ann", Limit.parse("2/minute")).remaining == 2


# -- Flask --------------------------------------------------------------------------------------
def flask_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(TOKENLIMIT_LIMIT="3/hour", **config)
    TokenLimit(app)
    app.add_url_rule("/", "index", lambda: "ok")
    return app


@pytest.mark.parametrize("where", ["config", "environment"])
def test_flask_reads_the_secret_from_config_or_environment(
    standalone: Target, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config: dict[str, Any] = {"TOKENLIMIT_URL": standalone.url}
    if where == "config":
        config["TOKENLIMIT_HASH_SECRET"] = SECRET
        monkeypatch.setenv(ENV, OTHER)  # the config wins
    else:
        monkeypatch.setenv(ENV, SECRET)
    app = flask_app(**config)
    try:
        assert app.test_client().get("/").status_code == 200
        state = app.extensions["tokenlimit"]
        assert SECRET not in repr(state)
        with RateLimiter.from_url(standalone.url, timeout=5.0, hash_secret=SECRET) as keyed:
            assert keyed.peek("ip:127.0.0.1", Limit.parse("3/hour")).remaining == 2
    finally:
        app.extensions["tokenlimit"].limiter.close()


def test_flask_refuses_a_secret_it_would_not_apply() -> None:
    with pytest.raises(ConfigError, match="TOKENLIMIT_URL") as info:
        flask_app(TOKENLIMIT_HASH_SECRET=SECRET)  # the default limiter: not this config's
    assert info.value.param == "TOKENLIMIT_HASH_SECRET"
    assert SECRET not in str(info.value)
    for given in (memory_limiter(), memory_limiter(hash_secret=OTHER)):
        app = Flask(__name__)
        app.config["TOKENLIMIT_HASH_SECRET"] = SECRET
        with pytest.raises(ConfigError, match="limiter=") as info:
            TokenLimit(app, limiter=given)
        assert SECRET not in str(info.value)
    app = Flask(__name__)
    app.config["TOKENLIMIT_HASH_SECRET"] = SECRET
    TokenLimit(app, limiter=memory_limiter(hash_secret=SECRET.encode()))  # keyed alike: fine
    with pytest.raises(ConfigError, match="at least 16 bytes") as info:
        flask_app(TOKENLIMIT_URL="memory://", TOKENLIMIT_HASH_SECRET="short")
    assert info.value.param == "TOKENLIMIT_HASH_SECRET"


# -- Django -------------------------------------------------------------------------------------
def test_django_reads_hash_secret_then_the_environment(
    standalone: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = {"URL": standalone.url, "LIMIT": "3/hour", "TIMEOUT": 5.0}
    base = {**django_project.BASE, "TOKENLIMIT": entry}
    cases = [({"HASH_SECRET": SECRET}, OTHER), ({}, SECRET)]  # (entry, environment)
    for entry, env in cases:
        monkeypatch.setenv(ENV, env)
        settings = {**base, "TOKENLIMIT": {**base["TOKENLIMIT"], **entry}}
        with override_settings(**settings):
            assert checks.run_checks(tags=["tokenlimit"]) == []
            state = settings_state()
            assert state.sync.hashes_with_secret
            assert state.async_.hashes_with_secret
            assert Client(REMOTE_ADDR="198.51.100.7").get("/plain").status_code == 200
        with RateLimiter.from_url(standalone.url, timeout=5.0, hash_secret=SECRET) as keyed:
            assert keyed.peek("ip:198.51.100.7", Limit.parse("3/hour")).remaining == 2
            keyed.reset("ip:198.51.100.7", Limit.parse("3/hour"))
    assert SECRET not in repr(read({"HASH_SECRET": SECRET})[0])  # Options, as a log shows it
    # HASH_SECRET None: unkeyed, whatever the environment says.
    settings = {**base, "TOKENLIMIT": {**base["TOKENLIMIT"], "HASH_SECRET": None}}
    with override_settings(**settings):
        assert not settings_state().sync.hashes_with_secret


def test_django_reports_a_bad_secret_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = "short-secret!"
    entries = {"URL": "memory://", "LIMIT": "3/hour", "HASH_SECRET": bad}
    with override_settings(**{**django_project.BASE, "TOKENLIMIT": entries}):
        messages = checks.run_checks(tags=["tokenlimit"])
    assert [m.id for m in messages] == ["tokenlimit.E022"]
    assert "HASH_SECRET" in messages[0].msg
    assert bad not in messages[0].msg
    monkeypatch.setenv(ENV, bad)
    with override_settings(**django_project.BASE):
        messages = checks.run_checks(tags=["tokenlimit"])
    assert [m.id for m in messages] == ["tokenlimit.E022"]
    assert ENV in messages[0].msg
    assert bad not in messages[0].msg


# -- the command line ---------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--timeout", "5"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_peek_with_the_environment_secret_sees_the_apps_bucket(
    standalone: Target, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with RateLimiter.from_url(standalone.url, timeout=5.0, hash_secret=SECRET) as app:
        app.try_acquire("user:carol", Limit.parse("5/minute"), cost=3)
    who = ["peek", standalone.url, "--limit", "5/minute", "--user", "carol", "--json"]

    monkeypatch.setenv(ENV, SECRET)
    code, out, err = cli(capsys, *who)
    doc = json.loads(out)
    assert (code, doc["remaining"], doc["keyed"], doc["hash_secret_env"]) == (0, 2, True, ENV)
    code, out, _ = cli(capsys, *who[:-1])
    assert "hashing      keyed (TOKENLIMIT_HASH_SECRET)" in out
    assert SECRET not in out + err

    monkeypatch.delenv(ENV)  # unkeyed: an untouched bucket, and it says so
    code, out, _ = cli(capsys, *who)
    assert (json.loads(out)["remaining"], json.loads(out)["keyed"]) == (5, False)

    monkeypatch.setenv("APP_HASH_SECRET", SECRET)  # a variable of the operator's choice
    code, out, err = cli(capsys, *who, "--hash-secret-env", "APP_HASH_SECRET")
    assert (code, json.loads(out)["remaining"]) == (0, 2)
    code, out, err = cli(capsys, "reset", *who[1:-1], "--hash-secret-env", "APP_HASH_SECRET")
    assert code == 0
    assert "remaining    5" in out
    assert SECRET not in out + err
    with RateLimiter.from_url(standalone.url, timeout=5.0, hash_secret=SECRET) as app:
        assert app.peek("user:carol", Limit.parse("5/minute")).remaining == 5  # refilled

    code, out, err = cli(capsys, *who, "--hash-secret-env", "NOT_SET_ANYWHERE")
    assert code == EXIT_USAGE
    assert "NOT_SET_ANYWHERE is not set" in err

    monkeypatch.setenv(ENV, "short!")
    code, out, err = cli(capsys, *who[:-1])
    assert code == EXIT_USAGE
    assert ENV in err
    assert "short!" not in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
