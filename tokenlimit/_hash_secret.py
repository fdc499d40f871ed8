"""The hash secret: ``hash_secret=`` (or ``TOKENLIMIT_HASH_SECRET``) keys the BLAKE2b that turns an
identity into its bucket's hash tag (``_request.identity_tag``), so that reading the keyspace no
longer confirms a guessed user id, IP or API key.

``hasher_for`` validates a secret and returns a keyed BLAKE2b state that ``identity_tag`` copies
per identity (None without a secret: the unkeyed hash, byte for byte the keys of before). One
state per secret in the process: equal secrets give the same object, which the request cache
keys on. The secret itself is never part of a message, a repr or a log line.
"""

from __future__ import annotations

import functools
import hashlib
import os

from ._errors import ConfigError, ConfigTypeError

__all__ = ["ENV_HASH_SECRET", "TAG_BYTES", "env_hash_secret", "hasher_for"]

ENV_HASH_SECRET = "TOKENLIMIT_HASH_SECRET"
TAG_BYTES = 12  # 96 bits of digest: the hash tag's 16 base64url characters
MIN_BYTES = 16  # a shorter secret is a password an attacker with one known identity can search
KEY_BYTES = 64  # BLAKE2b's largest key; a longer secret is hashed down to this (as HMAC does)
_PERSON = b"tokenlimit:key"  # keeps a derived key apart from a plain BLAKE2b of the secret


def hasher_for(secret: object, param: str = "hash_secret") -> hashlib.blake2b | None:
    """A keyed BLAKE2b state for ``secret`` (str or bytes), or None for None.

    A str has its surrounding whitespace removed (a secret file's newline must not give the
    app and the command line different buckets) and is encoded as UTF-8; bytes are used as
    given. Errors name ``param`` and never show the secret."""
    if secret is None:
        return None
    if isinstance(secret, str):
        try:
            raw = secret.strip().encode("utf-8")
        except UnicodeEncodeError:  # raised below, not here: its context would hold the secret
            raw = None
        if raw is None:
            raise ConfigError(param, "must be encodable as UTF-8")
    elif isinstance(secret, bytes):
        raw = secret
    else:
        raise ConfigTypeError(param, f"must be a str or bytes, not {type(secret).__name__}")
    if not raw:
        raise ConfigError(param, "must not be empty (leave it unset for unkeyed hashing)")
    if len(raw) < MIN_BYTES:
        raise ConfigError(
            param,
            f"must be at least {MIN_BYTES} bytes: use a random one, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return _hasher(raw)


@functools.lru_cache(maxsize=16)
def _hasher(raw: bytes) -> hashlib.blake2b:
    key = raw if len(raw) <= KEY_BYTES else _derived(raw)
    return hashlib.blake2b(digest_size=TAG_BYTES, key=key)


def _derived(raw: bytes) -> bytes:
    """A secret longer than BLAKE2b's key, hashed down to one."""
    return hashlib.blake2b(raw, digest_size=KEY_BYTES, person=_PERSON).digest()


def env_hash_secret() -> str | None:
    """``TOKENLIMIT_HASH_SECRET`` from the environment; None when it is unset. Set but empty
    is kept (``hasher_for`` rejects it): a deploy that meant to pass a secret and passed
    nothing must not fall back to unkeyed hashing without a word."""
    return os.environ.get(ENV_HASH_SECRET)
