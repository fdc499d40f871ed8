"""The Docker files, read statically (Docker is not needed): a base image pinned by digest,
packages from the lock, the API on 127.0.0.1, the load test on the API's image, the Valkey
major the README benchmarks; and the image's own command, run here with the image's
environment, refuses to start without a storage URL."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = (ROOT / "docker-compose.yml").read_text()
sys.path.insert(0, str(ROOT / "tools"))
import pin_base_image  # noqa: E402


def _instructions(name: str) -> list[str]:
    """The arguments of each ``name`` instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m[1].strip() for m in re.finditer(rf"^{name} (.*)$", text, re.MULTILINE)]


def _service(name: str) -> str:
    """One service's block of docker-compose.yml (its indented lines)."""
    match = re.search(rf"^  {name}:\n((?:    .*\n|\s*\n|  #.*\n)*)", COMPOSE, re.MULTILINE)
    assert match is not None, f"no service {name!r}"
    return match[1]


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _instructions("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_base_image_is_pinned_by_digest() -> None:
    (base,) = _instructions("FROM")
    assert re.fullmatch(r"python:3\.12-slim@sha256:[0-9a-f]{64}", base)
    name, tag, digest = pin_base_image.base_image(DOCKERFILE)
    assert (name, tag) == ("python", "3.12-slim")
    assert digest is not None
    assert digest in base


def test_pin_rewrites_only_the_from_line() -> None:
    digest = "sha256:" + "ab" * 32
    again = pin_base_image.pinned(DOCKERFILE, digest)
    assert pin_base_image.base_image(again) == ("python", "3.12-slim", digest)
    assert again.replace(digest, "") == DOCKERFILE.replace(
        pin_base_image.base_image(DOCKERFILE)[2] or "", ""
    )
    unpinned = "FROM python:3.12-slim AS base\nRUN true\n"
    assert (
        pin_base_image.pinned(unpinned, digest)
        == f"FROM python:3.12-slim@{digest} AS base\nRUN true\n"
    )
    with pytest.raises(ValueError, match="digest"):
        pin_base_image.pinned(unpinned, "latest")


def test_packages_come_from_the_lock() -> None:
    assert "COPY requirements/constraints.txt ./requirements/" in DOCKERFILE
    installs = [args for args in _instructions("RUN") if "pip install" in args]
    assert installs
    assert all("-c requirements/constraints.txt" in args for args in installs)
    lock = (ROOT / "requirements" / "constraints.txt").read_text()
    for package in ("uvicorn", "httpx", "fastapi", "prometheus-client", "hiredis"):
        assert re.search(rf"^{package}==", lock, re.MULTILINE), package  # pinned there


def test_api_binds_to_localhost_and_loadtest_reuses_its_image() -> None:
    api, loadtest = _service("api"), _service("loadtest")
    assert re.findall(
        r'^\s+- "([^"]+)"$', api.split("ports:")[1].split("depends_on:")[0], re.M
    ) == ["127.0.0.1:8000:8000"]
    image = re.search(r"^    image: (\S+)", api, re.MULTILINE)
    assert image is not None
    assert "build: ." in api
    assert re.search(rf"^    image: {re.escape(image[1])}$", loadtest, re.MULTILINE)
    assert "build:" not in loadtest  # one build, two services
    assert "pull_policy: never" in loadtest  # a local name, never looked up on a registry


def test_compose_runs_the_valkey_major_the_readme_benchmarks() -> None:
    server = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    server = server["environment"]["server"]
    benchmarked = re.fullmatch(r"Valkey (\d+)\.\d+\.\d+", server)
    assert benchmarked is not None
    image = re.search(r"^    image: valkey/valkey:(\d+)[.\w-]*$", _service("redis"), re.MULTILINE)
    assert image is not None
    assert image[1] == benchmarked[1]
    assert f"Valkey {benchmarked[1]}." in (ROOT / "README.md").read_text()


def test_the_image_refuses_to_start_without_a_url() -> None:
    """The image's CMD, with the image's ENV, from a copy of its WORKDIR layout (the checkout:
    examples/ at the top), and no TOKENLIMIT_URL: one line, exit 2, nothing started."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENLIMIT_URL", "REDIS_URL")}
    image_env = _image_env()
    assert image_env["TOKENLIMIT_REQUIRE_URL"] == "1"
    env.update(image_env)
    (cmd,) = _instructions("CMD")
    command = json.loads(cmd)
    assert command[:3] == ["python", "-m", "examples.fastapi_demo"]
    assert "--workers" in command
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, *command[1:]], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("tokenlimit demo: TOKENLIMIT_URL is not set")
    assert done.stdout == ""
    assert time.monotonic() - started < 30


def test_the_app_refuses_too_when_the_image_requires_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started some other way (``uvicorn examples.fastapi_demo.app:app`` in the image), the app
    itself refuses, with the same reason."""
    pytest.importorskip("fastapi")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from fastapi_demo.app import MissingURL, create_app, storage_url
    finally:
        sys.path.remove(str(ROOT / "examples"))
    monkeypatch.delenv("TOKENLIMIT_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TOKENLIMIT_REQUIRE_URL", "1")
    with pytest.raises(MissingURL, match="TOKENLIMIT_URL is not set"):
        create_app()
    assert storage_url("redis://elsewhere:6379/0") == "redis://elsewhere:6379/0"
    monkeypatch.setenv("REDIS_URL", "redis://old-name:6379/0")
    assert storage_url() == "redis://old-name:6379/0"
    monkeypatch.delenv("TOKENLIMIT_REQUIRE_URL")
    monkeypatch.delenv("REDIS_URL")
    assert storage_url() == "memory://"
