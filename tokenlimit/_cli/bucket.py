"""``tokenlimit peek`` and ``tokenlimit reset``: one identity's bucket, spelled the way the
integrations spell it (``tokenlimit.integrations._common`` and ``_check.bucket_key``), so that
support can see and refill exactly what a customer is charged:

- ``--api-key K``: ``apikey:<hash of K>``; ``--user U``: ``user:U``; ``--ip A``: ``ip:A``, IPv6
  grouped by ``--ipv6-prefix`` (64) and IPv4 unmapped first, ``--ip unknown`` for the bucket of
  clients without an address; ``--key RAW``: a limiter key as the caller gave it;
- ``--route R``: ``route:R|<identity>``; ``--scope S``: ``scope:S|<identity>``; neither: the
  identity alone (a middleware's, an app-wide default's).

A bucket belongs to a key and a limit, so ``--limit`` (with ``--burst`` and ``--name``) names
the limit(s) as the app does. Identities are hashed as the app hashes them: with the secret in
``TOKENLIMIT_HASH_SECRET`` (the app's own variable), or in the variable ``--hash-secret-env``
names; never a secret given as a flag's value, which ``ps`` and the shell's history would keep.
"""

from __future__ import annotations

import argparse
import os
import re

from tokenlimit._decision import Decision
from tokenlimit._hash_secret import ENV_HASH_SECRET, hasher_for
from tokenlimit._limit import Limit
from tokenlimit._plan import LimitPlan
from tokenlimit.integrations._check import bucket_key, check_scope
from tokenlimit.integrations._common import UNKNOWN_IP, _parse_ip, api_key_identity, ip_identity

from .common import EXIT_USAGE, Output, Problem, limiter_for

__all__ = ["add_options", "key_of", "limits_of", "peek", "reset"]

_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        required=True,
        help="the limit(s) as the app gives them: '100/minute', '10/hour;100/day', or a "
        "number per second",
    )
    parser.add_argument("--burst", type=int, help="the limit's burst=, if the app gives one")
    parser.add_argument("--name", help="the limit's name=, if the app names it")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--api-key", help="an API key (hashed, as the integrations hash it)")
    who.add_argument("--user", help="a signed-in user's id")
    who.add_argument("--ip", help="a client's address, or 'unknown'")
    who.add_argument("--key", help="a raw limiter key, as given to try_acquire or @rate_limit")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--route",
        help="a per-route limit's route: FastAPI's 'GET /items/{item_id}', Flask's endpoint, "
        "Django's dotted view",
    )
    where.add_argument("--scope", help="a shared limit's scope= (DRF: the throttle's scope)")
    parser.add_argument(
        "--ipv6-prefix", type=int, default=64, help="the integrations' ipv6_prefix= (default 64)"
    )
    parser.add_argument(
        "--hash-secret-env",
        metavar="NAME",
        help=f"the environment variable holding the app's hash_secret (default {ENV_HASH_SECRET},"
        " unkeyed hashing when it is unset); never the secret itself on the command line",
    )


def limits_of(args: argparse.Namespace) -> tuple[Limit, ...]:
    """``--limit`` in every spelling a limit takes, with ``--burst`` and ``--name`` (both part
    of the bucket, as the rate is)."""
    text: str = args.limit
    rate: float | str = float(text) if _NUMBER.fullmatch(text.strip()) else text
    limits = LimitPlan.of(rate, args.burst, name="limit").limits
    if args.name is None:
        return limits
    if len(limits) > 1:
        raise Problem(EXIT_USAGE, "--name goes with one limit: give each limit on its own")
    return (Limit(limits[0].rate, limits[0].burst, name=args.name),)


def key_of(args: argparse.Namespace) -> str:
    """The limiter key the integrations charge for these options."""
    if args.key is not None:
        if args.route is not None or args.scope is not None:
            raise Problem(EXIT_USAGE, "--route and --scope name an identity's bucket, not --key's")
        return str(args.key)
    if args.api_key is not None:
        identity = api_key_identity(args.api_key)
    elif args.user is not None:
        identity = f"user:{args.user}"
    elif args.ip.strip().lower() == "unknown":
        identity = UNKNOWN_IP
    else:
        if not 0 <= args.ipv6_prefix <= 128:
            raise Problem(EXIT_USAGE, f"--ipv6-prefix: must be 0 to 128, not {args.ipv6_prefix}")
        address = _parse_ip(args.ip)
        if address is None:
            raise Problem(EXIT_USAGE, f"--ip: not an IP address: {args.ip!r}")
        identity = ip_identity(address, args.ipv6_prefix)
    return bucket_key(identity, route=args.route, scope=check_scope(args.scope))


def hash_secret_of(args: argparse.Namespace) -> tuple[str | None, str]:
    """The app's hash secret from the environment, and the variable it was read from. A
    variable named by ``--hash-secret-env`` must be set (a typo must not silently look at
    unkeyed buckets); the default one may be unset (unkeyed, as the app without a secret)."""
    name: str = args.hash_secret_env or ENV_HASH_SECRET
    secret = os.environ.get(name)
    if secret is None and args.hash_secret_env is not None:
        raise Problem(EXIT_USAGE, f"--hash-secret-env: {name} is not set in the environment")
    hasher_for(secret, name)  # a bad secret: a ConfigError naming the variable, not the value
    return secret, name


def _show_hashing(out: Output, secret: str | None, name: str) -> None:
    keyed = secret is not None
    out.row("hashing", f"keyed ({name})" if keyed else f"unkeyed ({name} is not set)")
    out.set(keyed=keyed, hash_secret_env=name)


def _show(out: Output, key: str, decision: Decision) -> None:
    parts = decision.details or (decision,)
    out.row("key", key)
    out.row("limit", f"{decision.limit} ({decision.policy.label if decision.policy else '?'})")
    out.row("remaining", str(decision.remaining))
    out.row("retry_after", f"{decision.retry_after:.3f} s")
    out.row("reset_after", f"{decision.reset_after:.3f} s")
    if len(parts) > 1:
        out.row(
            "limits",
            *(
                f"{p.policy.label if p.policy else '?'}: remaining {p.remaining} of {p.limit}, "
                f"retry_after {p.retry_after:.3f} s, reset_after {p.reset_after:.3f} s"
                for p in parts
            ),
        )
    out.set(
        key=key,
        allowed=decision.allowed,  # a call of cost 1 would be admitted now
        limit=decision.limit,
        remaining=decision.remaining,
        retry_after=decision.retry_after,
        reset_after=decision.reset_after,
        limits=[
            {
                "label": p.policy.label if p.policy else None,
                "rate": p.policy.rate if p.policy else None,
                "burst": p.limit,
                "remaining": p.remaining,
                "retry_after": p.retry_after,
                "reset_after": p.reset_after,
            }
            for p in parts
        ],
    )


def peek(url: str, args: argparse.Namespace, out: Output) -> None:
    limits, key = limits_of(args), key_of(args)
    secret, name = hash_secret_of(args)
    with limiter_for(url, args, secret) as limiter:
        decision = limiter.peek(key, limits)
    _show(out, key, decision)
    _show_hashing(out, secret, name)


def reset(url: str, args: argparse.Namespace, out: Output) -> None:
    limits, key = limits_of(args), key_of(args)
    secret, name = hash_secret_of(args)
    with limiter_for(url, args, secret) as limiter:
        limiter.reset(key, limits)
        decision = limiter.peek(key, limits)  # what the next caller finds
    out.row("reset", f"{key}: full again")
    out.set(reset=True)
    _show(out, key, decision)
    _show_hashing(out, secret, name)
