"""docs/ops: every series the Grafana dashboard and the alerting rules name exists in a real
exposition (PrometheusMetrics exercised against the suite's server: decisions, refusals,
storage failures, fail-open, local mode, shadow, concurrency, an HTTP route), with the labels
they select on; the dashboard takes its data source as a variable; each alert has a severity,
a runbook line and a section in docs/ops/README.md; and promtool, when on PATH, checks and
unit-tests the rules (the `ops` nox session runs it in CI)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Target

from servers import free_port
from tokenlimit import Limit, RateLimiter

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tokenlimit.metrics import PrometheusMetrics  # noqa: E402

OPS = Path(__file__).resolve().parent.parent / "docs" / "ops"
DASHBOARD = json.loads((OPS / "grafana-dashboard.json").read_text())
RULES = (OPS / "alerts.yml").read_text()
README = (OPS / "README.md").read_text()
# Labels Prometheus adds at scrape time, and the histogram's bucket bound.
TARGET_LABELS = {"job", "instance", "le"}
_NAME = re.compile(r"\btokenlimit_[A-Za-z0-9_:]*")
_SELECTOR = re.compile(r"\b(tokenlimit_[A-Za-z0-9_:]*)\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


@dataclass
class Rule:
    """One alerting rule, as far as the checks need it."""

    alert: str
    expr: str = ""
    for_: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def read_rules(text: str) -> list[Rule]:
    """The rules of alerts.yml: a small reader for the layout that file keeps (one rule per
    ``- alert:``, scalars inline or as ``|`` blocks). promtool parses it fully in CI; this
    reader only has to find what the checks below look at, and a miss fails them."""
    rules: list[Rule] = []
    section = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if match := re.match(r"^\s*- alert: (\S+)\s*$", line):
            rules.append(Rule(match[1]))
            continue
        match = re.match(r"^(\s*)([a-z_]+): ?(.*)$", line)
        if not rules or match is None:
            continue
        indent, key, value = len(match[1]), match[2], match[3]
        if value in ("|", ">", "|-", ">-"):  # a block: the lines indented deeper
            block = []
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                block.append(lines[index].strip())
                index += 1
            value = " ".join(part for part in block if part)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        rule = rules[-1]
        if key in ("labels", "annotations"):
            section = key
        elif key == "expr":
            rule.expr = value
        elif key == "for":
            rule.for_ = value
        elif section == "labels":
            rule.labels[key] = value
        elif section == "annotations":
            rule.annotations[key] = value
    return rules


RULE_LIST = read_rules(RULES)


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    for variable in DASHBOARD["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


@dataclass
class Family:
    kind: str
    samples: set[str]  # the sample names a query may use: name_total, name_bucket, ...
    labels: set[str]


def families(page: str) -> dict[str, Family]:
    """Each tokenlimit family of an exposition, by every sample name it can serve, with the
    label names its samples carry (none yet for a family with no series)."""
    found: dict[str, Family] = {}
    for family in text_string_to_metric_families(page):
        if not family.name.startswith("tokenlimit_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names = {family.name + suffix for suffix in suffixes.get(family.type, [""])}
        labels = {label for sample in family.samples for label in sample.labels}
        entry = Family(family.type, names, labels)
        for name in names:
            found[name] = entry
    return found


@pytest.fixture
def exposition(standalone: Target) -> Iterator[str]:
    """A real exposition: one PrometheusMetrics, fed by limiters that decide on the suite's
    server, fail against a port nobody listens on (open and local modes), shadow, hold a
    concurrency slot, and serve an HTTP route."""
    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusMetrics(registry)
    limit = Limit(1, 2, name="ops")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    limiters = [
        RateLimiter.from_url(standalone.url, metrics=sink, timeout=5.0),
        RateLimiter.from_url(standalone.url, metrics=sink, timeout=5.0, shadow=True),
        RateLimiter.from_url(dead, metrics=sink, timeout=0.5, failure_mode="open"),
        RateLimiter.from_url(
            dead, metrics=sink, timeout=0.5, failure_mode="local", expected_processes=1
        ),
    ]
    shared, shadow, failing_open, local = limiters
    try:
        assert [shared.try_acquire("k", limit).allowed for _ in range(3)] == [True, True, False]
        assert [shadow.try_acquire("s", limit).shadowed for _ in range(3)] == [False] * 2 + [True]
        assert failing_open.try_acquire("k", limit).allowed
        assert local.try_acquire("k", limit).allowed
        with shared.concurrency("slot", 1):
            pass
        pytest.importorskip("fastapi")
        from fastapi import Depends, FastAPI
        from fastapi.testclient import TestClient

        from tokenlimit import AsyncRateLimiter
        from tokenlimit.integrations.fastapi import RateLimit, install_handlers

        app = FastAPI()
        install_handlers(app)
        limiter = AsyncRateLimiter.from_url("memory://", metrics=sink)

        @app.get("/items/{item_id}", dependencies=[Depends(RateLimit(limit, limiter=limiter))])
        async def item(item_id: int) -> dict[str, int]:
            return {"id": item_id}

        with TestClient(app) as client:
            assert [client.get("/items/1").status_code for _ in range(3)] == [200, 200, 429]
        yield prometheus_client.generate_latest(registry).decode()
    finally:
        for each in limiters:
            each.close()


def _check_references(exprs: list[str], page: str) -> None:
    known = families(page)
    all_labels = set().union(*(f.labels for f in known.values())) | TARGET_LABELS
    for expr in exprs:
        names = _NAME.findall(expr)
        assert names, f"names no tokenlimit series: {expr}"
        for name in names:
            assert name in known, f"{name} is not in the exposition (from {expr})"
        for name, matchers in _SELECTOR.findall(expr):
            family = known[name]
            for label in _MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                # A family with no series yet shows no labels: only a series can prove them.
                assert not family.samples or not family.labels or label in family.labels, (
                    f"{name} has no label {label!r} (from {expr})"
                )
        for grouping in _GROUPING.findall(expr):
            for label in (part.strip() for part in grouping.split(",")):
                assert not label or label in all_labels, f"no series has label {label!r}: {expr}"


def test_every_series_the_dashboard_names_exists(exposition: str) -> None:
    _check_references(dashboard_exprs(), exposition)


def test_every_series_the_rules_name_exists(exposition: str) -> None:
    _check_references([rule.expr for rule in RULE_LIST], exposition)


def test_the_exposition_has_what_the_checks_rely_on(exposition: str) -> None:
    """The fixture exercised every family the docs use, so label checks had series to read."""
    known = families(exposition)
    for name, labels in [
        ("tokenlimit_decisions_total", {"limit", "result"}),
        ("tokenlimit_storage_errors_total", {"reason"}),
        ("tokenlimit_fail_open_total", {"limit"}),
        ("tokenlimit_failure_mode_switches_total", {"to"}),
        ("tokenlimit_local_decisions_total", {"limit", "result"}),
        ("tokenlimit_http_requests_total", {"route", "result"}),
        ("tokenlimit_shadow_refusals_total", {"limit"}),
        ("tokenlimit_decision_seconds_bucket", {"le"}),
    ]:
        assert known[name].labels == labels, name
    assert 'route="/items/{item_id}"' in exposition


def test_the_reader_finds_every_rule() -> None:
    assert len(RULE_LIST) == RULES.count("- alert:") == 8
    for rule in RULE_LIST:
        assert rule.expr, rule.alert
        assert _NAME.search(rule.expr), rule.alert


def test_each_alert_has_severity_runbook_and_a_section() -> None:
    names = [rule.alert for rule in RULE_LIST]
    assert len(set(names)) == len(names)
    for rule in RULE_LIST:
        assert rule.labels.get("severity") in {"critical", "warning", "info"}, rule.alert
        assert rule.for_ is not None or rule.labels["severity"] == "info", rule.alert
        assert {"summary", "description", "runbook"} <= set(rule.annotations), rule.alert
        anchor = f"docs/ops/README.md#{rule.alert.lower()}"
        assert anchor in rule.annotations["runbook"], rule.alert
        assert re.search(rf"^### {rule.alert}$", README, re.MULTILINE), rule.alert
    expected = {
        "TokenlimitStorageErrors", "TokenlimitFailingOpen", "TokenlimitRefusalSpike",
        "TokenlimitCircuitOpen", "TokenlimitOverrideActive", "TokenlimitOverrideActiveLong",
        "TokenlimitLocalMode",
    }  # fmt: skip
    assert expected <= set(names)


def test_the_dashboard_takes_its_data_source_as_a_variable() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    uses = [DASHBOARD["templating"]["list"][1]["datasource"]]
    for panel in DASHBOARD["panels"]:
        uses.append(panel["datasource"])
        uses.extend(target["datasource"] for target in panel["targets"])
    assert all(use == {"type": "prometheus", "uid": "${datasource}"} for use in uses)
    assert "__inputs" not in DASHBOARD or DASHBOARD["__inputs"] == []  # no fixed source
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids)
    titles = " ".join(panel["title"].lower() for panel in DASHBOARD["panels"])
    for topic in ("decisions", "refusal ratio", "latency", "storage errors", "fail-open",
                  "circuit", "overrides", "local"):  # fmt: skip
        assert topic in titles, topic
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (nox -s ops)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(
            ["promtool", *command], cwd=OPS, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
