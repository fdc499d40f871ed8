import tokenlimit


def test_burst_then_refuse(limiter: tokenlimit.RateLimiter) -> None:
    lim = tokenlimit.Limit(0.001, 3)
    got = [limiter.try_acquire("smoke", lim).allowed for _ in range(5)]
    assert got == [True, True, True, False, False]
