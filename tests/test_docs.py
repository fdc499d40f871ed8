"""Every ```python block in README.md and docs/**/*.md runs as written, against a real server.

A block's first line may say what it is:

- ``# fragment: <why>``: not a program (say one line per framework); it must still parse.
- ``# continued from ...``: runs after the block before it in the same file, in its namespace
  (or, for a Django project, in its files).
- ``# before: <library>``: another library's code, shown next to ours (docs/migrating.md); it
  must parse.
- ``# after: <library>``: ours, in place of that code: it runs, and tests/test_migrating.py
  drives its app request by request (so it may have routes that are not limited).

Everything else runs on its own, with ``redis://localhost:6379/0`` and ``TOKENLIMIT_URL``
pointing at the test server. A block that leaves a FastAPI or Flask ``app`` (or a
``create_app``) gets a GET on each plain route, which must answer 200 with rate-limit headers.
A Django block (Django's integration or DRF's) is made of ``# settings.py`` / ``# views.py``
sections: they are added to a project ``django-admin startproject`` made, which must pass
``manage.py check`` and answer each view (function, or class with a ``...View`` base), in a
subprocess (Django's settings are per process). A block that defines ``test_*``
functions is a test module: pytest runs it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import FLAVOURS

import tokenlimit

if TYPE_CHECKING:
    from conftest import TestBed

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})\s*(?P<info>[^`]*)$")
_FILE_HEADER = re.compile(r"^# (?P<name>\w+\.py)\b")
_LOCAL_URL = re.compile(r"redis://localhost:6379(?:/0)?")
_DJANGO = re.compile(r"tokenlimit\.integrations\.(?:django|drf)\b")  # a Django project


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: its file, the line of its first line of code, its code."""

    path: Path
    line: int
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0]

    @property
    def fragment(self) -> bool:
        return self.first_line.startswith("# fragment")

    @property
    def continued(self) -> bool:
        return self.first_line.startswith("# continued")

    @property
    def before(self) -> bool:
        return self.first_line.startswith("# before")

    @property
    def after(self) -> bool:
        return self.first_line.startswith("# after")


def blocks_of(path: Path) -> list[Block]:
    """The ```python (or ```py) blocks of one Markdown file, in order."""
    found: list[Block] = []
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        ticks, indent = opening["ticks"], len(opening["indent"])
        start, body = index, []
        while index < len(lines) and lines[index].strip() != ticks:
            body.append(lines[index][indent:])
            index += 1
        index += 1  # the closing fence
        words = opening["info"].split()
        if words and words[0] in ("python", "py"):
            found.append(Block(path, start + 1, "\n".join(body) + "\n"))
    return found


BLOCKS = [block for path in DOCS for block in blocks_of(path)]


def chain(block: Block) -> list[Block]:
    """The block and the blocks it continues, first one first."""
    same_file = [b for b in BLOCKS if b.path == block.path]
    position = same_file.index(block)
    start = position
    while same_file[start].continued:
        assert start > 0, f"{block.id} continues nothing: it is its file's first block"
        start -= 1
    return same_file[start : position + 1]


@pytest.fixture
def server_url(testbed: TestBed, monkeypatch: pytest.MonkeyPatch) -> str:
    """A flushed standalone server (one flavour: the docs do not depend on it), also set as
    ``TOKENLIMIT_URL`` for the default limiter."""
    target = testbed.get("standalone", FLAVOURS[0])
    target.flush()
    monkeypatch.setenv("TOKENLIMIT_URL", target.url)
    monkeypatch.delenv("REDIS_URL", raising=False)
    return target.url


def test_the_docs_have_blocks_and_fragments_say_why() -> None:
    assert {b.path.name for b in BLOCKS} >= {"README.md", "metrics.md", "fastapi.md"}
    assert len(BLOCKS) >= 20
    for block in BLOCKS:
        if block.fragment:
            assert re.match(r"# fragment: \S", block.first_line), block.id
        if block.before or block.after:
            assert re.match(r"# (before|after): \S", block.first_line), block.id
    fragments = [b.id for b in BLOCKS if b.fragment]
    assert len(fragments) <= len(BLOCKS) // 10, f"fragments should be rare: {fragments}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_written(block: Block, request: pytest.FixtureRequest) -> None:
    if block.fragment or block.before:
        compile(_numbered(block, block.code), str(block.path), "exec")  # still Python
        return
    url: str = request.getfixturevalue("server_url")
    blocks = chain(block)
    codes = [_numbered(b, _LOCAL_URL.sub(url, b.code)) for b in blocks]
    if any(_DJANGO.search(b.code) for b in blocks):
        run_django_project(blocks, url, request.getfixturevalue("tmp_path"))
    elif any(re.search(r"^def test_", b.code, re.MULTILINE) for b in blocks):
        run_test_module("".join(codes), request.getfixturevalue("tmp_path"))
    else:
        namespace: dict[str, Any] = {"__name__": "docs_block"}
        try:
            for b, code in zip(blocks, codes, strict=True):
                exec(compile(code, str(b.path), "exec"), namespace)
            if not block.after:  # test_migrating.py drives those
                exercise_app(namespace)
        finally:
            for value in namespace.values():
                if isinstance(value, tokenlimit.RateLimiter):
                    value.close()


def _numbered(block: Block, code: str) -> str:
    """The code, shifted so that tracebacks name the Markdown file's own line numbers."""
    return "\n" * (block.line - 1) + code


def exercise_app(namespace: dict[str, Any]) -> None:
    """GET every plain route of the ``app`` (or ``create_app()``) a block made: 200, limited."""
    app = namespace.get("app")
    if app is None and callable(namespace.get("create_app")):
        app = namespace["create_app"]()
    if app is None or type(app).__module__.startswith("celery."):  # a task queue: no routes
        return
    answers: dict[str, tuple[int, Any]] = {}
    if type(app).__module__.startswith("flask"):
        client = app.test_client()
        for rule in app.url_map.iter_rules():
            if "GET" in rule.methods and not rule.arguments and rule.endpoint != "static":
                response = client.get(rule.rule)
                answers[rule.rule] = (response.status_code, response.headers)
    else:
        from fastapi.routing import APIRoute
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            for route in app.routes:
                if isinstance(route, APIRoute) and "GET" in route.methods and "{" not in route.path:
                    response = client.get(route.path)
                    answers[route.path] = (response.status_code, response.headers)
    assert answers, "the app has no route to try"
    for path, (status, headers) in answers.items():
        assert status == 200, path
        assert "X-RateLimit-Limit" in headers, path


def run_test_module(code: str, tmp_path: Path) -> None:
    """Pytest runs the block as a test module of its own (tokenlimit's plugin loads itself)."""
    (tmp_path / "test_block.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_block.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


_DJANGO_SCRIPT = """
import json
import django

django.setup()
from django.core.management import call_command
from django.test import Client
from django.test.utils import setup_test_environment

setup_test_environment()
call_command("check", fail_level="WARNING")
answers = {}
for name in VIEWS:
    response = Client().get(f"/{name}/")
    answers[name] = [response.status_code, response.get("X-RateLimit-Limit")]
print(json.dumps(answers))
"""


def run_django_project(blocks: list[Block], url: str, tmp_path: Path) -> None:
    """The blocks' ``# settings.py`` and ``# views.py`` sections, added to a fresh project."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in "".join(_LOCAL_URL.sub(url, b.code) for b in blocks).splitlines():
        header = _FILE_HEADER.match(line)
        if header is not None:
            current = sections.setdefault(header["name"], [])
        if current is not None:
            current.append(line)
    assert sections, "a Django block says which file each part goes in: # settings.py, ..."
    assert set(sections) <= {"settings.py", "views.py"}, sorted(sections)
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "docsite", str(tmp_path)],
        check=True,
        timeout=60,
    )
    package = tmp_path / "docsite"
    with (package / "settings.py").open("a") as settings:
        settings.write("\n" + "\n".join(sections.get("settings.py", [])) + "\n")
    views: list[str] = []
    if "views.py" in sections:
        code = "\n".join(sections["views.py"]) + "\n"
        (package / "views.py").write_text(code)
        routes = []  # each view at /<its name>/
        for node in ast.parse(code).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                routes.append(f"path('{node.name}/', views.{node.name})")
            elif isinstance(node, ast.ClassDef) and _is_view(node):
                routes.append(f"path('{node.name}/', views.{node.name}.as_view())")
            else:
                continue
            views.append(node.name)
        with (package / "urls.py").open("a") as urls:
            urls.write(f"\nfrom docsite import views\n\nurlpatterns += [{', '.join(routes)}]\n")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env |= {"DJANGO_SETTINGS_MODULE": "docsite.settings", "TOKENLIMIT_URL": url}
    script = f"VIEWS = {views!r}\n" + _DJANGO_SCRIPT
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(answers) == set(views)
    drf = any("tokenlimit.integrations.drf" in b.code for b in blocks)
    for name, (status, limit) in answers.items():
        assert status == 200, name
        # DRF's throttles answer only a 429's Retry-After: no headers on a 200.
        assert drf or limit is not None, name


def _is_view(node: ast.ClassDef) -> bool:
    """A class-based view (a base named ``...View``, as ``View`` or DRF's ``APIView``), not a
    class beside the views (a DRF throttle)."""
    names = [
        base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
        for base in node.bases
    ]
    return any(name.endswith("View") for name in names)
