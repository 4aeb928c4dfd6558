"""deploy/grafana/kvray-dashboard.json only queries what kvray exports.

Every panel expression (and the dashboard's variable queries) is parsed for the metric names
it reads, and each must be a sample name ``kvray.metrics.render`` produces from representative
stats (so ``_bucket``/``_sum``/``_count``/``_total`` are as exported); the labels it groups by
or matches on must be labels of those metrics.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvray.metrics import render

from .test_metrics import representative

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvray-dashboard.json"

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
FUNCTIONS = AGGREGATIONS | {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "double_exponential_smoothing", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label",
    "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
    "mad_over_time", "label_values", "query_result",  # the last two: Grafana variable queries
}  # fmt: skip
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?")


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression reads, in order (functions, keywords, label names,
    label values, durations and Grafana variables left out).

    Raises ValueError on a call of something that is not a PromQL function.
    """
    s = STRINGS.sub('""', expr)
    s = re.sub(r"\blabel_values\(([^,()]*),\s*\w+\s*\)", r"label_values(\1)", s)  # Grafana
    s = MATCHERS.sub(" ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = GROUPING.sub(" ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    names: list[str] = []
    for m in IDENT.finditer(s):
        word, call = m.group(1), m.group(2)
        if call:
            if word not in FUNCTIONS:
                raise ValueError(f"{word!r} is called but is no PromQL function in {expr!r}")
        elif word not in KEYWORDS and word not in FUNCTIONS:
            names.append(word)
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    s = STRINGS.sub('""', expr)
    out: set[str] = set()
    for group in GROUPING.findall(s):
        out |= {x.strip() for x in group.split(",") if x.strip()}
    for body in MATCHERS.findall(s):
        out |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    return out


@cache
def exported() -> dict[str, frozenset[str]]:
    """Every sample name ``render`` produces from representative stats → its label names."""
    stats, serve = representative()
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(render(stats, serve).decode()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return {k: frozenset(v) for k, v in out.items()}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # rows, collapsed or not
    return out


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, expression)`` of every panel target and query variable."""
    out = []
    for p in _panels(dashboard["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]
            out.append((f"variable {v['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def problems(dashboard: dict[str, Any]) -> list[str]:
    """What is wrong with the dashboard's expressions (empty: nothing)."""
    known = exported()
    found: list[str] = []
    for where, expr in expressions(dashboard):
        if not expr.strip():
            found.append(f"{where}: no expression")
            continue
        try:
            names = metric_names(expr)
        except ValueError as exc:
            found.append(f"{where}: {exc}")
            continue
        if not names:
            found.append(f"{where}: names no metric: {expr!r}")
        unknown = [n for n in names if n not in known]
        if unknown:
            found.append(f"{where}: kvray exports no {unknown} (in {expr!r})")
            continue
        labels = set().union(*(known[n] for n in names)) | TARGET_LABELS
        q = STRINGS.sub('""', expr)
        variable = re.fullmatch(r"\s*label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*", q)
        if variable and variable.group(2) not in labels:
            found.append(f"{where}: {names} have no label {variable.group(2)!r}")
        missing = label_names(expr) - labels
        if missing:
            found.append(f"{where}: {names} have no labels {sorted(missing)} (in {expr!r})")
        if "histogram_quantile" in q and not (
            all(n.endswith("_bucket") for n in names) and "le" in label_names(expr)
        ):
            found.append(f"{where}: histogram_quantile needs _bucket series kept by le: {expr!r}")
    return found


def _load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_every_expression_names_exported_metrics() -> None:
    assert problems(_load()) == []


def test_dashboard_covers_kvray() -> None:
    used = {n for _, e in expressions(_load()) for n in metric_names(e)}
    assert used >= {
        "kvray_blocks_applied_total",
        "kvray_events_rejected_total",
        "kvray_seq_gaps_total",
        "kvray_seq_lost_total",
        "kvray_replayed_total",
        "kvray_event_lag_seconds_bucket",
        "kvray_http_requests_total",
        "kvray_http_request_duration_seconds_bucket",
        "kvray_keys",
        "kvray_block_pod_pairs",
        "kvray_shard_rss_bytes",
        "kvray_replica_lag_seconds_bucket",
        "kvray_replica_resyncs_total",
        "kvray_tokenizer_prefix_cache_hit_tokens_total",
        "kvray_tokenizer_tokens_total",
        "kvray_build_info",
    }


def test_dashboard_shape() -> None:
    d = _load()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(d["panels"])]
    assert len(ids) == len(set(ids))
    for p in _panels(d["panels"]):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_extraction() -> None:
    assert metric_names(
        "histogram_quantile(0.99, sum by (le, route) (rate(kvray_http_request_duration_seconds"
        '_bucket{replica=~"$replica", code!="5xx"}[$__rate_interval])))'
    ) == ["kvray_http_request_duration_seconds_bucket"]
    assert metric_names("sum(rate(a_total[5m] offset 1h)) by (x) / on (x) group_left b") == [
        "a_total",
        "b",
    ]
    assert metric_names("label_values(kvray_build_info, replica)") == ["kvray_build_info"]
    assert metric_names("max without (instance) (kvray_keys) > bool 1e3") == ["kvray_keys"]
    assert label_names('sum by (le, route) (x{code="2xx", replica=~"a|b"})') == {
        "le", "route", "code", "replica",
    }  # fmt: skip


def test_checker_rejects_what_kvray_does_not_export() -> None:
    """The check has teeth: a panel naming an unexported metric (or a histogram's family name,
    or a counter without ``_total``, or a label the metric lacks) is reported."""
    d = _load()
    assert problems(d) == []
    for expr, needle in (
        ("rate(kvray_not_a_metric_total[5m])", "kvray_not_a_metric_total"),
        ("histogram_quantile(0.99, rate(kvray_event_lag_seconds[5m]))", "kvray_event_lag_seconds"),
        ("rate(kvray_seq_gaps[5m])", "kvray_seq_gaps"),
        ("kvray_keys_total", "kvray_keys_total"),
        ("sum by (route) (kvray_keys)", "route"),
        ('max by (shard) (kvray_keys{replica=~"$replica"})', "replica"),
        ("histogram_quantile(0.5, sum(rate(kvray_event_lag_seconds_bucket[5m])))", "le"),
        ("rat(kvray_keys[5m])", "rat"),
    ):
        bad = copy.deepcopy(d)
        bad["panels"][-1]["targets"].append({"refId": "Z", "expr": expr})
        found = problems(bad)
        assert len(found) == 1 and needle in found[0], (expr, found)
    bad = copy.deepcopy(d)
    bad["panels"].append({"type": "row", "panels": [{"title": "hidden", "targets": [
        {"refId": "A", "expr": "kvray_hidden_in_a_collapsed_row"}
    ]}]})  # fmt: skip
    assert any("kvray_hidden_in_a_collapsed_row" in p for p in problems(bad))
