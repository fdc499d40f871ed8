"""The baseline: tokenlimit as of an earlier commit, measured in the same run as the current tree.

Two versions of the package cannot be imported in one process (its modules import each other as
``tokenlimit._x``). So ``extracted(rev)`` writes that revision's ``tokenlimit/`` into a temporary
directory (``git archive``), and ``BaselineChild`` runs this file as a child process with that
directory first on ``PYTHONPATH``: there ``import tokenlimit`` gets the old code, which the child
proves by sending back ``tokenlimit.__file__``. The child makes the same
``_adapters.TokenlimitAdapter`` deciders and times them with the same ``_measure.run_sync`` /
``run_async`` loops (its own event loop for the async tasks) as the parent does for the current
tree; only the finished ``Sample`` crosses the pipe, so the exchange is outside the timed region.
The parent wraps each of the child's cases in a ``Case`` whose ``run(seconds)`` asks the child
for one timed run, so they take part in the interleaved rounds like every other case.

The same child also measures the current tree (``Current``, ``tokenlimit@current``): the parent
holds every library's adapters and key lists and imports all the peers, so it is not a process
like the baseline's child (a garbage collection alone costs more there). Two children of the
same kind, one per version, make the before/after comparison like for like; the parent's own
tokenlimit cases stay for the comparison with the peers.

The protocol is JSON lines: the parent writes ``{"op": ..., ...}`` on the child's stdin, the child
answers each with one line on its stdout, ``{"result": ...}`` or ``{"error": "..."}``. The child
exits when its stdin closes (also when the parent dies) or on ``{"op": "close"}``.

    python benchmarks/_baseline.py --child REDIS_URL --tasks 64 --expect DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from _adapters import REFUSED, WORKLOADS, TokenlimitAdapter
from _measure import KeyCursor, Sample, run_async, run_sync

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# -- the parent's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    """One revision's ``tokenlimit/``, extracted under ``path``."""

    requested: str  # as given on the command line
    rev: str  # the commit, abbreviated
    subject: str  # its first line
    path: Path  # the directory holding tokenlimit/: what goes first on PYTHONPATH

    @property
    def name(self) -> str:
        """The library name of its rows."""
        return f"tokenlimit@{self.rev}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose Python imports this revision's tokenlimit."""
        env = dict(os.environ if base is None else base)
        rest = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(self.path) + (os.pathsep + rest if rest else "")
        return env

    @property
    def label(self) -> str:
        """What its rows' version column adds."""
        return f"git {self.rev}"

    def to_json(self) -> dict[str, str]:
        return {"requested": self.requested, "rev": self.rev, "subject": self.subject}


@dataclass(frozen=True)
class Current:
    """The tokenlimit the parent imported (the current tree), to be measured in a child too.

    The child inherits the parent's environment, so the same interpreter and search path give it
    the same ``tokenlimit``; ``path`` is that package's directory, and the child stops unless it
    imported its ``__init__.py`` from there."""

    path: Path
    name: str = "tokenlimit@current"

    @classmethod
    def imported(cls) -> Current:
        import tokenlimit

        return cls(Path(tokenlimit.__file__ or "?").resolve().parent)

    @property
    def label(self) -> str:
        return "this tree, in a child process"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return dict(os.environ if base is None else base)


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60)


def resolve(requested: str) -> tuple[str, str]:
    """The abbreviated commit and subject of a revision; ValueError when git does not know it
    or it has no tokenlimit/."""
    done = _git("log", "-1", "--format=%h%x00%s", f"{requested}^{{commit}}", "--")
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"--baseline {requested}: {message[-1] if message else 'git failed'}")
    rev, subject = done.stdout.decode().strip().split("\0", 1)
    if _git("cat-file", "-e", f"{rev}:tokenlimit/__init__.py").returncode != 0:
        raise ValueError(f"--baseline {requested}: {rev} has no tokenlimit/__init__.py")
    return rev, subject


@contextlib.contextmanager
def extracted(requested: str) -> Iterator[Baseline]:
    """``git archive REV tokenlimit`` unpacked in a temporary directory, removed afterwards."""
    rev, subject = resolve(requested)
    path = Path(tempfile.mkdtemp(prefix=f"tokenlimit-bench-{rev}-"))
    try:
        done = _git("archive", "--format=tar", rev, "tokenlimit")
        if done.returncode != 0:
            raise RuntimeError(f"git archive {rev} tokenlimit: {done.stderr.decode()[-300:]}")
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
            if hasattr(tarfile, "data_filter"):  # 3.12, 3.11.4, 3.10.12: no links outside
                tar.extractall(path, filter="data")
            else:  # our own repository's archive
                tar.extractall(path)
        yield Baseline(requested, rev, subject, path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


class BaselineChild:
    """A child process measuring one version's deciders, the baseline's or (``Current``) the
    current tree's; ``run`` returns its ``Sample``."""

    def __init__(self, side: Baseline | Current, url: str, tasks: int) -> None:
        self.side = side
        self.name = side.name
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child", url,
            "--tasks", str(tasks), "--expect", str(side.path),
        ]  # fmt: skip
        self.process: subprocess.Popen[str] | None = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=side.env(),
        )
        try:
            hello = self.call("hello")
        except Exception:
            self.close()
            raise
        self.file: str = hello["file"]
        self.version: str = hello["version"]

    def call(self, op: str, **fields: Any) -> Any:
        process = self.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"the {self.name} child is not running")
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} child exited ({process.wait(5)})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["result"]

    def prepare(self, mode: str, keys: dict[str, list[str]]) -> str:
        """Make the deciders of one mode; "ok", "n/a" or why not."""
        status: str = self.call("prepare", mode=mode, keys=keys)
        return status

    def decide(self, mode: str, key: str) -> bool:
        """One decision on the 1/second, burst 1 limit (the self-check)."""
        return bool(self.call("decide", mode=mode, key=key))

    def run(self, mode: str, workload: str, seconds: float) -> Sample:
        """One timed run in the child."""
        return Sample(**self.call("run", mode=mode, workload=workload, seconds=seconds))

    def close(self) -> None:
        """Ask the child to close its limiters and exit; stop it by its PID if it does not."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                assert process.stdin is not None
                process.stdin.write(json.dumps({"op": "close"}) + "\n")
                process.stdin.close()
                process.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            if process.stdout is not None:
                process.stdout.close()


# -- the child's side ----------------------------------------------------------------------------
class Child:
    """Holds one version's adapter, its event loop and its cases; answers the parent."""

    def __init__(self, url: str, tasks: int, expect: Path) -> None:
        self.url = url
        self.tasks = tasks
        self.expect = expect
        self.loop = asyncio.new_event_loop()
        self.adapter: TokenlimitAdapter | None = None
        self.cases: dict[tuple[str, str], tuple[Any, KeyCursor]] = {}
        self.checks: dict[str, Callable[[str], bool]] = {}

    def hello(self) -> dict[str, str]:
        import tokenlimit

        file = Path(tokenlimit.__file__ or "").resolve()
        if not file.is_relative_to(self.expect.resolve()):
            raise RuntimeError(f"imported tokenlimit from {file}, not from {self.expect}")
        self.adapter = TokenlimitAdapter(self.url)
        return {"file": str(file), "version": str(getattr(tokenlimit, "__version__", "?"))}

    def prepare(self, mode: str, keys: dict[str, list[str]]) -> str:
        """As ``Bench._deciders`` in run.py: every workload's decider and the self-check's."""
        adapter = self.adapter
        assert adapter is not None
        made: dict[str, Any] = {}
        try:
            if mode == "sync":
                for workload in WORKLOADS:
                    made[workload.name] = adapter.sync_decider(workload)
                check: Callable[[str], bool] = adapter.sync_decider(REFUSED)
            else:
                for workload in WORKLOADS:
                    decider = self.loop.run_until_complete(adapter.async_decider(workload))
                    if decider is None:
                        return "n/a"
                    made[workload.name] = decider
                acheck = self.loop.run_until_complete(adapter.async_decider(REFUSED))

                def check(key: str) -> bool:
                    return self.loop.run_until_complete(acheck(key))

        except ImportError as exc:
            return f"not installed ({exc.name or exc})"
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"[:120]
        for name, decider in made.items():
            self.cases[(mode, name)] = (decider, KeyCursor(keys[name]))
        self.checks[mode] = check
        return "ok"

    def decide(self, mode: str, key: str) -> bool:
        return bool(self.checks[mode](key))

    def run(self, mode: str, workload: str, seconds: float) -> dict[str, Any]:
        decider, cursor = self.cases[(mode, workload)]
        if mode == "sync":
            sample = run_sync(decider, cursor, seconds)
        else:
            sample = self.loop.run_until_complete(run_async(decider, cursor, seconds, self.tasks))
        return asdict(sample)

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()
            self.loop.run_until_complete(self.adapter.aclose())
            self.adapter = None
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def serve(self, requests: IO[str], answers: IO[str]) -> None:
        ops: dict[str, Callable[..., Any]] = {
            "hello": self.hello,
            "prepare": self.prepare,
            "decide": self.decide,
            "run": self.run,
        }
        try:
            for line in requests:
                request = json.loads(line)
                op = request.pop("op")
                if op == "close":
                    break
                try:
                    answer: dict[str, Any] = {"result": ops[op](**request)}
                except Exception as exc:
                    answer = {"error": f"{op}: {type(exc).__name__}: {exc}"[:300]}
                answers.write(json.dumps(answer) + "\n")
                answers.flush()
        finally:
            self.close()


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one version's side of run.py --baseline")
    parser.add_argument("--child", required=True, metavar="REDIS_URL")
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--expect", type=Path, required=True, help="where tokenlimit must be")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group: the parent stops this child when it is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = sys.stdout
    sys.stdout = sys.stderr  # a stray print must not break the protocol
    Child(args.child, args.tasks, args.expect).serve(sys.stdin, answers)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
