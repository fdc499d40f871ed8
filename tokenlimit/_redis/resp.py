"""Just enough RESP for the limiter's own exchanges: pack a command, read its reply.

The limiter sends only its own scripts (EVALSHA/EVAL), ASKING and DEL, and reads back only
integers, arrays of integers, simple strings and errors. Doing that here, on bytes, instead of
through redis-py's command layer saves most of the client-side cost of a decision (redis-py's
pool, packer and parser account for well over half of it on loopback), and lets many decisions
share one write. Anything else the server might send is a ``InvalidResponse``: the caller then
drops the connection, never guesses.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol, TypeAlias

from redis import exceptions as rx

_hiredis: ModuleType | None
try:  # the C reader redis-py uses too, when installed (the [hiredis] extra); imported by name
    # so that type-checking does not depend on whether the optional extra is installed
    _hiredis = importlib.import_module("hiredis")
except ImportError:  # pragma: no cover - the suite installs it
    _hiredis = None

__all__ = [
    "Arg",
    "Command",
    "Reply",
    "ReplyError",
    "ReplyReader",
    "pack",
    "pack_bulk",
    "parse_one",
    "parse_replies",
    "take_replies",
]

_CRLF = b"\r\n"

Arg: TypeAlias = bytes | str | int  # one argument of a command, packed as a bulk string
Command: TypeAlias = tuple[Arg, ...]  # a command and its arguments: ("DEL", key, ...)


def pack(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + pack_bulk(args)


def pack_bulk(args: Sequence[Arg]) -> bytes:
    """``args`` as consecutive RESP bulk strings (the body of a command, without its header)."""
    out = []
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = b"%d" % arg
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def parse_one(buf: bytes) -> Reply | None:
    """The one reply that ``buf`` holds in full, or None while it is incomplete.

    The fast case, an array of integers (a script's reply), takes one split; anything else
    goes through ``parse_replies``. More bytes than one reply is a ``rx.InvalidResponse``.
    """
    if buf[:1] == b"*":
        parts = buf.split(_CRLF)
        n = int(parts[0][1:])
        if len(parts) < n + 2:
            return None
        if len(parts) == n + 2 and parts[-1] == b"":
            items = parts[1 : n + 1]
            if all(item[:1] == b":" for item in items):
                return [int(item[1:]) for item in items]
    parsed = parse_replies(buf, 1)
    if parsed is None:
        return None
    if parsed[1] != len(buf):
        raise rx.InvalidResponse("tokenlimit: more bytes than one reply")
    return parsed[0][0]


class ReplyError(Exception):
    """An error reply, still in the server's words (``NOSCRIPT ...``, ``MOVED 3999 h:p``)."""

    @property
    def code(self) -> str:
        """The error's first word: ``NOSCRIPT``, ``MOVED``, ``ERR``..."""
        return str(self.args[0]).partition(" ")[0]

    def exception(self) -> rx.RedisError:
        """The redis-py exception for this error, so callers classify it as usual."""
        message = str(self.args[0])
        code, _, rest = message.partition(" ")
        cls = _ERRORS.get(code)
        if cls is None:
            return rx.ResponseError(message)
        if cls in (rx.MovedError, rx.AskError):
            return cls(rest)
        return cls(message)


# Every kind of reply the limiter reads: an integer, an array of integers (a script's), a
# simple string (ASKING's OK), an error. Anything else is an ``rx.InvalidResponse``.
Reply: TypeAlias = int | list[int] | bytes | ReplyError

_ERRORS: dict[str, type[rx.RedisError]] = {
    "NOSCRIPT": rx.NoScriptError,
    "MOVED": rx.MovedError,
    "ASK": rx.AskError,
    "TRYAGAIN": rx.TryAgainError,
    "CLUSTERDOWN": rx.ClusterDownError,
    "READONLY": rx.ReadOnlyError,
    "LOADING": rx.BusyLoadingError,
    "NOPERM": rx.NoPermissionError,
    "OOM": rx.OutOfMemoryError,
}


def parse_replies(buf: bytes | bytearray, count: int) -> tuple[list[Reply], int] | None:
    """Parse ``count`` replies from the start of ``buf``.

    Returns ``(replies, bytes used)``, or None while ``buf`` does not hold them all yet. An
    error reply is returned as a ``ReplyError`` (the connection is still in step); a reply of a
    kind the limiter never asks for raises ``rx.InvalidResponse``.
    """
    replies: list[Reply] = []
    pos = 0
    for _ in range(count):
        end = buf.find(_CRLF, pos)
        if end < 0:
            return None
        kind = buf[pos]
        line = bytes(buf[pos + 1 : end])
        pos = end + 2
        if kind == 0x3A:  # ':' integer
            replies.append(int(line))
        elif kind == 0x2A:  # '*' array: of integers, for our scripts
            n = int(line)
            items = []
            for _ in range(n):
                end = buf.find(_CRLF, pos)
                if end < 0:
                    return None
                if buf[pos] != 0x3A:
                    raise rx.InvalidResponse("tokenlimit: unexpected item in a script's reply")
                items.append(int(buf[pos + 1 : end]))
                pos = end + 2
            replies.append(items)
        elif kind == 0x2D:  # '-' error
            replies.append(ReplyError(line.decode("utf-8", "replace")))
        elif kind == 0x2B:  # '+' simple string (ASKING's OK)
            replies.append(line)
        else:
            raise rx.InvalidResponse(f"tokenlimit: unexpected reply type {chr(kind)!r}")
    return replies, pos


def take_replies(buf: bytes, count: int) -> tuple[list[Reply], bytes]:
    """Up to ``count`` complete replies from the start of ``buf``, and the bytes after them.

    For a stream of pipelined replies read in chunks: what is complete is parsed (the reply
    kinds of ``parse_replies``), a reply cut by the chunk's end stays in the returned bytes for
    the next call. One ``split`` for the whole chunk makes a script's reply (an array of
    integers) cost a few list operations instead of a ``find`` per line.
    """
    parts = buf.split(_CRLF)
    lines = len(parts) - 1  # the last part follows the last CRLF: an incomplete line or b""
    replies: list[Reply] = []
    i = 0
    while i < lines and len(replies) < count:
        line = parts[i]
        kind = line[:1]
        if kind == b"*":
            n = int(line[1:])
            if n < 0:  # a nil array: never a script's reply
                raise rx.InvalidResponse("tokenlimit: unexpected nil reply")
            if i + 1 + n > lines:
                break
            replies.append(
                [int(x[1:]) if x[:1] == b":" else _not_int() for x in parts[i + 1 : i + 1 + n]]
            )
            i += 1 + n
            continue
        if kind == b":":
            replies.append(int(line[1:]))
        elif kind == b"-":
            replies.append(ReplyError(line[1:].decode("utf-8", "replace")))
        elif kind == b"+":
            replies.append(line[1:])
        else:
            raise rx.InvalidResponse(f"tokenlimit: unexpected reply type {kind!r}")
        i += 1
    if i == lines:
        return replies, parts[-1]
    return replies, _CRLF.join(parts[i:])


def _not_int() -> int:
    raise rx.InvalidResponse("tokenlimit: unexpected item in a script's reply")


_MORE = object()  # hiredis's answer while a reply is incomplete (its default, False, is == 0)
# hiredis when its reader can be used, else None: before 3.2 it returns RESP3 pushes as plain
# lists, and those cannot be told from a reply.
_HIREDIS = _hiredis if _hiredis is not None and hasattr(_hiredis, "PushNotification") else None


class _HiredisReader(Protocol):
    """``hiredis.Reader``, as hiredis's own stub types what we call."""

    def feed(self, buf: bytes, /) -> None: ...

    # A reply of any RESP kind, or ``notEnoughData``: as hiredis's own stub types it; ``take``
    # checks each one's type before it goes further.
    def gets(self) -> Any: ...

    def has_data(self) -> bool: ...


class ReplyReader:
    """The replies of pipelined commands from a stream read in chunks, in order.

    hiredis's C reader when installed (about nine times faster than ``take_replies`` on a batch
    of script replies), else ``take_replies``. With either, a reply of a kind the limiter never
    asks for (a push, a nil, a map, an array of anything but integers) raises
    ``rx.InvalidResponse``: the caller drops the connection, never guesses.
    """

    __slots__ = ("_buf", "_hiredis")

    def __init__(self, *, use_hiredis: bool = True) -> None:
        self._buf = b""
        self._hiredis: _HiredisReader | None = None
        if use_hiredis and _HIREDIS:
            self._hiredis = _HIREDIS.Reader(
                replyError=ReplyError, protocolError=rx.InvalidResponse, notEnoughData=_MORE
            )

    def take(self, chunk: bytes, count: int) -> list[Reply]:
        """Feed ``chunk``; return the replies complete so far, at most ``count``."""
        reader = self._hiredis
        if reader is None:
            replies, self._buf = take_replies(self._buf + chunk if self._buf else chunk, count)
            return replies
        reader.feed(chunk)
        replies = []
        while len(replies) < count:
            reply = reader.gets()
            if reply is _MORE:
                break
            kind = type(reply)
            if kind is list:
                for item in reply:
                    if type(item) is not int:
                        raise rx.InvalidResponse("tokenlimit: unexpected item in a script's reply")
            elif kind is not int and kind is not ReplyError and kind is not bytes:
                raise rx.InvalidResponse(f"tokenlimit: unexpected reply type {kind.__name__}")
            replies.append(reply)
        return replies

    def leftover(self) -> bool:
        """Whether bytes were fed that no reply taken so far accounts for."""
        if self._hiredis is None:
            return bool(self._buf)
        return bool(self._hiredis.has_data())
