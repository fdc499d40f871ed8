"""A password in a URL never reaches an error message: not ours, not redis-py's, not a chained
cause, not Django's start-up check. A password holding an unescaped ``/``, ``#`` or ``?`` makes
``urlsplit`` end the host part early, so the password's pieces land in the port, the path, the
query or the fragment: no piece of it may be echoed either (issue 13, defect 4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import django_project
import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings

from servers import free_port
from tokenlimit import (
    AsyncRateLimiter,
    BackendError,
    ConfigError,
    Limit,
    RateLimiter,
    TokenLimitError,
    configure,
)

django_project.setup()

# Two pieces unlike any word a message holds, so that any 3 characters of either, found in a
# message, can only have come from the password.
HEAD, TAIL = "zQ9xK4v", "Wy8pL3j"
PASSWORDS = {
    "slash": f"{HEAD}/{TAIL}",
    "hash": f"{HEAD}#{TAIL}",
    "query": f"{HEAD}?{TAIL}",
    "query-option": f"{HEAD}?a={TAIL}",  # an '@' in a query option's value is not refused
}
CLEAN = f"{HEAD}{TAIL}"  # a password that needs no escaping, in a URL wrong elsewhere

# scheme -> (a URL with the password {pw}, URLs with a normal password and a bad port or db)
SCHEMES: dict[str, tuple[str, list[str]]] = {
    "redis": (
        "redis://user:{pw}@127.0.0.1:6379/0",
        ["redis://user:{pw}@127.0.0.1:notaport/0", "redis://:{pw}@127.0.0.1:6379/1O"],
    ),
    "rediss": (
        "rediss://:{pw}@127.0.0.1:6379/0",
        ["rediss://user:{pw}@127.0.0.1:99999/0", "rediss://user:{pw}@127.0.0.1:6379/x"],
    ),
    "redis+cluster": (
        "redis+cluster://user:{pw}@127.0.0.1:7000",
        ["redis+cluster://user:{pw}@127.0.0.1:abc", "redis+cluster://:{pw}@127.0.0.1:7000,h:x"],
    ),
    "redis+sentinel": (
        "redis+sentinel://user:{pw}@127.0.0.1:26379/mymaster/0",
        [
            "redis+sentinel://user:{pw}@127.0.0.1:abc/mymaster",
            "redis+sentinel://:{pw}@127.0.0.1:26379/mymaster/x",
        ],
    ),
}


def _bad_urls() -> Iterator[tuple[str, str, str]]:
    """(test id, URL, password) for every scheme: each unescaped character, then bad ports and
    databases with a password that needs no escaping."""
    for scheme, (template, others) in SCHEMES.items():
        for name, password in PASSWORDS.items():
            yield f"{scheme}-{name}", template.format(pw=password), password
        for i, other in enumerate(others):
            yield f"{scheme}-bad{i}", other.format(pw=CLEAN), CLEAN


BAD_URLS = list(_bad_urls())


def _async_from_url(url: str, **options: Any) -> AsyncRateLimiter:
    async def main() -> AsyncRateLimiter:
        return AsyncRateLimiter.from_url(url, **options)

    return asyncio.run(main())


BUILDERS: dict[str, Callable[..., Any]] = {
    "sync": RateLimiter.from_url,
    "async": _async_from_url,
    "configure": configure,
}


def fragments(password: str) -> set[str]:
    """Every 3-character run of the password (each longer fragment contains one)."""
    return {password[i : i + 3] for i in range(len(password) - 2)}


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and every exception chained to it, as cause or as context."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [item.__cause__, item.__context__]


def assert_clean(exc: BaseException, password: str) -> None:
    for item in chain(exc):
        for text in (str(item), repr(item), *map(repr, item.args)):
            leaked = sorted(f for f in fragments(password) if f in text)
            assert not leaked, f"{leaked} of the password in {type(item).__name__}: {text!r}"


@pytest.fixture(autouse=True)
def _forget_configuration() -> Iterator[None]:
    yield
    configure(None)


@pytest.mark.parametrize("build", list(BUILDERS.values()), ids=list(BUILDERS))
@pytest.mark.parametrize(
    ("url", "password"), [u[1:] for u in BAD_URLS], ids=[u[0] for u in BAD_URLS]
)
def test_a_bad_url_never_echoes_its_password(
    build: Callable[..., Any], url: str, password: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(url, timeout=0.2)
    assert info.value.param == "url"
    assert_clean(info.value, password)


@pytest.mark.parametrize(
    ("url", "password"), [u[1:] for u in BAD_URLS], ids=[u[0] for u in BAD_URLS]
)
def test_django_check_never_echoes_the_password(url: str, password: str) -> None:
    with override_settings(TOKENLIMIT={"URL": url, "LIMIT": "3/minute"}):
        messages = checks.run_checks()
    errors = [m for m in messages if m.id == "tokenlimit.E002"]
    assert len(errors) == 1, [m.msg for m in messages]
    for message in messages:
        for text in (message.msg, str(message.hint), repr(message)):
            assert not [f for f in fragments(password) if f in text], text


@pytest.mark.parametrize(
    ("url", "password"), [u[1:] for u in BAD_URLS[::3]], ids=[u[0] for u in BAD_URLS[::3]]
)
def test_django_start_up_never_echoes_the_password(url: str, password: str) -> None:
    with (
        override_settings(TOKENLIMIT={"URL": url, "LIMIT": "3/minute"}),
        pytest.raises(ImproperlyConfigured) as info,
    ):
        Client().get("/plain")
    assert "E002" in str(info.value)
    assert_clean(info.value, password)


# -- a password read as a port: refused before anything connects ---------------------------------


def _port_urls() -> Iterator[tuple[str, str, str]]:
    """A password that starts with digits and then an unescaped ``#`` or ``?``: ``urlsplit``
    reads the digits as the port of a host named by the user name (or of no host), a URL that
    connects, to the wrong server, and whose connection errors would name that "port"."""
    port = free_port()
    for mark in "#?":
        password = f"{port}{mark}{TAIL}"
        yield f"redis{mark}", f"redis://:{password}@127.0.0.1:6379/0", password
        yield f"rediss-user{mark}", f"rediss://127.0.0.1:{password}@127.0.0.1:6379/0", password
        yield f"cluster{mark}", f"redis+cluster://127.0.0.1:{password}@127.0.0.1:7000", password


PORT_URLS = list(_port_urls())


def build_and_decide(build: Callable[..., Any], url: str) -> None:
    """Make a limiter on ``url`` with ``build`` and take one decision with it."""
    limiter = build(url, timeout=0.2)
    if limiter is None:  # configure()
        from tokenlimit._config import default_async_limiter, default_sync_limiter

        limiter = default_sync_limiter()
        asyncio.run(default_async_limiter().try_acquire("k", Limit(1)))
    if isinstance(limiter, RateLimiter):
        limiter.try_acquire("k", Limit(1))
    else:
        asyncio.run(limiter.try_acquire("k", Limit(1)))


@pytest.mark.parametrize("build", list(BUILDERS.values()), ids=list(BUILDERS))
@pytest.mark.parametrize(
    ("url", "password"), [u[1:] for u in PORT_URLS], ids=[u[0] for u in PORT_URLS]
)
def test_a_password_read_as_a_port_is_refused(
    build: Callable[..., Any], url: str, password: str
) -> None:
    """Refused at the call that received the URL; were it accepted, the first decision's
    BackendError ("Error 111 connecting to 127.0.0.1:<the password's digits>") would carry it."""
    with pytest.raises(TokenLimitError) as info:
        build_and_decide(build, url)
    assert isinstance(info.value, ConfigError), repr(info.value)
    assert_clean(info.value, password)


def test_an_at_sign_in_a_query_value_still_works() -> None:
    """Only an ``@`` that cannot belong to the URL as written is refused: one in a query value
    (a client name, a sentinel's password) is read as before."""
    RateLimiter.from_url("redis://127.0.0.1:6379/0?client_name=me@host", timeout=0.2).close()
    _async_from_url("redis+sentinel://127.0.0.1:26379/mymaster?sentinel_password=p@ss")


def test_a_cluster_that_cannot_be_reached_is_a_backend_error() -> None:
    """A ``redis+cluster://`` URL connects when the limiter is made: a failure there is a
    BackendError (not redis-py's own exception), and carries no password."""
    port = free_port()
    with pytest.raises(BackendError) as info:
        RateLimiter.from_url(f"redis+cluster://user:{CLEAN}@127.0.0.1:{port}", timeout=0.2)
    assert info.value.reason == "connection"
    assert str(port) in str(info.value)  # the address stays: it is what an operator needs
    assert_clean(info.value, CLEAN)


# -- redact() --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:secret@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:secret@h/0", "redis://:***@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://user:pa/ss@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:p#w@h/0", "redis://:***@h/0"),
        ("redis://:p?w@h/0", "redis://:***@h/0"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),
        ("redis+sentinel://h:26379/m?sentinel_password=sp&db=1", "redis+sentinel://h:26379/m?sentinel_password=***&db=1"),
        ("redis://h/0?password=x", "redis://h/0?password=***"),
        ("memory://", "memory://"),
    ],
)  # fmt: skip
def test_redact(url: str, expected: str) -> None:
    from tokenlimit._url import redact

    assert redact(url) == expected


@pytest.mark.parametrize(
    ("text", "url", "expected"),
    [
        ("as 'zQ9xK4v'", f"redis://u:{PASSWORDS['slash']}@h/0", "as '***'"),
        ("node 'u:Wy8p'", f"redis+cluster://u:{HEAD}?Wy8p=1@h", "node 'u:***'"),
        ("as 'ab'; db 0", "redis://:ab/cdefg@h/0", "as '***'; db 0"),  # a short piece, alone
        ("about 'abc'", "redis://:p%2Fabc@h/0", "about '***'"),  # percent-decoded too
        ("in redis://u:s3cr3t@h/0", "redis://u:s3cr3t@h/0", "in redis://u:***@h/0"),
        ("sp4ss wrong", "redis+sentinel://h/m?sentinel_password=sp4ss", "*** wrong"),
        ("nothing to hide", "redis://h:6379/0", "nothing to hide"),
    ],
)
def test_scrub(text: str, url: str, expected: str) -> None:
    from tokenlimit._url import scrub

    assert scrub(text, url) == expected
