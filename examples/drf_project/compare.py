"""DRF's ``UserRateThrottle`` against tokenlimit's ``UserTokenBucketThrottle``: one user's
clients firing at once, both throttles "10/min" on the same Redis.

    python compare.py [--clients 8] [--requests 5] [--rounds 5]

Uses $TOKENLIMIT_URL if set, else starts an embedded Valkey (pip install 'tokenlimit[drf,demo]').
DRF keeps a list of request times in the Django cache and writes it back after reading it, so
concurrent requests overwrite each other's entries; tokenlimit decides in one atomic call.
Prints a table, then one JSON line; exits 1 if tokenlimit admitted other than 10 in a round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this project, and examples/embedded.py

BURST = 10  # "10/min" admits 10 at once


@contextlib.contextmanager
def server() -> Iterator[str]:
    url = os.environ.get("TOKENLIMIT_URL")
    if url:
        yield url
        return
    from embedded import embedded_valkey

    with embedded_valkey() as url:
        yield url


def admitted(path: str, token: str, clients: int, each: int) -> int:
    """How many of ``clients`` x ``each`` requests with ``token``, fired at once, got a 200."""
    from django.test import Client

    barrier = threading.Barrier(clients)
    codes: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        session = Client(headers={"Authorization": f"Token {token}"})
        barrier.wait(timeout=30)
        got = [session.get(path).status_code for _ in range(each)]
        with lock:
            codes.extend(got)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes.count(200)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with server() as url:
        if url.startswith("memory://"):
            parser.error("TOKENLIMIT_URL must name a server: both throttles share it")
        os.environ["TOKENLIMIT_URL"] = url  # read by settings.py
        os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
        import django

        django.setup()
        import auth

        logging.getLogger("django.request").setLevel(logging.ERROR)  # no line per 429
        drf, ours = [], []
        for number in range(args.rounds):
            # Each round a user of its own: no history, a full bucket.
            token = f"compare-{os.getpid()}-{number}"
            auth.TOKENS[token] = 1000 + number
            drf.append(admitted("/compare/drf", token, args.clients, args.requests))
            ours.append(admitted("/compare/ours", token, args.clients, args.requests))
    sent = args.clients * args.requests
    print(f"{args.clients} clients at once x {args.requests} requests ({sent} a round), one user,")
    print(f"both throttles 10/min (at most {BURST} admitted at once), on one Redis:")
    print(f"{'round':>5}  {'DRF UserRateThrottle':>20}  {'UserTokenBucketThrottle':>23}")
    for number, (theirs, mine) in enumerate(zip(drf, ours, strict=True), 1):
        print(f"{number:>5}  {theirs:>20}  {mine:>23}")
    print(json.dumps({"drf": drf, "tokenlimit": ours}))
    return 0 if ours == [BURST] * args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
