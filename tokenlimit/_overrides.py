"""Live overrides (brownout): change or block a named limit for every process sharing a store,
without a redeploy.

- Stored on the server, one hash per prefix (``<prefix>overrides``): field = the limit's label
  (what headers and metrics call it), value = its expiry in server time and a JSON payload
  (``_scripts/override.lua``). Every override expires on its own; the hash goes with the last.
- Every limiter keeps the table it last read (``LiveOverrides``) and reads it again at most once
  per ``REFRESH`` seconds, started by the first decision past that time but off its caller's
  time (a sync limiter's read runs on one shared daemon thread, ``READER``; an async one's in a
  task): no decision ever waits on a read, so the deadline stays the decision's. An override
  reaches every limiter that decides within ``REFRESH`` plus one round trip. The writer applies
  its own at once.
- While the server cannot be read, the last table stays in force, each entry expiring on this
  process's clock from the time left that the server reported.
- An override keeps the limit's label and decides with the override's rate and burst on a bucket
  of its own (same identity, the override's numbers in the key): it starts full, and when it
  ends the limit's own bucket is back as it was. A blocked limit, or a call costing more than
  the override's burst, is refused in-process without a server call until the override ends.
  ``refund`` and ``hold_back`` act on the buckets in force, ``reset`` on both.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass

from ._decision import Decision
from ._errors import ConfigError, ConfigTypeError
from ._limit import Limit
from ._log import logger
from ._redis.resp import pack_bulk
from ._request import Request
from ._validate import check_number, shown

__all__ = [
    "MAX_OVERRIDE_SECONDS",
    "READER",
    "REFRESH",
    "LiveOverrides",
    "Override",
    "check_override",
    "decode_listing",
    "overrides_key",
]

REFRESH = 1.0  # seconds between two reads of the server's table by one limiter
MAX_OVERRIDE_SECONDS = 7 * 86_400.0  # an override lasts at most a week: incidents end
_MAX_NAME = 200  # characters in a limit's label, as overrides name it
_MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class Override:
    """One live override of the limit labelled ``name``: decide it at ``limit``'s rate and
    burst (same bucket), or refuse every call (``block``), for ``expires_in`` more seconds (as
    of the read). ``reason``: what the operator wrote (an incident id), shown by ``list``."""

    name: str
    limit: Limit | None
    block: bool
    expires_in: float
    reason: str = ""

    def describe(self) -> str:
        """``"5/second (burst 5)"`` or ``"blocked"``, for logs and the command line."""
        if self.block or self.limit is None:
            return "blocked"
        return f"{_rate_text(self.limit.rate)}/second (burst {self.limit.burst})"


def overrides_key(prefix: str) -> str:
    """The hash holding a prefix's overrides (no braces: never a bucket's key)."""
    return f"{prefix}overrides"


def _rate_text(rate: float) -> str:
    return f"{rate:.0f}" if rate == round(rate) else f"{rate:.6g}"


def check_override(
    name: object,
    limit: object,
    seconds: object,
    block: object,
    reason: object,
    burst: int | None = None,
) -> tuple[str, str, int]:
    """Validate a new override: ``(name, payload, ttl ms)``, or ``ConfigError`` naming the
    parameter. ``limit``: ``"5/second"`` (``burst`` as ``Limit.parse`` takes it) or a
    ``Limit``; exactly one of ``limit`` and ``block=True``."""
    label = check_name(name)
    if not isinstance(block, bool):
        raise ConfigTypeError("block", f"must be True or False, not {shown(block)}")
    if block:
        if limit is not None:
            raise ConfigError("limit", "give a limit or block=True, not both")
        if burst is not None:
            raise ConfigError("burst", "a blocked limit has no burst: leave it out")
        payload: dict[str, object] = {"block": True}
    else:
        if limit is None:
            raise ConfigError(
                "limit", "give the limit to decide with (e.g. '5/second'), or block=True"
            )
        if isinstance(limit, Limit):
            if burst is not None:
                raise ConfigError("burst", "give burst= in the Limit itself")
            made = limit
        elif isinstance(limit, str):
            made = Limit.parse(limit, burst=burst)
        else:
            raise ConfigTypeError(
                "limit", f"must be a str like '5/second' or a Limit, not {type(limit).__name__}"
            )
        payload = {"rate": made.rate, "burst": made.burst}
    ttl = check_number("seconds", seconds, maximum=MAX_OVERRIDE_SECONDS)
    if not isinstance(reason, str):
        raise ConfigTypeError("reason", f"must be a str, not {type(reason).__name__}")
    if len(reason) > _MAX_REASON or not reason.isprintable():
        raise ConfigError("reason", f"must be printable and at most {_MAX_REASON} characters")
    if reason:
        payload["reason"] = reason
    return label, json.dumps(payload, separators=(",", ":")), max(1, math.ceil(ttl * 1000))


def check_name(name: object) -> str:
    """A limit's label as overrides name it: a printable str of 1 to 200 characters."""
    if not isinstance(name, str):
        raise ConfigTypeError("name", f"must be a limit's name (str), not {type(name).__name__}")
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise ConfigError(
            "name",
            f"must be a printable limit name of 1 to {_MAX_NAME} characters, got {shown(name)}",
        )
    return name


def decode_listing(reply: Sequence[object]) -> tuple[bool, tuple[Override, ...]]:
    """The script's reply (or the memory backend's): ``(changed, overrides)``. An entry this
    version cannot read is skipped, logged: a newer writer must not break older readers."""
    changed = bool(int(str(_text(reply[0])))) if reply else False
    found: list[Override] = []
    for i in range(1, len(reply) - 2, 3):
        name, payload, left = _text(reply[i]), _text(reply[i + 1]), reply[i + 2]
        try:
            found.append(_decode(name, payload, int(str(_text(left))) / 1000))
        except Exception as error:  # whatever a stored entry holds: skip it
            logger.warning("tokenlimit: skipping an override this version cannot read (%s)", error)
    return changed, tuple(found)


def _text(value: object) -> object:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _decode(name: object, payload: object, expires_in: float) -> Override:
    label = check_name(name)
    data = json.loads(str(payload))
    if not isinstance(data, dict):
        raise ValueError("not an object")
    reason = str(data.get("reason", ""))
    if data.get("block") is True:
        return Override(label, None, True, expires_in, reason)
    limit = Limit(float(data["rate"]), int(data["burst"]), name=label)
    return Override(label, limit, False, expires_in, reason)


class LiveOverrides:
    """One limiter's view of the overrides: the table in force, when to read it again, and the
    requests it rewrote. Thread-safe; never does IO (the limiter reads and calls ``update``)."""

    __slots__ = (
        "_clock",
        "_lock",
        "_made",
        "_on_change",
        "_tasks",
        "closed",
        "due",
        "ends",
        "table",
    )

    def __init__(
        self,
        on_change: Callable[[str, Override | None], None] | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._on_change = on_change
        # label -> (override, perf_counter time it ends); read without the lock (replaced whole).
        self.table: dict[str, tuple[Override, float]] = {}
        self.ends = math.inf  # when the first override in the table ends (perf_counter)
        self.due = -math.inf  # perf_counter time of the next read
        self.closed = False  # the limiter closed: reads queued before it never run
        self._made: dict[int, tuple[Request, Request | Decision]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def read_in_task(self, read: Callable[[], Coroutine[object, object, None]]) -> None:
        """Run an async limiter's read in a task of the running loop (kept until done); the
        coroutine is made in the task, so a task cancelled before it starts leaves none."""
        task = asyncio.get_running_loop().create_task(_quietly(read))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """The limiter closed: no read runs after this (pending tasks are cancelled)."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()

    def claim(self, now: float) -> bool:
        """True for the one caller that should read the server's table now (the next read is
        then due ``REFRESH`` later, whatever this one's outcome)."""
        with self._lock:
            if now < self.due:
                return False
            self.due = now + REFRESH
            self.closed = False  # a limiter used after close() reads again
            return True

    def update(self, overrides: Sequence[Override], now: float) -> None:
        """Put the table just read in force: log and report each override that starts,
        changes or ends."""
        new = {item.name: (item, now + item.expires_in) for item in overrides}
        with self._lock:
            old, self.table = self.table, new
            self.ends = _first_end(new)
            self._made = {}
        self._report(old, new)

    def expire(self, now: float) -> None:
        """Drop the overrides whose time is up (while the server cannot be read)."""
        with self._lock:
            old = self.table
            new = {name: entry for name, entry in old.items() if entry[1] > now}
            if len(new) == len(old):
                return
            self.table = new
            self.ends = _first_end(new)
            self._made = {}
        self._report(old, new)

    def _report(
        self, old: dict[str, tuple[Override, float]], new: dict[str, tuple[Override, float]]
    ) -> None:
        for name in sorted(old.keys() | new.keys()):
            before, after = old.get(name), new.get(name)
            if after is None:
                logger.warning("tokenlimit: override of limit %r ended", name)
            elif before is None or _differs(before[0], after[0]):
                item = after[0]
                why = f" ({item.reason})" if item.reason else ""
                logger.warning(
                    "tokenlimit: override of limit %r: %s for %.0f s%s",
                    name,
                    item.describe(),
                    item.expires_in,
                    why,
                )
            else:
                continue
            if self._on_change is not None:
                self._on_change(name, None if after is None else after[0])

    def apply(self, request: Request, now: float) -> Request | Decision:
        """``request`` with the overridden limits (same keys), or the refusal of a blocked one.
        Called only while the table holds something."""
        if now >= self.ends:
            self.expire(now)
        table = self.table
        made = self._made.get(id(request))
        if made is not None and made[0] is request:
            result = made[1]
            if not isinstance(result, Decision):
                return result
            # Made a refusal before: still one, its retry_after moved on (a Decision is falsy
            # when refused, so never `or`), or the call itself once the block is gone.
            blocked = _blocked(request, table, now)
            return request if blocked is None else blocked
        result = _overridden(request, table, now)
        with self._lock:
            if self.table is table:  # not made from a table another thread replaced meanwhile
                if len(self._made) >= 4096:
                    self._made.clear()
                self._made[id(request)] = (request, result)
        return result


async def _quietly(read: Callable[[], Coroutine[object, object, None]]) -> None:
    try:
        await read()
    except Exception as error:  # nobody awaits the task: a failure is logged, never raised
        logger.debug("tokenlimit: reading live overrides failed: %r", error)


class _Reader:
    """One daemon thread that runs sync limiters' reads, in the order asked; it ends after a
    minute without one and the next read starts another (so idle processes keep no thread)."""

    IDLE = 60.0

    def __init__(self) -> None:
        self._after_fork()

    def _after_fork(self) -> None:  # also in a forked child: the parent's thread is not there
        self._cond = threading.Condition()
        self._queue: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    def submit(self, read: Callable[[], None]) -> None:
        with self._cond:
            self._queue.append(read)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tokenlimit-overrides", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(self.IDLE)
                if not self._queue:
                    self._thread = None  # under the lock: the next submit starts another
                    return
                read = self._queue.pop(0)
            try:
                read()
            except Exception as error:  # a read must never kill the thread
                logger.debug("tokenlimit: reading live overrides failed: %r", error)


READER = _Reader()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=READER._after_fork)


def _first_end(table: dict[str, tuple[Override, float]]) -> float:
    return min((ends for _, ends in table.values()), default=math.inf)


def _differs(a: Override, b: Override) -> bool:
    return (a.block, a.limit, a.reason) != (b.block, b.limit, b.reason)


def _blocked(
    request: Request, table: dict[str, tuple[Override, float]], now: float
) -> Decision | None:
    """The refusal for a request that meets a blocked limit (or one whose override's burst is
    below its cost): refused until that override ends; the other limits are not read."""
    refusals: list[Decision] = []
    for limit in request.limits:
        entry = table.get(limit.label)
        if entry is None:
            continue
        item, ends = entry
        if item.block or item.limit is None or request.cost > item.limit.burst:
            wait = max(ends - now, 0.0)
            refusals.append(Decision(False, limit.burst, 0, wait, wait, policy=limit))
    if not refusals:
        return None
    return max(refusals, key=lambda d: d.retry_after)


def _overridden(
    request: Request, table: dict[str, tuple[Override, float]], now: float
) -> Request | Decision:
    refusal = _blocked(request, table, now)
    if refusal is not None:
        return refusal
    limits: list[Limit] = []
    keys: list[str] = []
    for key, limit in zip(request.keys, request.limits, strict=True):
        entry = table.get(limit.label)
        made = entry[0].limit if entry is not None else None
        if made is None:
            limits.append(limit)
            keys.append(key)
            continue
        # The override's numbers under the limit's own label (headers and metrics keep it),
        # leased as the limit is within the override's burst, on a bucket of the override's
        # own: the limit's key with the override's id where the limit's was. Debt run up at
        # the override's rate never meets the limit's (a strict override's minutes of debt
        # would lock a 1 s bucket out for minutes once it ends), and the limit's bucket is
        # as it was, refilled meanwhile, when the override ends.
        lease = min(limit.lease, made.burst) if limit.lease else None
        new = Limit(made.rate, made.burst, name=limit.label, lease=lease)
        limits.append(new)
        keys.append(key[: len(key) - len(limit._id)] + new._id)
    if all(new is old for new, old in zip(limits, request.limits, strict=True)):
        return request
    args = [str(request.cost)]
    for limit in limits:
        args.append(str(limit.interval_ns))
        args.append(str(limit.burst))
    strings = (str(len(keys)), *keys, *args)
    return Request(
        tuple(keys), tuple(args), tuple(limits), request.cost, pack_bulk(strings), len(strings)
    )
