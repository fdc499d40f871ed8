"""Serve the demo under uvicorn, ready for several workers: the Docker image's command.

    python -m examples.fastapi_demo [--host 127.0.0.1] [--port 8000] [--workers 2]

Before any worker starts: a storage URL is required on more than one worker, or when
``TOKENLIMIT_REQUIRE_URL=1`` (one line on stderr and exit 2 without it: ``memory://`` would
give each worker its own limits); and Prometheus's multiprocess mode is set up, so ``/metrics``
shows every worker's counts whichever answers: ``$PROMETHEUS_MULTIPROC_DIR`` is emptied of the
previous run's files (a restarted container must not count its last life twice), or with
several workers and no such variable, a temporary directory is made and removed at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The variable prometheus_client reads when it is first imported (tokenlimit.metrics names it).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def missing_url(workers: int) -> str | None:
    """Why the workers would have no shared storage, or None. The variables are app.py's
    (``storage_url``), read here before anything imports the app."""
    if os.environ.get("TOKENLIMIT_URL") or os.environ.get("REDIS_URL"):
        return None
    if os.environ.get("TOKENLIMIT_REQUIRE_URL") == "1" or workers > 1:
        return (
            "TOKENLIMIT_URL is not set (e.g. redis://redis:6379/0): refusing to start, since "
            "memory:// would give each worker process its own limits"
        )
    return None


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[str | None]:
    """The metrics directory the workers share, emptied; None on one worker without one."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # prometheus_client's files, one per kind and process
            stale.unlink()
        yield given
        return
    if workers == 1:
        yield None
        return
    made = tempfile.mkdtemp(prefix="tokenlimit-metrics-")
    os.environ[MULTIPROC_ENV] = made  # inherited by the workers uvicorn spawns
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    problem = missing_url(args.workers)
    if problem is not None:
        print(f"tokenlimit demo: {problem}", file=sys.stderr)
        return 2
    import uvicorn

    with multiprocess_dir(args.workers):
        uvicorn.run(f"{__package__}.app:app", host=args.host, port=args.port, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
