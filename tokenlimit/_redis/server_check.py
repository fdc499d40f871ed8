"""Can the server evict buckets? Asked once per backend, at its first decision.

An evicted bucket is a full bucket: the next caller is admitted as if it had never spent
anything, so a server that evicts under memory pressure quietly admits more than the policy
allows. Only ``maxmemory-policy noeviction`` keeps buckets: every tokenlimit key has a TTL,
so the ``volatile-*`` policies (which evict keys with a TTL) can take them as surely as the
``allkeys-*`` ones. With ``maxmemory 0`` nothing is ever evicted, whatever the policy.

The sync limiter asks right after its first decision, on the connection that decision used
and within what is left of its deadline (one round trip, once: a thread or a second connection
cost the first decisions far more); the async one asks in a task of its own, which no decision
waits for. The question is ``INFO memory`` (``maxmemory``, ``maxmemory_policy``): it needs no CONFIG
permission, and a refusal (an ACL without INFO) or any other failure only logs at debug level.
The answer is a ``logging`` warning on the ``"tokenlimit"`` logger, once per server per
process, not ``warnings.warn``: it describes a deployment, found at run time, often in a
worker thread, and belongs in the operators' logs; a Python warning would be attributed to
whatever line made the first decision, hidden by default filters, and turned into an
exception by ``-W error`` (pytest's ``filterwarnings = error``), and a server setting must never
make a decision raise.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["eviction_warning", "parse_info", "report", "start_check"]

logger = logging.getLogger("tokenlimit")

SAFE_POLICY = "noeviction"

_warned: set[str] = set()  # servers warned about in this process
_lock = threading.Lock()


def parse_info(reply: object) -> dict[str, str]:
    """``INFO``'s text (bytes, or str from a client that decodes) as a dict of its
    ``field:value`` lines (sections and blanks skipped)."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def eviction_warning(info: Mapping[str, object], server: str = "the server") -> str | None:
    """The warning to give when ``info`` (``INFO memory`` fields) shows a server that can evict
    buckets, else None. Unknown or missing fields (a proxy, an odd server) give None: a
    warning must be certain, and the decisions themselves do not depend on it."""
    policy = str(info.get("maxmemory_policy", "")).strip().lower()
    try:
        limit = int(str(info.get("maxmemory", "")).strip())
    except ValueError:
        return None
    if not policy or policy == SAFE_POLICY or limit <= 0:
        return None
    why = (
        "every tokenlimit key has a TTL, so this policy can evict them"
        if policy.startswith("volatile-")
        else "this policy can evict any key"
    )
    return (
        f"tokenlimit: {server} has maxmemory-policy {policy!r} with maxmemory {_size(limit)}: "
        f"{why}, and an evicted bucket is full again, so under memory pressure callers are "
        "admitted beyond their limits. Use maxmemory-policy noeviction on the limiter's server "
        "(a full server then fails decisions, which failure_mode decides), or a server of "
        "its own."
    )


def report(reply: object, server: str) -> str | None:
    """Log ``INFO memory``'s warning for ``server`` unless this process already did; returns
    the warning given (None: nothing to say, or said before)."""
    fields = parse_info(reply)
    logger.debug(
        "tokenlimit: asked %s: maxmemory-policy %s, maxmemory %s",
        server,
        fields.get("maxmemory_policy", "?"),
        fields.get("maxmemory", "?"),
    )
    message = eviction_warning(fields, server)
    if message is None:
        return None
    with _lock:
        if server in _warned:
            return None
        _warned.add(server)
    logger.warning("%s", message)
    return message


def _size(n: int) -> str:
    """Bytes as the server's config would spell them: ``104857600`` -> ``100mb``."""
    units = ("b", "kb", "mb", "gb", "tb")
    value, i = float(n), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.4g}{units[i]}"


def start_check(ask: Callable[[], Awaitable[tuple[str | None, object]]]) -> asyncio.Task[None]:
    """Run ``ask()`` (an ``INFO memory`` exchange, bounded by a deadline, answering the
    server's address and the reply) in a task of its own and report the answer: the async
    decision that starts it does not wait for it. A factory, not a coroutine: a task cancelled
    before it starts (the limiter closed at once) then leaves no coroutine never awaited."""

    async def check() -> None:
        try:
            server, reply = await ask()
        except Exception as exc:  # NOPERM, a timeout, a closed client: only worth a debug line
            logger.debug("tokenlimit: could not read the server's eviction policy: %r", exc)
            return
        report(reply, server or "the server")

    return asyncio.get_running_loop().create_task(check())
