"""The machine and versions, and the Markdown report rendered from the run's JSON."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis
from _adapters import version_of

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "tokenlimit"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return head + (" + uncommitted changes in tokenlimit/" if dirty else "")


def environment(client: redis.Redis) -> dict[str, Any]:
    import redis.asyncio.connection
    import redis.connection
    import redis.utils

    server = client.info("server")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "redis_py": version_of("redis"),
        "hiredis": version_of("hiredis"),
        "hiredis_in_use": bool(redis.utils.HIREDIS_AVAILABLE),
        "parser_sync": redis.connection.DefaultParser.__name__,
        "parser_async": redis.asyncio.connection.DefaultParser.__name__,
        "server": f"Valkey {server.get('valkey_version') or server.get('redis_version')}",
        "tokenlimit": f"{version_of('tokenlimit')} (git {_git()})",
        "fastapi": version_of("fastapi"),
        "uvicorn": version_of("uvicorn"),
        "httpx": version_of("httpx"),
    }


# -- rendering ------------------------------------------------------------------------------------
def _n(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}"


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "unknown"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cell(case: dict[str, Any] | None) -> str:
    if case is None:
        return "-"
    if case["status"] != "ok":
        return case["status"]
    rates = [s["rate"] for s in case["samples"]]
    if not rates:
        return "no samples"
    return f"{_n(case['median'])} ({_n(min(rates))}-{_n(max(rates))})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def find(cases: list[dict[str, Any]], library: str, workload: str, mode: str) -> dict[str, Any]:
    for case in cases:
        if (case["library"], case["workload"], case["mode"]) == (library, workload, mode):
            return case
    return {"status": "-", "samples": [], "median": None, "check": ""}


def render(data: dict[str, Any]) -> str:
    env, cases, settings = data["environment"], data["cases"], data["settings"]
    out = [
        "# tokenlimit benchmark",
        "",
        f"Run {env['date']}: {settings['rounds']} interleaved rounds x {settings['seconds']} s per "
        f"case, async with {settings['tasks']} tasks, {settings['keys']:,} distinct keys"
        + (" (--smoke: numbers are not meaningful)" if settings["smoke"] else "")
        + f"; whole run {data['run_seconds']:.0f} s.",
        "",
        "## Machine and versions",
        "",
        f"- CPU: {env['cpu']}, {env['cores']} cores; kernel {env['kernel']}; {env['os']}",
        f"- Python {env['python']}; redis-py {env['redis_py']}; hiredis {env['hiredis']} "
        f"(in use: {'yes' if env['hiredis_in_use'] else 'no'}; parsers "
        f"{env['parser_sync']} / {env['parser_async']})",
        f'- Server: {env["server"]} (127.0.0.1, save "", appendonly no), started by the run',
        f"- tokenlimit {env['tokenlimit']}; fastapi {env['fastapi']}, uvicorn {env['uvicorn']}, "
        f"httpx {env['httpx']}",
        f"- Load average (1/5/15 min) at start {_load(env.get('load_average_start'))}, at end "
        f"{_load(env.get('load_average_end'))}: other work on the machine widens the min-max",
        "",
        *_table(
            ["library", "version", "algorithm", "async API", "async conns"],
            [
                [
                    p["name"],
                    p["version"],
                    p["algorithm"],
                    p["async_note"],
                    str(p["async_connections"]) if p["status"] == "ok" else p["status"],
                ]
                for p in data["libraries"]
            ],
        ),
        "",
        "async conns: connections to the server each library's async client opened under "
        "64 tasks. limits runs on redis.asyncio rather than its default coredis bridge (about "
        "1.5x faster here); pyrate-limiter's `try_acquire_async` would serialize the tasks on "
        "an `asyncio.Lock`, `await try_acquire(...)` on its async bucket does not.",
        "",
        "## Decisions per second (median, min-max over rounds)",
        "",
        "One client process; sync = one thread calling back to back; async64 = 64 asyncio tasks "
        "in one event loop. Floors are redis-py itself: `PING`, and `EVALSHA` of `return 1` with "
        "one key.",
        "",
    ]
    rows = []
    for label, cmd in (("floor: PING", "ping"), ("floor: EVALSHA return 1", "evalsha")):
        rows.append(
            [
                label,
                "-",
                _cell(find(cases, cmd, "floor", "sync")),
                _cell(find(cases, cmd, "floor", "async64")),
                "",
            ]
        )
    rows.append(
        [
            "ceiling: pipeline of 100 EVALSHA",
            "-",
            _cell(find(cases, "evalsha", "floor", "pipeline100")),
            "",
            "per call, informational",
        ]
    )
    for lib in data["libraries"]:
        for workload in data["workloads"]:
            sync = find(cases, lib["name"], workload["name"], "sync")
            asy = find(cases, lib["name"], workload["name"], "async64")
            checks = "; ".join(c for c in (sync.get("check"), asy.get("check")) if c)
            rows.append([lib["name"], workload["title"], _cell(sync), _cell(asy), checks or "-"])
    out += _table(["library", "workload", "sync", "async64", "check (allowed / calls)"], rows)

    out += ["", "## Ratios", "", *_table(["workload", "mode", "tokenlimit / EVALSHA floor",
                                          "tokenlimit / best peer", "best peer"],
                                         [[r["workload"], r["mode"], _x(r["vs_floor"]),
                                           _x(r["vs_best_peer"]), r["best_peer"] or "-"]
                                          for r in data["ratios"]])]  # fmt: skip
    if data.get("baseline"):
        out += _before_after(data["baseline"], settings)

    memory = data.get("memory") or {}
    if memory:
        out += [
            "",
            f"## Redis memory per key ({settings['keys']:,} distinct keys, 1000/day each)",
            "",
            "`used_memory` after minus before a FLUSHALLed server, per key (DBSIZE) and per "
            "decision (one distinct key each); MEMORY USAGE and PTTL over a sample of up to 1000 "
            "keys.",
            "",
        ]
        rows = []
        for name, m in memory.items():
            if "used_memory_after" not in m and "error" not in m:
                continue  # the floor: server cost only
            if "error" in m:
                rows.append([name, m["error"], *["-"] * 8])
                continue
            pttl = m["pttl_ms"]
            ttl = (
                "-"
                if pttl["min"] is None
                else f"{pttl['min'] / 1000:.1f} / {pttl['median'] / 1000:.1f} / "
                f"{pttl['max'] / 1000:.1f}"
            )
            rows.append(
                [
                    name,
                    f"{m['keys_per_decision']:.2f}",
                    f"{m['bytes_per_key']:.0f}" if m["bytes_per_key"] is not None else "-",
                    f"{m['bytes_per_decision']:.0f}",
                    _n(m["memory_usage_median"]),
                    ttl,
                    f"{m['no_ttl']} of {m['sampled']}",
                    f"`{m['example_key']}` ({m['example_type']})",
                    f"{m['fill_seconds']:.1f} s {m['mode']}",
                ]
            )
        out += _table(
            [
                "library", "keys/decision", "B/key", "B/decision", "MEMORY USAGE",
                "PTTL s min/med/max", "no TTL", "example key", "fill",
            ],
            rows,
        )  # fmt: skip
        out += [
            "",
            "Server cost per decision during that fill (INFO commandstats, reset just before): "
            "how heavy each library's script is for the server.",
            "",
        ]
        out += _table(
            ["library", "server µs/decision", "calls/decision", "commands (also inside scripts)"],
            [
                [name, *_server_cells(m.get("server"))]
                for name, m in memory.items()
                if m.get("server")
            ],
        )

    http = data.get("fastapi")
    if http:
        out += ["", "## FastAPI overhead", ""]
        if "error" in http:
            out.append(f"Not measured: {http['error']}")
        else:
            out += [
                f"One uvicorn worker; `tools/load_test.py` in its own process, "
                f"{http['concurrency']} clients, {http['rounds']} interleaved rounds x "
                f"{http['seconds']} s per route. Server CPU is the uvicorn process's own "
                "(utime+stime from /proc): below ~90% of a core, the load generator is the "
                "bottleneck and the requests/s ratio understates the limiter's cost; CPU per "
                "request does not.",
                "",
            ]
            if http.get("imported"):
                out += [
                    "`base/` routes: the same app on a second uvicorn worker that imports "
                    f"`{http['imported']['baseline']}` (the baseline), its limiter on database 1 "
                    "of the same server; its routes run in the same interleaved rounds.",
                    "",
                ]
            rows = []
            for route, samples in http["samples"].items():
                rps = [s["rps"] for s in samples]
                cpu = [s["server_cpu"] for s in samples if s["server_cpu"] is not None]
                per = [s["cpu_us_per_request"] for s in samples if s["cpu_us_per_request"]]
                rows.append(
                    [
                        f"`/{route}`",
                        f"{_n(http['median_rps'][route])} ({_n(min(rps))}-{_n(max(rps))})",
                        f"{100 * _median(cpu):.0f}%" if cpu else "-",
                        _n(_median(per)) if per else "-",
                        f"{_median([s['p50_ms'] for s in samples]):.1f}",
                    ]
                )
            out += _table(
                ["route", "requests/s", "server CPU", "server CPU µs/request", "p50 ms"], rows
            )
            out += [
                "",
                f"- `RateLimit` dependency, limited / plain: requests/s "
                f"{_x(http['paired_ratio_median'])} (median of paired rounds; ratio of medians "
                f"{_x(http['ratio_of_medians'])}); server CPU per request, plain / limited, "
                f"{_x(http.get('cpu_ratio'))} (the requests/s ratio a CPU-bound server would see)",
                f"- `RateLimitMiddleware` (mounted sub-app), for comparison: requests/s "
                f"{_x(http.get('middleware_paired_ratio_median'))}, server CPU "
                f"{_x(http.get('middleware_cpu_ratio'))}",
                f"- `/leased`, the dependency on one global key with `lease=1000` (issue 18): "
                f"requests/s {_x(http.get('leased_paired_ratio_median'))}, server CPU "
                f"{_x(http.get('leased_cpu_ratio'))}",
                "- framework floor, `/headers`: a no-op dependency taking `Request` and `Response` "
                "that sends the same five rate-limit fields and decides nothing: requests/s "
                f"{_x(http.get('headers_paired_ratio_median'))}, server CPU "
                f"{_x(http.get('headers_cpu_ratio'))}: the most a dependency that sends these "
                "headers keeps of the plain route here, whatever it does to decide; `/leased` "
                f"against it: requests/s {_x(http.get('leased_to_headers_paired_ratio_median'))}, "
                f"server CPU {_x(http.get('leased_to_headers_cpu_ratio'))}",
                "- floor, a dependency making one redis-py `EVALSHA` of `return 1` and nothing "
                f"else: requests/s {_x(http.get('floor_paired_ratio_median'))}, server CPU "
                f"{_x(http.get('floor_cpu_ratio'))}: the most a dependency with one round trip "
                "per request keeps of the plain route here",
                *[f"- check: {c}" for c in http["checks"]],
            ]

    out += _lease_section(data)
    out += ["", "## Targets (issues 5 and 18)", ""]
    out += _table(
        ["target", "measured", "result"],
        [[t["target"], t["measured"], t["result"]] for t in data["targets"]],
    )
    if data.get("notes"):
        out += ["", "## Notes", "", *[f"- {n}" for n in data["notes"]]]
    return "\n".join(out) + "\n"


def _lease_section(data: dict[str, Any]) -> list[str]:
    """Leased tokens (issue 18): rates against the floor and unleased, server cost, the fleet."""
    lease = data.get("lease") or {}
    if not lease.get("ratios"):
        return []
    out = [
        "",
        "## Leased tokens (issue 18)",
        "",
        "`tokenlimit+lease`: the same limits with `lease=1000` (at most the burst): one script "
        "call takes up to that many tokens from the bucket, the process hands them out, and "
        "gives back what it has not used 100 ms later (or with its next refill).",
        "",
    ]
    out += _table(
        ["workload", "mode", "leased decisions/s", "/ EVALSHA floor", "/ unleased tokenlimit"],
        [
            [r["workload"], r["mode"], _n(r["leased"]), _x(r["vs_floor"]), _x(r["vs_unleased"])]
            for r in lease["ratios"]
        ],
    )
    cost = lease.get("server_cost") or {}
    if cost:
        out += [
            "",
            "Server cost on the hot key, all allowed (`INFO commandstats` of EVALSHA and EVAL "
            "around each sample, give-backs included):",
            "",
        ]
        rows = []
        for name, c in cost.items():
            admitted = c.get("admitted") or 0
            rows.append(
                [
                    name,
                    f"{c['usec'] / admitted:.3f}" if admitted else "-",
                    f"{c['calls'] / admitted:.4f}" if admitted else "-",
                    _n(admitted),
                ]
            )
        out += _table(["case", "server µs / admitted", "script calls / admitted", "admitted"], rows)
    fleet = lease.get("fleet") or {}
    if fleet:
        out += ["", "Fleet simulation (`_fleet.py`):", ""]
        if "error" in fleet:
            out.append(f"- not measured: {fleet['error']}")
        else:
            limit = fleet["limit"]
            out += [
                f"- {fleet['processes']} processes, one key, `Limit({limit['rate']:g}, "
                f"{limit['burst']}, lease={limit['lease']})`, {fleet['seconds']:g} s: "
                f"{fleet['admitted']:,} admitted of an allowance of {fleet['allowance']:,.0f} "
                f"(burst + rate x {fleet['window']:.2f} s): {fleet['admitted_share']:.4f}x, "
                f"{'ABOVE the allowance' if fleet['over'] else 'never above'}",
                f"- {fleet['decisions']:,} decisions, {fleet['script_calls']:,} script calls on "
                f"the server; {fleet['granted_extra']:,} tokens leased beyond the callers' own, "
                f"{fleet['returned']:,} given back unused",
            ]
    dead = lease.get("killed") or {}
    if dead:
        out.append(
            f"- SIGKILL: a process deciding back to back (`lease={dead['lease']}`, no refill) "
            f"killed after {dead['admitted']:,} admissions lost {dead['lost']} tokens "
            "(at most one lease, plus one for an admission not yet counted at the kill)"
        )
    return out


def _before_after(base: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The current tree against the baseline, measured in the same rounds."""
    out = [
        "",
        f"## Before and after ({base['rev']} -> current)",
        "",
        f"- current: tokenlimit {base['current']}, as `{base['current_name']}`: imported from "
        f"`{base['current_file']}` in a child process (the tables above time "
        f"`{base['parent_file']}` in the run's own process, next to the peers)",
        f"- baseline: `{base['rev']}` ({base['subject']}), as `{base['name']}`: "
        f"`git archive {base['rev']} tokenlimit`, imported from `{base['file']}` in a child "
        "process of the same kind",
        "",
        "Both children time the same deciders with the same loops, on keys of their own; each "
        f"workload's two cases ran back to back in each of the {settings['rounds']} interleaved "
        "rounds, each side first in every other round. The run's own process, which holds every "
        "library's adapters and keys, is not a process like theirs, so this table compares the "
        "two children only.",
        "",
        "vs floor: median decisions/s over the EVALSHA floor's in the same mode (the floor is "
        "timed in the run's own process). current / baseline: the two children paired round by "
        "round (median, min-max); below 1.00x the current tree made fewer decisions per second "
        "than the baseline.",
        "",
    ]
    rows = []
    for r in base["ratios"]:
        spread = (
            f" ({r['paired_min']:.2f}-{r['paired_max']:.2f})" if r["paired_min"] is not None else ""
        )
        rows.append(
            [
                r["workload"],
                r["mode"],
                _x(r["current_vs_floor"]),
                _x(r["baseline_vs_floor"]),
                _x(r["current_vs_baseline"]) + spread,
            ]
        )
    out += _table(
        ["workload", "mode", "current / EVALSHA floor", f"{base['rev']} / EVALSHA floor",
         "current / baseline"],
        rows,
    )  # fmt: skip
    http = base.get("fastapi")
    if http:
        now, then = http["current"], http["baseline"]

        def change(key: str) -> str:
            return _x(now[key] / then[key]) if now[key] and then[key] else "-"

        out += ["", "FastAPI, each server against its own `/plain` (limited / plain):", ""]
        out += _table(
            ["route", "measure", "current", base["rev"], "current / baseline"],
            [
                ["`RateLimit` dependency", "requests/s (paired rounds)",
                 _x(now["rps"]), _x(then["rps"]), change("rps")],
                ["`RateLimit` dependency", "server CPU per request (plain / limited)",
                 _x(now["cpu"]), _x(then["cpu"]), change("cpu")],
                ["`RateLimitMiddleware`", "requests/s (paired rounds)",
                 _x(now["mw_rps"]), _x(then["mw_rps"]), change("mw_rps")],
                ["`RateLimitMiddleware`", "server CPU per request (plain / limited)",
                 _x(now["mw_cpu"]), _x(then["mw_cpu"]), change("mw_cpu")],
            ],
        )  # fmt: skip
    return out


def _server_cells(server: dict[str, Any] | None) -> list[str]:
    if not server or server["usec_per_decision"] is None:
        return ["-", "-", "-"]
    mix = ", ".join(f"{name} {calls:,}" for name, calls in sorted(server["commands"].items()))
    return [
        f"{server['usec_per_decision']:.1f}",
        f"{server['calls_per_decision']:.2f}",
        mix,
    ]


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)
