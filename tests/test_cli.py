"""The ``tokenlimit`` command line against real servers: ``check`` (standalone, cluster,
Sentinel, a dead port, an ACL user short of a command), ``peek``/``reset`` on the bucket an
integration charged, ``bench``; in-process through ``main(argv)``, plus ``python -m tokenlimit``
and the console script's entry point."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import redis
from conftest import FLAVOURS, Target

import tokenlimit
from servers import SentinelGroup, TlsServer, available_binaries, free_port, scratch, tls_files
from tokenlimit import Limit, RateLimiter
from tokenlimit._cli import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, main
from tokenlimit._redis import survey

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "cli-user", "Pw9f3kQz7"  # a password distinct enough to search the output for


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` with a deadline for a loaded 2-core machine: (exit code, stdout, stderr)."""
    code = main([*argv, "--timeout", "5"])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.endswith("\n"), err
    assert "Traceback" not in err
    return err


@contextmanager
def acl_user(target: Target, *rules: str) -> Iterator[str]:
    """An ACL user with ``rules`` on the standalone server, deleted afterwards; its URL."""
    admin = redis.Redis.from_url(target.url)
    admin.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", *rules)
    try:
        yield target.url.replace("redis://", f"redis://{USER}:{PASSWORD}@", 1)
    finally:
        admin.execute_command("ACL", "DELUSER", USER)
        admin.close()


def scratch_keys(target: Target) -> list[bytes]:
    client = target.client()
    try:
        return list(client.scan_iter(match="tl:*"))
    finally:
        client.close()


# -- what check reads from replies (pure) -------------------------------------------------------
def test_slot_map_gaps_and_acl_refusals_are_read_from_replies() -> None:
    reply = [
        [5461, 16383, [b"10.0.0.2", 7001, b"id2"], [b"10.0.0.5", 7004, b"id5"]],
        [0, 100, [b"10.0.0.1", 7000, b"id1"]],
        [200, 5460, [b"10.0.0.1", 7000, b"id1"]],
    ]
    shards = survey.shards_of(reply)
    assert [(s.master, s.slots, s.replicas) for s in shards] == [
        ("10.0.0.1:7000", [(0, 100), (200, 5460)], []),
        ("10.0.0.2:7001", [(5461, 16383)], ["10.0.0.5:7004"]),
    ]
    assert survey.uncovered(shards) == [(101, 199)]
    assert survey.uncovered([]) == [(0, 16383)]
    script = "ACL failure in script: User u has no permissions to run the 'get' command script:"
    assert survey.denied_command(script) == "GET"
    assert survey.denied_command("User u has no permissions to run the 'evalsha' command") == (
        "EVALSHA"
    )
    assert survey.denies_keys("NOPERM No permissions to access a key")
    assert survey.denies_keys("User u has no permissions to access the 'tl:{x}y' key")
    assert not survey.denies_keys("User u has no permissions to run the 'del' command")

    class Redis5:  # a server from before ACLs
        def acl_whoami(self) -> str:
            raise redis.ResponseError("unknown command 'ACL', with args beginning with: 'WHOAMI'")

    old = survey.acl_of(survey.Node(Redis5(), "h:1"), "k", ["EVALSHA"])  # type: ignore[arg-type]
    assert not old.enabled


# -- check --------------------------------------------------------------------------------------
def test_check_passes_and_leaves_nothing(
    target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "check", target.url)
    assert (code, err) == (0, "")
    rows = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert rows == ["server", "topology", "memory", "acl", "scripts", "decisions", "ok"]
    if target.kind == "cluster":
        assert "3 masters" in out
        assert "slots 0-" in out
    assert re.search(r"100 on a scratch key: p50 [\d.]+ ms, p99 [\d.]+ ms", out)

    valkey = target.url.replace("redis", "valkey", 1)  # valkey://, valkey+cluster://
    code, out, _ = run(capsys, "check", valkey, "--json")
    doc = json.loads(out)
    assert (code, doc["ok"], doc["exit"], doc["problem"]) == (0, True, 0, None)
    assert doc["acl"]["denied"] == []
    assert doc["decisions"]["count"] == 100
    assert len(doc["scripts"]["loaded"]) == 5
    assert scratch_keys(target) == []  # the scratch bucket was reset


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_check_on_a_dead_port_is_one_line(scheme: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"{scheme}://:{PASSWORD}@127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "check", url)
    assert code == EXIT_UNREACHABLE
    assert out == ""
    assert one_line(err).startswith("tokenlimit: cannot reach the server")
    assert PASSWORD not in err

    code, out, err = run(capsys, "check", url, "--json")
    assert json.loads(out)["exit"] == EXIT_UNREACHABLE
    assert PASSWORD not in out + err


def test_a_password_is_never_printed(
    standalone: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    with acl_user(standalone, "~*", "+@all") as url:
        for argv in (
            ["check", url],
            ["check", url, "--json"],
            ["peek", url, "--limit", "5/minute", "--user", "42", "--json"],
            ["peek", url, "--limit", "5/lightyear", "--user", "42"],  # a usage error
            ["peek", url, "--bogus"],  # argparse's own
        ):
            code, out, err = run(capsys, *argv)
            assert code in (0, EXIT_USAGE), (argv, out, err)
            assert PASSWORD not in out + err, argv
            assert f"{USER}:***@" in out + err or code == EXIT_USAGE


@pytest.mark.parametrize(
    "rules",
    [
        ("~*", "+@all", "-evalsha"),  # the user may ask ACL DRYRUN: it names what is missing
        ("~tl:*", "-@all", "+eval", "+del", "+time", "+get", "+set"),  # no DRYRUN, no INFO
    ],
    ids=["dry-run", "decisions"],
)
def test_an_acl_user_without_evalsha_fails_the_check(
    standalone: Target, rules: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with acl_user(standalone, *rules) as url:
        code, out, err = run(capsys, "check", url)
    assert code == EXIT_FAILED, out + err
    line = one_line(err)
    assert f"ACL user '{USER}' may not run EVALSHA (every decision): grant +evalsha" in line
    assert "acl" in out  # what was learnt before, row by row


def test_check_finds_the_primary_through_sentinel(capsys: pytest.CaptureFixture[str]) -> None:
    group = SentinelGroup(available_binaries()[sorted(available_binaries())[0]], count=1, quorum=1)
    try:
        group.start()
        code, out, err = run(capsys, "check", group.url, "--json")
    finally:
        group.stop()
    doc = json.loads(out)
    assert (code, err) == (0, ""), doc
    assert doc["server"]["kind"] == "sentinel"
    assert group.primary is not None
    assert group.replica is not None
    assert doc["topology"]["primary"] == f"127.0.0.1:{group.primary.port}"
    assert doc["topology"]["replicas"] == [f"127.0.0.1:{group.replica.port}"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_check_over_tls_verifies_the_certificate(
    flavour: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("TLS: no openssl command to make a throwaway CA and certificate")
    tls = tls_files(scratch("cli-tls-"))
    server = TlsServer(available_binaries()[flavour], tls=tls)
    try:
        server.start()
    except RuntimeError as exc:
        logs = "".join(p.read_text(errors="replace") for p in server.workdir.glob("*.log"))
        if "tls" in (logs + str(exc)).lower():
            pytest.skip(f"TLS: {flavour} was built without TLS")
        raise
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"
        code, out, err = run(capsys, "check", f"{url}?ssl_ca_certs={tls['ca']}")
        assert (code, err) == (0, ""), out
        code, _, err = run(capsys, "check", url)  # the system's CAs never signed it
        assert code == EXIT_UNREACHABLE
        assert "certificate" in one_line(err).lower()
    finally:
        server.stop()


# -- peek and reset -----------------------------------------------------------------------------
def test_peek_and_reset_see_what_an_integration_charged(
    target: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    from flask import Flask

    from tokenlimit.integrations.flask import TokenLimit

    with RateLimiter.from_url(target.url, timeout=5.0) as limiter:
        app = Flask(__name__)
        limits = TokenLimit(app, limiter=limiter)

        @app.get("/items")
        @limits.limit("5/minute")
        def items() -> dict[str, bool]:
            return {"ok": True}

        client = app.test_client()

        def remaining_after_a_request() -> str:
            response = client.get("/items", environ_base={"REMOTE_ADDR": "2001:db8::1"})
            return str(response.headers["X-RateLimit-Remaining"])

        for _ in range(3):
            remaining_after_a_request()
        # Another address of the same /64: the integrations' bucket for the subscriber.
        who = ["--limit", "5/minute", "--ip", "2001:db8::ffff", "--route", "items"]
        code, out, _ = run(capsys, "peek", target.url, *who, "--json")
        doc = json.loads(out)
        assert (code, doc["key"], doc["remaining"], doc["limit"]) == (
            0, "route:items|ip:2001:db8::/64", 2, 5
        )  # fmt: skip
        assert 0 < doc["reset_after"] <= 36.0  # 3 tokens at one per 12 s

        code, out, _ = run(capsys, "peek", target.url, *who)
        assert "remaining    2" in out
        assert "route:items|ip:2001:db8::/64" in out

        code, out, _ = run(capsys, "reset", target.url, *who)
        assert code == 0
        assert "full again" in out
        assert "remaining    5" in out
        assert remaining_after_a_request() == "4"  # the app sees the refilled bucket
        code, out, _ = run(capsys, "reset", target.url, *who, "--json")
        assert (code, json.loads(out)["reset"], json.loads(out)["remaining"]) == (0, True, 5)

        # A bucket is a key and a limit: the same key under a named limit is another bucket.
        limiter.try_acquire("job:7", Limit.parse("5/minute", name="search"), cost=2)
        raw = ["--key", "job:7", "--limit", "5/minute", "--json"]
        code, out, _ = run(capsys, "peek", target.url, *raw, "--name", "search")
        assert (code, json.loads(out)["remaining"]) == (0, 3)
        code, out, _ = run(capsys, "peek", target.url, *raw)  # unnamed: untouched
        assert (code, json.loads(out)["remaining"]) == (0, 5)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["peek", "memory://", "--limit", "1/s", "--user", "1"], "memory:// lives inside one"),
        (["peek", "redis://h/0", "--limit", "often", "--user", "1"], "limit: cannot parse 'often'"),
        (["reset", "redis://h/0", "--limit", "1/s", "--key", "k", "--route", "r"], "--route"),
        (["peek", "redis://h/0", "--limit", "1/s", "--ip", "not-an-ip"], "--ip: not an IP"),
        (["bench", "redis://h/0", "--seconds", "0"], "--seconds"),
    ],
)
def test_bad_usage_exits_2_in_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (EXIT_USAGE, "")
    assert says in one_line(err)


# -- bench --------------------------------------------------------------------------------------
def test_bench_prints_both_rates(standalone: Target, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bench", standalone.url, "--seconds", "1")
    assert (code, err) == (0, ""), out
    assert re.search(r"tokenlimit +[\d,]+ decisions/s, p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"floor +[\d,]+ EVALSHA/s", out)
    assert re.search(r"ratio +[\d.]+x the floor's rate", out)

    code, out, _ = run(capsys, "bench", standalone.url, "--seconds", "0.5", "--json")
    doc = json.loads(out)
    assert doc["tokenlimit"]["per_second"] > 0
    assert doc["floor"]["per_second"] > 0
    assert doc["ratio"] == pytest.approx(
        doc["tokenlimit"]["per_second"] / doc["floor"]["per_second"], rel=0.01
    )
    assert scratch_keys(standalone) == []


# -- entry points -------------------------------------------------------------------------------
def test_python_dash_m_and_the_console_script(
    standalone: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    # The child imports the tokenlimit under test, wherever it was imported from here.
    path = [str(Path(tokenlimit.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TOKENLIMIT_URL": standalone.url}
    done = subprocess.run(
        [sys.executable, "-m", "tokenlimit", "check", "--json", "--timeout", "5"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout)["ok"] is True  # the URL came from TOKENLIMIT_URL

    # The script pip writes for [project.scripts] runs sys.exit(<entry point>()).
    found = re.search(
        r'^\[project\.scripts\]\ntokenlimit = "([^"]+)"$',
        (ROOT / "pyproject.toml").read_text(),
        re.MULTILINE,
    )
    assert found is not None
    script = EntryPoint(name="tokenlimit", value=found[1], group="console_scripts").load()
    assert script is main
    assert script(["--version"]) == 0
    assert capsys.readouterr().out == f"tokenlimit {tokenlimit.__version__}\n"
    installed = entry_points(group="console_scripts", name="tokenlimit")
    assert all(entry.value == found[1] for entry in installed)  # none: an older install here
