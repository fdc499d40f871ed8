"""The shipped Lua scripts, loaded as package data and identified by their SHA1."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from ._resp import pack_bulk

__all__ = ["Script", "acquire_script", "peek_script"]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    body: bytes
    sha: str
    # ``EVALSHA <sha>`` and ``EVAL <body>`` packed: the start of a call, before ``Request.tail``.
    evalsha: bytes = b""
    eval: bytes = b""


def _load(name: str) -> Script:
    folder = resources.files("tokenlimit") / "_scripts"
    body = (folder / "bucket.lua").read_bytes() + b"\n" + (folder / f"{name}.lua").read_bytes()
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
