"""The ``tokenlimit`` command line (also ``python -m tokenlimit``): ``check``, ``peek``, ``reset``,
``bench`` and ``override`` against a server, for operators and support. Each command is a
module here.

Output is for people by default, one JSON document with ``--json``. Everything printed passes
through the URL's redaction (``_url.scrub``), and every failure ends as one line on stderr with
an exit code a script can test, never a traceback:

    0  done; for ``check``: the limiter can work with this server (warnings aside)
    1  the server answered, but the limiter cannot work with it (an ACL, a replica, slots
       without a master, a refused script, a failed decision); or an unexpected error
    2  bad usage: arguments, URL or limit (argparse's own code)
    3  no server answered: connection refused, timeout, TLS, name resolution, no primary
  130  interrupted
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from tokenlimit import __version__
from tokenlimit._base import DEFAULT_PREFIX, DEFAULT_TIMEOUT
from tokenlimit._url import parse_url, scrub

from . import bench, bucket, check, override
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Output,
    Problem,
    problem_of,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]

_Command = Callable[[str, argparse.Namespace, Output], None]
_COMMANDS: dict[str, _Command] = {
    "check": check.run,
    "peek": bucket.peek,
    "reset": bucket.reset,
    "bench": bench.run,
    "override": override.run,
}


class _Usage(Exception):
    """argparse's error, raised instead of exiting, so that ``main`` can scrub it and return."""

    def __init__(self, usage: str, message: str) -> None:
        self.usage = usage
        super().__init__(message)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(self.format_usage(), f"{self.prog}: error: {message}")


_URL_HELP = (
    "redis://, rediss://, redis+cluster://, redis+sentinel://... (or valkey://...); "
    "default $TOKENLIMIT_URL, which keeps a password off the command line"
)


def _parser() -> _Parser:
    options = _Parser(add_help=False)
    options.add_argument("--json", action="store_true", help="one JSON document on stdout")
    options.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds for one decision or command, as the limiter's timeout= ({DEFAULT_TIMEOUT})",
    )
    options.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"the limiter's prefix= ({DEFAULT_PREFIX!r})"
    )
    common = _Parser(add_help=False, parents=[options])
    common.add_argument("url", nargs="?", help=_URL_HELP)
    parser = _Parser(
        prog="tokenlimit",
        description="Check a Redis or Valkey server for tokenlimit, read or refill one "
        "identity's bucket, or measure decisions per second.",
        epilog="exit codes: 0 ok, 1 the limiter cannot work with the server (or the command "
        "failed), 2 bad usage, 3 server unreachable, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"tokenlimit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "check",
        parents=[common],
        help="can the limiter work with this server? (exit 0 when it can)",
        description="Connect, then report what the limiter depends on: the server's version, "
        "its topology (a cluster's masters, slots and replicas; Sentinel's primary and "
        "replicas), maxmemory-policy, the ACL rules the limiter's user needs, script loading, "
        "and the latency of 100 decisions on a scratch key (reset afterwards). Exit 0 when the "
        "limiter can work; otherwise one line naming the problem.",
    )
    for name, what in (("peek", "read"), ("reset", "refill")):
        bucket.add_options(
            commands.add_parser(
                name,
                parents=[common],
                help=f"{what} one identity's bucket",
                description=f"{what.capitalize()} one identity's bucket, named as the "
                "integrations name it: --api-key (hashed), --user or --ip (IPv6 grouped by "
                "--ipv6-prefix), or a raw --key; with --route or --scope for a per-route or "
                "shared limit. A bucket belongs to a key and a limit: --limit names the "
                "limit(s) as the app gives them.",
            )
        )
    commands.add_parser(
        "bench",
        parents=[common],
        help="decisions per second against this server, beside redis-py's EVALSHA floor",
        description="Sync decisions per second and their latency on a scratch key, one thread, "
        "interleaved in rounds with redis-py's EVALSHA of 'return 1' on the same server (the "
        "floor); prints both and their ratio, then deletes its key.",
    ).add_argument(
        "--seconds", type=float, default=10.0, help="the whole run, both sides (default 10)"
    )
    overrides = commands.add_parser(
        "override",
        help="change or block a named limit for every process, for a while (brownout)",
        description="Live overrides: every limiter sharing the server decides the limit "
        "labelled NAME (as metrics show it) at another rate, or refuses it, within a second "
        "of its next decision, until the override is cleared or ends on its own.",
    )
    actions = overrides.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, what in (
        ("set", "set or replace an override: NAME LIMIT --for 15m, or NAME --block --for 15m"),
        ("clear", "end the override of NAME now"),
        ("list", "the overrides in force, with the time each has left"),
    ):
        sub = actions.add_parser(action, parents=[options], help=what, description=what)
        sub.add_argument("--url", help=_URL_HELP)
        override.add_options(sub, action)
    return parser


def _url_of(given: str | None) -> str:
    url = given or os.environ.get("TOKENLIMIT_URL")
    if not url:
        raise Problem(EXIT_USAGE, "no URL: give one, or set TOKENLIMIT_URL")
    scheme, _ = parse_url(url)
    if scheme == "memory":
        raise Problem(EXIT_USAGE, "memory:// lives inside one process: give the server's URL")
    return url


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """Keep the library's own log lines (the eviction warning after a first decision) off
    stderr, where Python's last-resort handler would print them: the command says it in its
    own words. Handlers an application configured still get them."""
    logger = logging.getLogger("tokenlimit")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except _Usage as usage:
        message = str(usage)
        for url in (arg for arg in argv if "://" in arg):
            message = scrub(message, url)
        print(f"{usage.usage.rstrip()}\n{message}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else EXIT_OK
    given = args.url or os.environ.get("TOKENLIMIT_URL") or ""
    command = args.command if args.command != "override" else f"override {args.action}"
    out = Output(command, given, as_json=args.json)
    try:
        problem = None
        try:
            with _quiet_logs():
                _COMMANDS[args.command](_url_of(args.url), args, out)
        except KeyboardInterrupt:
            problem = Problem(EXIT_INTERRUPTED, "interrupted")
        except BrokenPipeError:
            raise
        except Exception as exc:  # every failure ends as one line: see the module docstring
            problem = problem_of(exc)
        return out.finish(problem)
    except BrokenPipeError:  # the reader left (``| head``): nobody to tell
        _silence_stdout()
        return EXIT_FAILED


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test's capture)
        pass
    finally:
        os.close(devnull)
