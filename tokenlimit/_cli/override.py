"""``tokenlimit override set|clear|list``: live overrides (brownout) from a shell, for every
process sharing the server (``RateLimiter.set_override`` and friends, see ``_overrides.py``).

    tokenlimit override set NAME LIMIT --for 15m [--burst B] [--reason TEXT]
    tokenlimit override set NAME --block --for 15m
    tokenlimit override clear NAME
    tokenlimit override list

``NAME`` is the limit's label, as ``tokenlimit_decisions_total{limit=...}`` shows it. The URL is
``--url`` (or ``TOKENLIMIT_URL``): the positionals are the limit's.
"""

from __future__ import annotations

import argparse
import re

from tokenlimit._overrides import Override

from .common import EXIT_USAGE, Output, Problem, limiter_for

__all__ = ["add_options", "duration", "run"]

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhd]?))", re.IGNORECASE)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """``"15m"``, ``"90s"``, ``"1h30m"``, ``"2d"`` or plain seconds, in seconds."""
    spaced = text.strip().lower()
    parts = _DURATION.findall(spaced)
    if not spaced or "".join(n + u for n, u in parts) != spaced.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"not a duration like 15m, 90s or 1h30m: {text!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def add_options(parser: argparse.ArgumentParser, action: str) -> None:
    if action in ("set", "clear"):
        parser.add_argument("name", help="the limit's label, as metrics show it (limit=...)")
    if action == "set":
        parser.add_argument(
            "limit", nargs="?", help="the limit to decide with: '5/second', '100/minute'"
        )
        parser.add_argument("--burst", type=int, help="the override's burst (default: its count)")
        parser.add_argument(
            "--block", action="store_true", help="refuse every call of the limit instead"
        )
        parser.add_argument(
            "--for",
            dest="seconds",
            type=duration,
            required=True,
            help="how long: 15m, 90s, 1h30m (at most 7d); it ends on its own",
        )
        parser.add_argument("--reason", default="", help="shown by list and in every log line")


def _row(item: Override) -> dict[str, object]:
    limit = item.limit
    return {
        "name": item.name,
        "block": item.block,
        "rate": None if limit is None else limit.rate,
        "burst": None if limit is None else limit.burst,
        "expires_in": round(item.expires_in, 3),
        "reason": item.reason,
    }


def _show(out: Output, found: tuple[Override, ...]) -> None:
    for item in found:
        why = f" ({item.reason})" if item.reason else ""
        out.row(item.name, f"{item.describe()}, {item.expires_in:.0f} s left{why}")
    if not found:
        out.row("overrides", "none")
    out.set(overrides=[_row(item) for item in found])


def run(url: str, args: argparse.Namespace, out: Output) -> None:
    action: str = args.action
    with limiter_for(url, args) as limiter:
        if action == "set":
            if args.block == (args.limit is not None):
                raise Problem(EXIT_USAGE, "give a LIMIT or --block (one of them)")
            made = limiter.set_override(
                args.name,
                args.limit,
                seconds=args.seconds,
                burst=args.burst,
                block=args.block,
                reason=args.reason,
            )
            out.row("set", f"{made.name}: {made.describe()} for {made.expires_in:.0f} s")
            out.set(override=_row(made))
            found = limiter.list_overrides()
        elif action == "clear":
            cleared = limiter.clear_override(args.name)
            out.row("cleared" if cleared else "absent", args.name)
            out.set(cleared=cleared)
            found = limiter.list_overrides()
        else:
            found = limiter.list_overrides()
    _show(out, found)
