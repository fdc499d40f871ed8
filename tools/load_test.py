"""An async HTTP load generator for rate-limited endpoints: how many requests were allowed,
refused (429) or failed, per second, with latency percentiles.

    python tools/load_test.py --url http://127.0.0.1:8000/v1/hello --api-key demo \\
        --concurrency 20 --seconds 10 [--json results.json] [--chart chart.html]

``--concurrency`` clients send GET requests back to back for ``--seconds`` (and at most
``--max-requests``), then wait for the requests still in flight (each bounded by ``--timeout``).
``--api-key`` is sent as ``X-API-Key`` (repeat it or give a comma list to rotate keys). A live
progress line goes to stderr when it is a terminal; the summary table goes to stdout; ``--json``
writes the results for machines (``-`` for stdout, the table then goes to stderr) and ``--chart``
a self-contained HTML page with an SVG chart of allowed and refused requests per second.
Needs only ``httpx``. Importable: ``run_load(...)`` returns a ``Result``.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "OUTCOMES",
    "Result",
    "format_summary",
    "main",
    "outcome_of",
    "percentile",
    "render_chart",
    "run_load",
    "run_load_async",
    "write_chart",
    "write_json",
]

OUTCOMES = ("allowed", "refused", "errors")


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def outcome_of(status: int | None) -> str:
    """``allowed`` for 2xx, ``refused`` for 429, ``errors`` for anything else or no response."""
    if status is not None and 200 <= status < 300:
        return "allowed"
    if status == 429:
        return "refused"
    return "errors"


@dataclass
class Result:
    """What one run measured. ``to_dict()`` is the JSON written by ``--json``."""

    url: str
    concurrency: int
    seconds: float  # the planned duration
    keepalive: bool = True
    elapsed: float = 0.0  # first request sent -> last response received, seconds
    started_at: float = 0.0  # wall clock (time.time()) of the first request
    sent: int = 0
    allowed: int = 0
    refused: int = 0
    errors: int = 0
    status_counts: Counter[str] = field(default_factory=Counter)  # "200", "429", "ConnectError"
    series: list[dict[str, int]] = field(default_factory=list)  # per second of the run
    tally_header: str | None = None
    by_header: dict[str, dict[str, int]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # sorted, responses only

    def count(self, outcome: str) -> int:
        return int(getattr(self, outcome))

    @property
    def throughput(self) -> float:
        """Requests completed per second."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self) -> dict[str, float]:
        """Latency percentiles in milliseconds over every request that got a response."""
        values = self.latencies_ms
        return {
            "p50": round(percentile(values, 50), 3),
            "p90": round(percentile(values, 90), 3),
            "p99": round(percentile(values, 99), 3),
            "max": round(values[-1], 3) if values else 0.0,
            "mean": round(sum(values) / len(values), 3) if values else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "url": self.url,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "keepalive": self.keepalive,
            "elapsed": round(self.elapsed, 4),
            "started_at": self.started_at,
            "sent": self.sent,
            "allowed": self.allowed,
            "refused": self.refused,
            "errors": self.errors,
            "throughput": round(self.throughput, 2),
            "status_counts": dict(sorted(self.status_counts.items())),
            "latency_ms": self.latency(),
            "series": self.series,
        }
        if self.tally_header:
            data["tally_header"] = self.tally_header
            data["by_header"] = self.by_header
        return data


class _Recorder:
    """Collects one run's samples; turned into a ``Result`` at the end."""

    def __init__(self, result: Result) -> None:
        self.result = result
        self.start = 0.0  # perf_counter() when the first request is sent
        self.last_done = 0.0
        self.buckets: dict[int, Counter[str]] = {}
        self.latencies: list[float] = []

    def record(self, status: int | str, sent_at: float, done_at: float, tag: str | None) -> None:
        outcome = outcome_of(status if isinstance(status, int) else None)
        result = self.result
        setattr(result, outcome, result.count(outcome) + 1)
        result.status_counts[str(status)] += 1
        if isinstance(status, int):
            self.latencies.append((done_at - sent_at) * 1000)
        second = max(0, int(done_at - self.start))
        self.buckets.setdefault(second, Counter())[outcome] += 1
        if result.tally_header is not None:
            row = result.by_header.setdefault(tag or "-", dict.fromkeys(OUTCOMES, 0))
            row[outcome] += 1
        self.last_done = max(self.last_done, done_at)

    def finish(self) -> Result:
        result = self.result
        result.elapsed = max(0.0, self.last_done - self.start) if result.sent else 0.0
        result.latencies_ms = sorted(self.latencies)
        last = max(self.buckets, default=-1)
        result.series = [
            {"second": s, **{o: self.buckets.get(s, Counter())[o] for o in OUTCOMES}}
            for s in range(last + 1)
        ]
        result.by_header = dict(sorted(result.by_header.items()))
        return result


def _progress_line(result: Result, elapsed: float) -> str:
    rate = result.sent / elapsed if elapsed > 0 else 0.0
    return (
        f"{elapsed:5.1f}s/{result.seconds:g}s  sent {result.sent}  allowed {result.allowed}  "
        f"refused {result.refused}  errors {result.errors}  {rate:,.0f} req/s"
    )


async def run_load_async(
    url: str,
    *,
    api_keys: Sequence[str] = (),
    concurrency: int = 20,
    seconds: float = 10.0,
    max_requests: int | None = None,
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
    keepalive: bool = True,
    tally_header: str | None = None,
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> Result:
    """Send GET ``url`` from ``concurrency`` clients for ``seconds`` (at most ``max_requests``).

    ``api_keys`` rotate through ``X-API-Key``; ``keepalive=False`` opens a new connection per
    request (so a multi-process server spreads them over its workers); ``tally_header`` names
    a response header whose values split the counts (``Result.by_header``); ``progress``
    draws a live line on ``stream`` (stderr), by default only when it is a terminal. The run
    never outlasts ``seconds + timeout`` by more than a moment.
    """
    import httpx

    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be at least 1, got {max_requests}")
    if httpx.URL(url).scheme not in ("http", "https"):
        raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
    stream = stream if stream is not None else sys.stderr
    if progress is None:
        progress = stream.isatty()
    keys = [k for k in api_keys if k]
    result = Result(url, concurrency, seconds, keepalive=keepalive, tally_header=tally_header)
    recorder = _Recorder(result)
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0
    )

    async with httpx.AsyncClient(
        headers=dict(headers or {}), limits=limits, timeout=timeout
    ) as client:
        recorder.start = time.perf_counter()
        result.started_at = time.time()
        deadline = recorder.start + seconds

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                if max_requests is not None and result.sent >= max_requests:
                    return
                number = result.sent
                result.sent += 1
                extra = {"X-API-Key": keys[number % len(keys)]} if keys else None
                sent_at = time.perf_counter()
                tag = None
                try:
                    response = await client.get(url, headers=extra)
                    status: int | str = response.status_code
                    if tally_header is not None:
                        tag = response.headers.get(tally_header)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                recorder.record(status, sent_at, time.perf_counter(), tag)
                if isinstance(status, str):
                    await asyncio.sleep(0.01)  # do not spin on a refused connection

        async def draw() -> None:
            while True:
                elapsed = time.perf_counter() - recorder.start
                stream.write("\r" + _progress_line(result, elapsed) + "\x1b[K")
                stream.flush()
                await asyncio.sleep(0.2)

        drawer = asyncio.ensure_future(draw()) if progress else None
        clients = [asyncio.ensure_future(one_client()) for _ in range(concurrency)]
        try:
            # Every request is bounded by `timeout`; this is the belt to those braces.
            done, pending = await asyncio.wait(clients, timeout=seconds + timeout + 5)
            if pending:
                lost = result.sent - result.allowed - result.refused - result.errors
                result.errors += lost
                result.status_counts["Cancelled"] += lost
            for task in done:
                task.result()  # a client's unexpected exception is the caller's
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            if drawer is not None:
                drawer.cancel()
                elapsed = time.perf_counter() - recorder.start
                stream.write("\r" + _progress_line(result, elapsed) + "\x1b[K\n")
                stream.flush()
    return recorder.finish()


def run_load(url: str, **options: Any) -> Result:
    """``run_load_async`` for sync callers (it runs its own event loop)."""
    return asyncio.run(run_load_async(url, **options))


# -- reports -------------------------------------------------------------------------------------
def format_summary(result: Result, *, tally: bool = True) -> str:
    """The summary table printed after a run (``tally``: with the per-header-value rows)."""
    lat = result.latency()
    total = result.sent or 1
    lines = [
        f"target       {result.url}",
        f"load         {result.concurrency} concurrent clients for {result.elapsed:.2f} s "
        f"({result.throughput:,.0f} req/s)",
        "",
        f"{'outcome':<12} {'requests':>9} {'share':>7}",
        f"{'sent':<12} {result.sent:>9} {'100.0%':>7}",
    ]
    for name, value in (
        ("allowed 2xx", result.allowed),
        ("refused 429", result.refused),
        ("errors", result.errors),
    ):
        lines.append(f"{name:<12} {value:>9} {value / total:>7.1%}")
    other = {k: v for k, v in result.status_counts.items() if outcome_of(_int(k)) == "errors"}
    if other:
        lines.append("             " + ", ".join(f"{k}: {v}" for k, v in sorted(other.items())))
    lines += [
        "",
        "latency ms   " + "  ".join(f"{k} {v:.1f}" for k, v in lat.items() if k != "mean"),
    ]
    if tally and result.tally_header and result.by_header:
        lines += ["", f"{result.tally_header:<12} {'allowed':>9} {'refused':>9} {'errors':>9}"]
        for tag, row in result.by_header.items():
            lines.append(f"{tag:<12} {row['allowed']:>9} {row['refused']:>9} {row['errors']:>9}")
    return "\n".join(lines)


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def write_json(result: Result, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """``result.to_dict()`` (plus ``extra`` keys) as JSON."""
    data = {**result.to_dict(), **(extra or {})}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _nice_ceiling(value: float) -> float:
    """A round axis maximum at or above ``value``: 1, 2, 2.5, 5 or 10 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)  # pragma: no cover


def _panel(
    series: Sequence[Mapping[str, int]],
    outcome: str,
    colour: str,
    title: str,
    y: int,
    reference: tuple[float, str] | None,
) -> list[str]:
    """One bar chart (``outcome`` per second) in an SVG group at height offset ``y``."""
    left, width, height = 60, 700, 150
    values = [row[outcome] for row in series]
    top = _nice_ceiling(max([*values, reference[0] if reference else 0, 1]))
    slot = width / max(1, len(values))
    out = [f'<g transform="translate(0,{y})">']
    out.append(f'<text x="{left}" y="14" class="title">{html.escape(title)}</text>')
    base = 24 + height
    for i in range(5):  # gridlines and y labels
        value = top * i / 4
        gy = base - height * i / 4
        out.append(f'<line x1="{left}" x2="{left + width}" y1="{gy:.1f}" y2="{gy:.1f}" '
                   'class="grid"/>')  # fmt: skip
        label = f"{value:g}"
        out.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" class="axis" '
                   f'text-anchor="end">{label}</text>')  # fmt: skip
    for i, value in enumerate(values):
        bar = height * value / top
        x = left + i * slot + slot * 0.1
        out.append(
            f'<rect x="{x:.1f}" y="{base - bar:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{bar:.1f}" fill="{colour}">'
            f"<title>second {i}: {value} {outcome}</title></rect>"
        )
        if len(values) <= 30 or i % math.ceil(len(values) / 30) == 0:
            out.append(f'<text x="{x + slot * 0.4:.1f}" y="{base + 14}" class="axis" '
                       f'text-anchor="middle">{i}</text>')  # fmt: skip
    if reference is not None:
        ry = base - height * reference[0] / top
        out.append(f'<line x1="{left}" x2="{left + width}" y1="{ry:.1f}" y2="{ry:.1f}" '
                   'class="reference"/>')  # fmt: skip
        out.append(f'<text x="{left + width}" y="{ry - 4:.1f}" class="axis" '
                   f'text-anchor="end">{html.escape(reference[1])}</text>')  # fmt: skip
    out.append("</g>")
    return out


def render_chart(
    result: Result,
    *,
    title: str = "Load test",
    reference_rate: float | None = None,
    notes: Iterable[str] = (),
) -> str:
    """A self-contained HTML page: allowed and refused requests per second as SVG bar charts
    (``reference_rate`` draws the policy's rate over the allowed bars), then the summary."""
    series = result.series or [{"second": 0, "allowed": 0, "refused": 0, "errors": 0}]
    reference = (reference_rate, f"rate {reference_rate:g}/s") if reference_rate else None
    panels = [
        ("allowed", "#2e7d32", "Allowed (2xx) per second", reference),
        ("refused", "#ef6c00", "Refused (429) per second", None),
    ]
    if result.errors:
        panels.append(("errors", "#c62828", "Errors per second", None))
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="780" height="{len(panels) * 200 + 20}" '
        f'viewBox="0 0 780 {len(panels) * 200 + 20}" role="img">',
        "<style>.title{font:bold 13px sans-serif}.axis{font:11px sans-serif;fill:#555}"
        ".grid{stroke:#ddd;stroke-width:1}.reference{stroke:#1565c0;stroke-width:2;"
        "stroke-dasharray:6 4}</style>",
    ]
    for i, (outcome, colour, label, ref) in enumerate(panels):
        svg += _panel(series, outcome, colour, label, 10 + i * 200, ref)
    svg.append(f'<text x="410" y="{len(panels) * 200 + 14}" class="axis" '
               'text-anchor="middle">seconds since the first request</text>')  # fmt: skip
    svg.append("</svg>")
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;color:#222}"
        "pre{background:#f6f6f6;padding:1em;display:inline-block}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{notes_html}\n"
        + "\n".join(svg)
        + f"\n<pre>{html.escape(format_summary(result))}</pre>\n</body></html>\n"
    )


def write_chart(result: Result, path: str | Path, **options: Any) -> None:
    """``render_chart(result, **options)`` to ``path``."""
    Path(path).write_text(render_chart(result, **options), encoding="utf-8")


# -- command line --------------------------------------------------------------------------------
def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="full URL of the endpoint to GET")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="sent as X-API-Key; repeat or comma-separate to rotate keys",
    )
    parser.add_argument(
        "--header", action="append", default=[], type=_header, help="extra 'Name: value' header"
    )
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, s")
    parser.add_argument(
        "--no-keepalive", action="store_true", help="a new connection for every request"
    )
    parser.add_argument("--tally-header", default=None, help="split counts by this header")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON ('-': stdout)")
    parser.add_argument("--chart", metavar="PATH", help="write an HTML page with the chart")
    parser.add_argument("--rate", type=float, default=None, help="draw this rate on the chart")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or not args.seconds > 0 or (args.max_requests or 1) < 1:
        parser.error("--concurrency and --max-requests must be >= 1, --seconds > 0")
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must be an http:// or https:// URL, not {args.url!r}")

    keys = [k.strip() for item in args.api_key for k in item.split(",") if k.strip()]
    result = run_load(
        args.url,
        api_keys=keys,
        concurrency=args.concurrency,
        seconds=args.seconds,
        max_requests=args.max_requests,
        timeout=args.timeout,
        headers=dict(args.header),
        keepalive=not args.no_keepalive,
        tally_header=args.tally_header,
    )
    table_stream = sys.stderr if args.json == "-" else sys.stdout
    print(format_summary(result), file=table_stream)
    if args.json == "-":
        print(json.dumps(result.to_dict(), indent=2))
    elif args.json:
        write_json(result, args.json)
        print(f"json         {args.json}", file=table_stream)
    if args.chart:
        write_chart(result, args.chart, title=f"Load test: {args.url}", reference_rate=args.rate)
        print(f"chart        {args.chart}", file=table_stream)
    if result.sent and result.errors == result.sent:
        print("every request failed: is the server up?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
