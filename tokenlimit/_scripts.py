"""The shipped Lua scripts, loaded as package data and identified by their SHA1."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ._redis.resp import pack_bulk

__all__ = ["Script", "acquire_script", "hold_script", "peek_script", "release_script"]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    body: bytes
    sha: str
    # ``EVALSHA <sha>`` and ``EVAL <body>`` packed: the start of a call, before ``Request.tail``.
    evalsha: bytes = b""
    eval: bytes = b""


def _load(name: str, *, bucket: bool = True) -> Script:
    folder = resources.files("tokenlimit") / "_scripts"
    body = (folder / f"{name}.lua").read_bytes()
    if bucket:  # the bucket scripts: a line setting ``consume``, then bucket.lua's arithmetic
        body = body + (folder / "bucket.lua").read_bytes()
    sha = hashlib.sha1(body).hexdigest()
    return Script(name, body, sha, pack_bulk(("EVALSHA", sha)), pack_bulk(("EVAL", body)))


@cache
def acquire_script() -> Script:
    """Consumes: all limits or none."""
    return _load("acquire")


@cache
def peek_script() -> Script:
    """The read-only variant: the same arithmetic, never a write."""
    return _load("peek")


@cache
def hold_script() -> Script:
    """Concurrency limits: take one of a key's slots, or say when the earliest lease ends."""
    return _load("slot_hold", bucket=False)


@cache
def release_script() -> Script:
    """Concurrency limits: give a slot back."""
    return _load("slot_release", bucket=False)
