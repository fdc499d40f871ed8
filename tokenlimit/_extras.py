"""Optional dependencies: an integration whose extra is not installed says which one to install.

with needs_extra("drf", "djangorestframework", feature=__name__):
    from rest_framework.throttling import BaseThrottle
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ._errors import ConfigError

__all__ = ["MissingExtraError", "needs_extra"]


class MissingExtraError(ConfigError, ModuleNotFoundError):
    """An integration's extra is not installed: a ``ConfigError`` naming the ``pip install`` to
    run, and the ``ModuleNotFoundError`` the import would have raised (``except ImportError``
    still catches it; ``name`` is the missing module)."""

    def __init__(self, feature: str, extra: str, distribution: str, missing: str) -> None:
        super().__init__(
            feature,
            f"needs {distribution} (module {missing!r} is not installed): "
            f"pip install 'tokenlimit[{extra}]'",
        )
        self.name = missing
        self.extra = extra


@contextmanager
def needs_extra(extra: str, distribution: str, *, feature: str) -> Iterator[None]:
    """Turn a third-party module found missing inside the block into ``MissingExtraError``
    (installing the extra brings the framework and what it needs); tokenlimit's own modules
    are never renamed."""
    try:
        yield
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if not missing or missing.startswith("tokenlimit") or isinstance(error, ConfigError):
            raise
        raise MissingExtraError(feature, extra, distribution, missing) from error
