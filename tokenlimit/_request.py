"""``Request``: one decision to make, as bucket keys and packed script arguments.

``build_request`` validates a call's key, limit(s) and cost and builds the keys (the identity's
hash tag, ``identity_tag``, and each limit's id) and the script's packed arguments, keeping
recent requests in a small cache so that a hot key skips all of it. ``hasher`` is the limiter's
keyed BLAKE2b (``_hash_secret.hasher_for``), None without a hash secret.
"""

from __future__ import annotations

import binascii
import hashlib
from typing import NamedTuple

from ._hash_secret import TAG_BYTES
from ._limit import Limit
from ._plan import LimitPlan, LimitSpec
from ._redis.resp import pack_bulk
from ._validate import check_key

__all__ = ["Request", "build_request", "identity_tag", "with_args"]

_URLSAFE = bytes.maketrans(b"+/", b"-_")


class Request(NamedTuple):
    """One decision to make: the bucket keys, the script arguments, and the limits behind them.

    ``tail`` is ``numkeys, *keys, *args`` already packed as RESP bulk strings, and ``size`` the
    number of those strings: a script call is then a header, the script's SHA and ``tail``.
    A named tuple, not a dataclass: a new key builds one per decision (docs/internals.md).
    """

    keys: tuple[str, ...]
    args: tuple[str, ...]
    limits: tuple[Limit, ...]
    cost: int
    tail: bytes = b""
    size: int = 0

    @property
    def params(self) -> tuple[tuple[int, int], ...]:
        """``(interval_ns, burst)`` per limit, as the model and the memory backend take them."""
        return tuple((limit.interval_ns, limit.burst) for limit in self.limits)


def with_args(request: Request, args: tuple[str, ...], cost: int | None = None) -> Request:
    """``request``'s keys and limits with other script arguments (re-packed): the same buckets
    asked by another script, or for another cost."""
    strings = (str(len(request.keys)), *request.keys, *args)
    cost = request.cost if cost is None else cost
    return Request(request.keys, args, request.limits, cost, pack_bulk(strings), len(strings))


def identity_tag(identity: bytes, hasher: hashlib.blake2b | None = None) -> str:
    """The hash tag for an identity: 96 bits of BLAKE2b, base64url, 16 characters.

    Hashing makes keys injective in practice, short whatever the identity's length, free of the
    braces that would move the cluster slot, and keeps API keys out of Redis in clear text.
    Unkeyed (``hasher`` None) anyone can hash a guessed identity and look for its key; keyed
    with the limiter's hash secret, only holders of the secret can.
    """
    if hasher is None:
        digest = hashlib.blake2b(identity, digest_size=TAG_BYTES).digest()
    else:  # a copy of the keyed state: cheaper than hashing the key block again per identity
        keyed = hasher.copy()
        keyed.update(identity)
        digest = keyed.digest()
    # = base64.urlsafe_b64encode(digest).decode(), without its Python-level layers
    return binascii.b2a_base64(digest, newline=False).translate(_URLSAFE).decode()


# Requests for recent (prefix, key, limit, cost, hasher) calls: a hot key skips validation,
# hashing and packing. Only exact str, int and Limit (or tuple of Limits) arguments are cached
# (hashable, and equal means identical keys); the dict is emptied when full, cheaper than LRU
# bookkeeping. ``hasher`` (one object per secret, compared by identity) keeps a request built
# under one hash secret from ever reaching a limiter with another or none.
# Keys of up to _CACHED_KEY_CHARS only: the cache holds at most 4096 x 256 characters of
# caller keys, however long the keys callers send (a longer one is built at each call).
_CACHE_SIZE = 4096
_CACHED_KEY_CHARS = 256
_cache: dict[tuple[str, str, Limit | tuple[Limit, ...], int, hashlib.blake2b | None], Request] = {}


def build_request(
    prefix: str,
    key: str | bytes,
    limit: LimitSpec,
    cost: int = 1,
    hasher: hashlib.blake2b | None = None,
) -> Request:
    """Validate one call's arguments and turn them into keys and packed script arguments."""
    if type(key) is str and type(cost) is int and (type(limit) is Limit or type(limit) is tuple):
        entry = (prefix, key, limit, cost, hasher)
        try:
            request = _cache.get(entry)
        except TypeError:  # an unhashable item in a tuple: _build names the parameter
            return _build(prefix, key, limit, cost, hasher)
        # A hit on the caller's own Limit or tuple (_build keeps it): made from it, so checked.
        if request is not None and (request.limits[0] is limit or request.limits is limit):
            return request
        if type(limit) is tuple and not all(type(item) is Limit for item in limit):
            return _build(prefix, key, limit, cost, hasher)
        if request is None or not _spelled_alike(request.limits, limit):
            request = _build(prefix, key, limit, cost, hasher)
            if len(key) <= _CACHED_KEY_CHARS:  # checked on a miss only: hits cost nothing more
                if len(_cache) >= _CACHE_SIZE:
                    _cache.clear()
                _cache[entry] = request
        return request
    return _build(prefix, key, limit, cost, hasher)


def _spelled_alike(cached: tuple[Limit, ...], limit: Limit | tuple[Limit, ...]) -> bool:
    """Whether a cached request's limits carry ``limit``'s labels and leases. Equal limits
    share a cache entry (and a bucket) but may be labelled or leased apart: a decision reports
    the caller's own label, and leases by the caller's own ``lease``."""
    if isinstance(limit, Limit):
        first = cached[0]
        return first is limit or (first.label == limit.label and first.lease == limit.lease)
    if cached is limit:  # an integration's policy passes one tuple, kept by _build
        return True
    return len(cached) == len(limit) and all(
        mine.label == theirs.label and mine.lease == theirs.lease
        for mine, theirs in zip(cached, limit, strict=True)
    )


def _build(
    prefix: str, key: str | bytes, limit: LimitSpec, cost: int, hasher: hashlib.blake2b | None
) -> Request:
    # One limit and a cost within its burst: the plan's checks, passed at a glance.
    if type(limit) is Limit and type(cost) is int and 1 <= cost <= limit.burst:
        return _build_one(prefix, check_key(key), limit, cost, hasher)
    identity = check_key(key)  # first: a bad key fails as one, before a chooser sees it
    plan = LimitPlan.of(limit=limit, cost=cost, name="limit")
    if plan.choose is not None:  # tiers: cached by the limits it chose, never by the chooser
        return build_request(prefix, key, plan.limits_for(key), plan.cost, hasher)
    limits, cost = plan.limits, plan.cost
    if type(limit) is tuple and limit == limits:  # kept: a later call is told apart by identity
        limits = limit
    head = f"{prefix}{{{identity_tag(identity, hasher)}}}"
    keys = tuple(head + lim._id for lim in limits)
    args = [str(cost)]
    for lim in limits:
        args.append(str(lim.interval_ns))
        args.append(str(lim.burst))
    strings = (str(len(keys)), *keys, *args)
    return Request(keys, tuple(args), limits, cost, pack_bulk(strings), len(strings))


# A limit's script arguments (interval ns, burst) as RESP bulk strings, made once per limit: a
# new key's request then costs a hash and a few joins. Bounded, as choosers may make limits.
_LIMIT_ARGS: dict[Limit, bytes] = {}


def _limit_args(limit: Limit) -> bytes:
    packed = _LIMIT_ARGS.get(limit)
    if packed is None:
        if len(_LIMIT_ARGS) >= _CACHE_SIZE:
            _LIMIT_ARGS.clear()
        packed = _LIMIT_ARGS[limit] = pack_bulk((limit.interval_ns, limit.burst))
    return packed


def _build_one(
    prefix: str, identity: bytes, limit: Limit, cost: int, hasher: hashlib.blake2b | None
) -> Request:
    """``_build`` for the common call, one limit and a valid cost, with the limit's part of
    the packed arguments made once per limit: a new key costs a hash and a few joins."""
    bucket = f"{prefix}{{{identity_tag(identity, hasher)}}}{limit._id}"
    raw = bucket.encode()
    costs = b"%d" % cost
    packed = b"$1\r\n1\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
        len(raw), raw, len(costs), costs, _limit_args(limit)
    )  # fmt: skip
    args = (str(cost), str(limit.interval_ns), str(limit.burst))
    return Request((bucket,), args, (limit,), cost, packed, 5)
