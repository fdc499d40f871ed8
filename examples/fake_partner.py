"""A stand-in for a partner's HTTP API that enforces its own rate limit, for the outbound examples.

    python examples/fake_partner.py [--rate 20] [--burst 5]    # prints "listening on <url>"

``GET /api/...`` answers 200 with a small JSON body while its own token bucket (in this process,
``--rate`` per second, ``--burst`` at once) has a token, else 429 with ``Retry-After``, as a
partner would. It counts what it served: ``GET /admin/stats`` returns ``{"ok", "limited",
"requests": [[t, status, worker], ...]}`` (``t``: this server's ``time.monotonic()``, which on
Linux is one clock for every process of the machine; ``worker``: the request's ``X-Worker``
header). ``POST /admin/throttle?seconds=2`` makes the next API request a 429 with
``Retry-After: 2`` whatever the bucket says, as a partner shedding load would; ``POST
/admin/reset`` forgets the counts and refills the bucket.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["Partner", "running_partner"]

THROTTLE_BODY = b'{"error": "slow down", "code": "partner-throttled"}'


class _Bucket:
    """The partner's own limiter: a plain token bucket, nothing to do with tokenlimit."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self, now: float) -> float:
        """0.0 if a token was taken at ``now``, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0 - 1e-9:  # float rounding only: no slack worth a request
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _State:
    def __init__(self, rate: float, burst: int) -> None:
        self.lock = threading.Lock()
        self.rate, self.burst = rate, burst
        self.reset()

    def reset(self) -> None:
        self.bucket = _Bucket(self.rate, self.burst)
        self.requests: list[tuple[float, int, str]] = []
        self.throttle: float | None = None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients use it

    def do_GET(self) -> None:
        state = self.server.state
        if self.path == "/admin/stats":
            with state.lock:
                requests = list(state.requests)
            ok = sum(1 for _, status, _ in requests if status == 200)
            body = {"ok": ok, "limited": len(requests) - ok, "requests": requests}
            self._send(200, json.dumps(body).encode())
            return
        if not self.path.startswith("/api"):
            self._send(404, b'{"error": "not found"}')
            return
        worker = self.headers.get("X-Worker", "")
        with state.lock:
            now = time.monotonic()
            if state.throttle is not None:  # armed by /admin/throttle: this one, whatever
                wait, state.throttle = state.throttle, None
                body = THROTTLE_BODY
            else:
                wait = state.bucket.take(now)
                body = b'{"error": "rate limited"}'
            status = 200 if wait == 0.0 else 429
            state.requests.append((now, status, worker))
        if status == 200:
            self._send(200, json.dumps({"path": self.path, "worker": worker}).encode())
        else:
            self._send(429, body, {"Retry-After": str(max(1, math.ceil(wait)))})

    def do_POST(self) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        with state.lock:
            if parts.path == "/admin/throttle":
                state.throttle = float(parse_qs(parts.query).get("seconds", ["2"])[0])
            elif parts.path == "/admin/reset":
                state.reset()
            else:
                self._send(404, b'{"error": "not found"}')
                return
        self._send(200, b"{}")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the counts are the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, rate: float, burst: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = _State(rate, burst)


class Partner:
    """A client for a running fake partner's admin endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stats(self) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}/admin/stats", timeout=10) as reply:
            return dict(json.load(reply))

    def requests(self) -> list[tuple[float, int, str]]:
        """Every API request served: (server time, status, worker), in arrival order."""
        return [(float(t), int(s), str(w)) for t, s, w in self.stats()["requests"]]  # type: ignore[attr-defined]

    def throttle(self, seconds: float) -> None:
        """The next API request gets 429 with ``Retry-After: <seconds>``."""
        self._post(f"/admin/throttle?seconds={seconds}")

    def reset(self) -> None:
        self._post("/admin/reset")

    def _post(self, path: str) -> None:
        request = urllib.request.Request(f"{self.url}{path}", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass


@contextlib.contextmanager
def running_partner(rate: float = 20, burst: int = 5) -> Iterator[Partner]:
    """A fake partner in a process of its own, for as long as the ``with`` block."""
    command = [sys.executable, __file__, "--rate", str(rate), "--burst", str(burst)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the fake partner did not start: {line!r}")
        yield Partner(line.removeprefix("listening on ").strip())
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=5)
    args = parser.parse_args()
    server = _Server(args.rate, args.burst)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
