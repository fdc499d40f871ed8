"""What every command shares: exit codes, the one-line ``Problem``, the scrubbed ``Output``, and
the limiter and client a command works through."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from redis import exceptions as rx

from tokenlimit._errors import BackendError, ConfigError
from tokenlimit._limiter import RateLimiter
from tokenlimit._redis.replies import classify
from tokenlimit._redis.sync import RedisBackend
from tokenlimit._url import redact, scrub

if TYPE_CHECKING:
    from redis import Redis
    from redis.cluster import RedisCluster

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Output",
    "Problem",
    "chain",
    "client_of",
    "latency",
    "limiter_for",
    "problem_of",
    "scratch_key",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class Problem(Exception):
    """What ends a command: one line and its exit code."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class Output:
    """Rows for people, printed as they come (a slow step shows where it got to), or one JSON
    document at the end; the closing line on stderr. Every string is scrubbed of the URL's
    password; a row and the closing line are kept to one line each."""

    def __init__(self, command: str, url: str, *, as_json: bool) -> None:
        self.url = url
        self.as_json = as_json
        self.doc: dict[str, object] = {"command": command, "url": redact(url)}
        self.warnings: list[str] = []

    def clean(self, value: object) -> object:
        """``value`` (a string, or JSON data holding strings) without the URL's password."""
        if isinstance(value, str):
            return scrub(value, self.url)
        if isinstance(value, dict):
            return {key: self.clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.clean(item) for item in value]
        return value

    def line(self, text: str) -> str:
        """``text`` scrubbed, on one line (a server's error may hold line breaks)."""
        return " ".join(scrub(text, self.url).splitlines())

    def row(self, name: str, text: str, *more: str) -> None:
        """``name`` then ``text``, and each of ``more`` on a line of its own under the text."""
        if not self.as_json:
            lines = [f"{name:<12} {self.line(text)}", *(f"{'':<15}{self.line(m)}" for m in more)]
            print("\n".join(lines), flush=True)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.row("warning", text)

    def set(self, **fields: object) -> None:
        """Fields of the JSON document."""
        self.doc.update(fields)

    def finish(self, problem: Problem | None) -> int:
        """Print the JSON document (``--json``) and the problem's line; return the exit code."""
        code = EXIT_OK if problem is None else problem.code
        if self.as_json:
            message = None if problem is None else self.line(str(problem))
            self.set(ok=problem is None, exit=code, problem=message, warnings=self.warnings)
            print(json.dumps(self.clean(self.doc), indent=2), flush=True)
        if problem is not None:
            print(f"tokenlimit: {self.line(str(problem))}", file=sys.stderr, flush=True)
        return code


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _without_clients(text: str) -> str:
    """``text`` without the reprs of redis-py clients that some of its errors embed (a sentinel
    that did not answer is named by its whole client, a line of connection options)."""
    while (start := text.find("<redis.")) >= 0:
        depth, end = 0, start
        for end in range(start, len(text)):
            depth += {"<": 1, ">": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = f"{text[:start]}a sentinel{text[end + 1 :]}"
    return text


def problem_of(exc: BaseException) -> Problem:
    """The one line (and exit code) for an exception that ended a command."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, ConfigError):
        return Problem(EXIT_USAGE, str(exc))
    if isinstance(exc, (rx.RedisError, OSError)):
        exc = classify(exc)
    if not isinstance(exc, BackendError):
        return Problem(EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc}")
    detail = _without_clients(re.sub(r"^storage failed \(\w+\): ", "", str(exc)))
    if any(isinstance(item, rx.AuthenticationError) for item in chain(exc)):
        return Problem(EXIT_FAILED, f"authentication failed: {detail}")
    if exc.reason in ("connection", "timeout"):
        return Problem(EXIT_UNREACHABLE, f"cannot reach the server: {detail}")
    return Problem(EXIT_FAILED, detail)


def limiter_for(url: str, args: argparse.Namespace, hash_secret: str | None = None) -> RateLimiter:
    """A limiter on ``url`` that decides as the app's does (its prefix, deadline and hash
    secret), but caches no refusal: every answer is the server's."""
    return RateLimiter.from_url(
        url,
        prefix=args.prefix,
        timeout=args.timeout,
        local_cache=False,
        hash_secret=hash_secret,
    )


def client_of(limiter: RateLimiter) -> Redis | RedisCluster:
    """The redis-py client the limiter made from the URL (its TLS, Sentinel, cluster and
    timeout options), for the commands that are not decisions."""
    backend = limiter.backend
    if not isinstance(backend, RedisBackend):  # from_url makes one for every server scheme
        raise Problem(EXIT_USAGE, "not a Redis or Valkey URL")
    return backend.client


def scratch_key(command: str) -> str:
    """A limiter key of this run's own, ``<command>:<pid>:<random>``, for a scratch bucket.
    Under the limiter's prefix, hashed as every key is: the server sees the very key shape
    (and ACL key pattern) the app's decisions use, and no real bucket can share it."""
    return f"{command}:{os.getpid()}:{secrets.token_hex(6)}"


def latency(samples: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) of ``samples`` in seconds, as milliseconds."""
    ordered = sorted(samples)
    ranks = {"p50_ms": 0.50, "p99_ms": 0.99}
    return {
        name: round(ordered[max(0, math.ceil(len(ordered) * share - 1e-9) - 1)] * 1000, 4)
        for name, share in ranks.items()
    }
