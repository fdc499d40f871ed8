"""Throttles of the example's own: a burst apart from the rate, and the comparison pair."""

from rest_framework.throttling import UserRateThrottle

from tokenlimit.integrations.drf import UserTokenBucketThrottle


class SearchThrottle(UserTokenBucketThrottle):
    """One search a second per user, bursts of 3: a shape DRF's window cannot express."""

    scope = "search"
    rate = "1/s"
    burst = 3


class DrfTen(UserRateThrottle):  # type: ignore[misc]
    """DRF's own: a list of request times in the Django cache, read then written back."""

    rate = "10/min"


class OursTen(UserTokenBucketThrottle):
    """tokenlimit's: one atomic call on the server; "10/min" admits 10 at once, as DRF's."""

    scope = "compare"
    rate = "10/min"
