"""The shipped Lua scripts, loaded as package data and identified by their SHA1.

A bucket script is composed of parts: ``acquire.lua`` or ``peek.lua`` (one line setting
``consume``), then ``gcra.lua`` (the helpers every bucket script shares), then ``bucket.lua``
(the decision); the hold-back script is ``gcra.lua`` then ``holdback.lua``, and the refund
script ``gcra.lua`` then ``refund.lua``, and the lease script ``gcra.lua`` then ``lease.lua``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ._redis.resp import pack_bulk

__all__ = [
    "Script",
    "acquire_script",
    "hold_script",
    "holdback_script",
    "lease_script",
    "peek_script",
    "refund_script",
    "release_script",
]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    body: bytes
    sha: str
    # ``EVALSHA <sha>`` and ``EVAL <body>`` packed: the start of a call, before ``Request.tail``.
    evalsha: bytes = b""
    eval: bytes = b""


def _load(name: str, *parts: str) -> Script:
    """The script ``name``: its parts' files, in order, as one body."""
    folder = resources.files("tokenlimit") / "_scripts"
    body = b"".join((folder / f"{part}.lua").read_bytes() for part in parts)
    sha = hashlib.sha1(body).hexdigest()
    return Script(name, body, sha, pack_bulk(("EVALSHA", sha)), pack_bulk(("EVAL", body)))


@cache
def acquire_script() -> Script:
    """Consumes: all limits or none."""
    return _load("acquire", "acquire", "gcra", "bucket")


@cache
def peek_script() -> Script:
    """The read-only variant: the same arithmetic, never a write."""
    return _load("peek", "peek", "gcra", "bucket")


@cache
def hold_script() -> Script:
    """Concurrency limits: take one of a key's slots, or say when the earliest lease ends."""
    return _load("slot_hold", "slot_hold")


@cache
def release_script() -> Script:
    """Concurrency limits: give a slot back."""
    return _load("slot_release", "slot_release")


@cache
def holdback_script() -> Script:
    """Hold a request's buckets back: refuse every caller until a given time (never admit)."""
    return _load("holdback", "gcra", "holdback")


@cache
def refund_script() -> Script:
    """Give a request's tokens back: its buckets gain ``cost`` tokens, never above full."""
    return _load("refund", "gcra", "refund")


@cache
def lease_script() -> Script:
    """Leased tokens: give held tokens back, then take up to a lease from every bucket."""
    return _load("lease", "gcra", "lease")
