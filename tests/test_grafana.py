"""packaging/grafana/llm-api.json against the metrics llmd really exports.

Every metric name in every panel query (and variable query) must be a sample that
``llmd.metrics.Metrics().render()`` emits once each labelled family has a sample, so a
metric renamed in llmd/metrics.py without the dashboard fails here instead of leaving an
empty panel. Label matchers and ``by (...)`` labels are checked against the labels those
samples carry, and the JSON is checked for the shape Grafana's import needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmd.metrics import Metrics
from llmd.replica import Replica, ReplicaState

DASHBOARD = Path(__file__).resolve().parent.parent / "packaging" / "grafana" / "llm-api.json"
DS_UID = "${datasource}"

METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])llmd_[A-Za-z0-9_:]*")
SELECTOR_RE = re.compile(r"(?<![A-Za-z0-9_:])(llmd_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE_RE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__range_ms", "__interval_ms"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --- what llmd exports --------------------------------------------------------------------------


def exercised_metrics() -> Metrics:
    """A Metrics with at least one sample in every family, as a running llmd would have."""
    m = Metrics()
    m.set_names(["gemma"], ["alice"])
    m.observe_request("chat", "gemma", "alice", 200, 0.5, 0.001)
    m.observe_request("chat", "gemma", "alice", 429, 0.01, 0.0005)
    m.observe_tokens("gemma", "alice", 10, 20)
    m.observe_ttft("gemma", 0.2)
    m.observe_rate_limited("alice", "requests_per_minute")
    m.in_flight.labels("gemma").set(1)
    m.observe_queue("gemma", 2, 0.05)
    for result in ("hit", "fallback", "miss"):
        m.observe_affinity("gemma", result)
    m.observe_retry("gemma")
    m.observe_cache("gemma", hit=True)
    m.observe_cache("gemma", hit=False)
    m.observe_cache_eviction("bytes")
    m.observe_cache_size(1000, 2)
    m.observe_model_event("gemma", "start", "request")
    m.observe_model_state("gemma", "ready")
    m.observe_budget("ram", 6 << 30)
    m.observe_held("ram", 1 << 30)
    m.observe_limit_store_error("admit")
    m.store_healthy.labels("usage").set(1)
    replica = Replica(
        model="gemma",
        name="gemma/0",
        backend="vllm",
        state=ReplicaState.READY,
        restarts=1,
        backend_metrics={"running": 1.0, "waiting": 0.0, "kv_cache_usage": 0.5},
    )
    m.observe_replica(replica)
    m.usage_pending.set(3)
    m.observe_dropped(1)
    m.reloads.labels("ok").inc()
    m.reloads.labels("error").inc()
    return m


class Exported:
    """Sample names, their families' types, and the labels each sample name carries."""

    def __init__(self, exposition: str) -> None:
        self.family_type: dict[str, str] = {}
        self.sample_family: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        self.empty_families: list[str] = []
        families = list(text_string_to_metric_families(exposition))
        names = {f.name for f in families}
        for family in families:
            # prometheus_client's text format writes each counter's and histogram's _created
            # series as a gauge family of its own: an implementation detail (and off under
            # PROMETHEUS_DISABLE_CREATED_SERIES) that a dashboard must not depend on.
            if family.name.endswith("_created") and family.name.removesuffix("_created") in names:
                continue
            self.family_type[family.name] = family.type
            if not family.samples:
                self.empty_families.append(family.name)
            for sample in family.samples:
                self.sample_family[sample.name] = family.name
                self.labels.setdefault(sample.name, set()).update(sample.labels)

    def family_of(self, name: str) -> str | None:
        """The family a referenced name belongs to, or None if llmd exports no such sample."""
        if name in self.sample_family:
            return self.sample_family[name]
        return None

    def is_histogram_base(self, name: str) -> bool:
        return self.family_type.get(name) == "histogram"


@pytest.fixture(scope="module")
def exported() -> Exported:
    return Exported(exercised_metrics().render().decode())


# --- what the dashboard uses --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        return json.load(f)


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dash["panels"]) if p.get("type") != "row"]


def variable_query(var: dict[str, Any]) -> str:
    q = var.get("query", "")
    return q.get("query", "") if isinstance(q, dict) else str(q)


def exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    out = [
        (f"panel {p['id']} {p.get('title', '')!r} target {t.get('refId')}", t["expr"])
        for p in query_panels(dash)
        for t in p.get("targets", [])
    ]
    out += [
        (f"variable {v['name']}", variable_query(v))
        for v in dash.get("templating", {}).get("list", [])
        if v.get("type") == "query"
    ]
    return out


def strip_strings(expr: str) -> str:
    """The expr without quoted label values, so a value like "llmd_x" is not taken for a metric."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


# --- the tests ----------------------------------------------------------------------------------


def test_every_family_has_a_sample(exported: Exported) -> None:
    # Otherwise a family the dashboard uses could be missing here only because this test
    # forgot to exercise it: extend exercised_metrics() when metrics.py grows a family.
    assert not exported.empty_families, f"exercised_metrics() leaves these empty: {exported.empty_families}"


def test_dashboard_metrics_are_exported(dashboard: dict[str, Any], exported: Exported) -> None:
    missing: list[str] = []
    used = 0
    for where, expr in exprs(dashboard):
        for name in METRIC_RE.findall(strip_strings(expr)):
            used += 1
            if exported.family_of(name) is not None:
                continue
            hint = ""
            if exported.is_histogram_base(name):
                hint = " (a histogram: use _bucket, _sum or _count)"
            elif name + "_total" in exported.sample_family:
                hint = f" (a counter: did you mean {name}_total?)"
            missing.append(f"{where}: {name}{hint}")
    assert used, "no llmd_ metric found in any expr"
    assert not missing, "dashboard uses metrics llmd does not export:\n" + "\n".join(missing)


def test_histogram_suffixes_only_on_histograms(dashboard: dict[str, Any], exported: Exported) -> None:
    for where, expr in exprs(dashboard):
        for name in METRIC_RE.findall(strip_strings(expr)):
            for suffix in HISTOGRAM_SUFFIXES:
                base = name.removesuffix(suffix)
                if base != name and exported.family_of(name) is not None:
                    assert exported.is_histogram_base(base), f"{where}: {name} but {base} is not a histogram"
            if "histogram_quantile" in expr and name.endswith("_bucket"):
                # histogram_quantile needs the buckets' le label to survive every aggregation
                # between it and the _bucket series: `sum by (model, le)`, never `sum by (model)`.
                assert "le" in exported.labels[name], f"{where}: {name} has no le label"
                for group in GROUPING_RE.findall(strip_strings(expr)):
                    kept = {label.strip() for label in group.split(",")}
                    assert "le" in kept, f"{where}: aggregates {name} by ({group}), dropping le"


def test_label_matchers_exist(dashboard: dict[str, Any], exported: Exported) -> None:
    bad: list[str] = []
    for where, expr in exprs(dashboard):
        bare = strip_strings(expr)
        names = METRIC_RE.findall(bare)
        for name, matchers in SELECTOR_RE.findall(bare):
            if name not in exported.labels:
                continue  # reported by test_dashboard_metrics_are_exported
            have = exported.labels[name]
            for label in MATCHER_RE.findall(matchers):
                if label not in have:
                    bad.append(f"{where}: {name} has no label {label!r} (has {sorted(have)})")
        # by (...) labels must come from some metric in the same expression.
        if any(n not in exported.labels for n in names):
            continue  # reported by test_dashboard_metrics_are_exported
        have_any = set().union(*(exported.labels[n] for n in names)) if names else set()
        for group in GROUPING_RE.findall(bare):
            for label in filter(None, (s.strip() for s in group.split(","))):
                if label not in have_any:
                    bad.append(f"{where}: groups by {label!r}, which none of {sorted(set(names))} has")
        # label_values(metric, label)
        for metric, label in re.findall(r"label_values\(\s*(llmd_[A-Za-z0-9_:]*)\s*,\s*(\w+)\s*\)", bare):
            if label not in exported.labels.get(metric, set()):
                bad.append(f"{where}: label_values on {metric} label {label!r}, which it lacks")
    assert not bad, "\n".join(bad)


def test_dashboard_covers_every_family(dashboard: dict[str, Any], exported: Exported) -> None:
    used = {exported.family_of(name) for _, expr in exprs(dashboard) for name in METRIC_RE.findall(strip_strings(expr))}
    unused = sorted(f for f in exported.family_type if f not in used)
    assert not unused, f"llmd exports families no panel shows: {unused}"


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    d = dashboard
    assert isinstance(d.get("title"), str) and d["title"]
    assert isinstance(d.get("uid"), str) and 0 < len(d["uid"]) <= 40
    assert isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36
    assert d.get("id") is None, "an exported dashboard must not pin a database id"

    panels = list(all_panels(d["panels"]))
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"

    qp = query_panels(d)
    assert len(qp) >= 15
    for p in panels:
        gp = p["gridPos"]
        assert gp["x"] >= 0 and gp["w"] > 0 and gp["h"] > 0 and gp["x"] + gp["w"] <= 24, (p["title"], gp)
    for p in qp:
        assert p.get("title"), p["id"]
        assert p.get("type") in {"timeseries", "stat", "table", "bargauge", "gauge", "state-timeline"}, p["type"]
        targets = p.get("targets")
        assert targets, f"panel {p['title']!r} has no targets"
        ref_ids = [t.get("refId") for t in targets]
        assert len(ref_ids) == len(set(ref_ids)) and all(ref_ids), (p["title"], ref_ids)
        assert p.get("datasource") == {"type": "prometheus", "uid": DS_UID}, p["title"]
        for t in targets:
            assert t.get("expr", "").strip(), (p["title"], t)
            assert t.get("datasource", p["datasource"])["uid"] == DS_UID, (p["title"], t)


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("model", "key"):
        v = variables.get(name)
        assert v and v["type"] == "query", name
        assert v["datasource"]["uid"] == DS_UID, name
        assert variable_query(v).startswith("label_values("), name
        assert re.fullmatch(rf"label_values\(\s*llmd_\w+\s*,\s*{name}\s*\)", variable_query(v)), variable_query(v)
    # Every $var an expr uses is defined (or one of Grafana's own).
    defined = set(variables) | GRAFANA_BUILTINS
    for where, expr in exprs(dashboard):
        for var in VARIABLE_RE.findall(expr):
            assert var in defined, f"{where}: ${var} is not a dashboard variable"


def test_top_keys_panel_says_it_is_approximate(dashboard: dict[str, Any]) -> None:
    top = [
        p
        for p in query_panels(dashboard)
        if any("topk" in t["expr"] and "llmd_tokens_total" in t["expr"] for t in p["targets"])
    ]
    assert top, "no top-keys panel"
    for p in top:
        assert "approximate" in (p["title"] + p.get("description", "")).lower()
        assert "llmd usage" in p.get("description", "")
