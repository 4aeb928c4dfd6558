"""The Prometheus exposition of actor stats: every declared family, correct values, and the
Prometheus conventions (real histograms, counters behind ratios, a replica label exactly on
replica-local series, ``kvray_build_info``)."""

from __future__ import annotations

import math
import re
from importlib import metadata
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kvray.metrics import (
    LAG_BOUNDS,
    REQUEST_BOUNDS,
    Histogram,
    LatencyHistogram,
    ServeMetrics,
    lag_histogram,
    render,
)

REPLICA_ID = "kvray-ingress#abc"

# Series that belong to the answering Serve replica (ServeMetrics, its read replica, the build).
REPLICA_LOCAL = {
    "kvray_build_info",
    "kvray_http_requests",
    "kvray_http_request_duration_seconds",
    "kvray_route_blocks",
    "kvray_route_hit_blocks",
    "kvray_scoring_latency_seconds",
    "kvray_replica_live_shards",
    "kvray_replica_shards",
    "kvray_replica_keys",
    "kvray_replica_pairs",
    "kvray_replica_bytes",
    "kvray_replica_changes",
    "kvray_replica_snapshots",
    "kvray_replica_resyncs",
    "kvray_replica_malformed",
    "kvray_replica_cpu_seconds",
    "kvray_replica_lag_seconds",
}


def _hist(bounds: tuple[float, ...], values: tuple[float, ...]) -> dict[str, Any]:
    h = Histogram(bounds)
    for v in values:
        h.observe(v)
    return h.state()


def shard_stats(shard: int = 0) -> dict[str, Any]:
    """A shard's ``stats()`` with the lag histogram (what the wired producer returns)."""
    return {
        "backend_up": True,
        "shard": shard,
        "backend": "memory",
        "keys": 10,
        "pairs": 25,
        "pods": 3,
        "evicted_keys": 4,
        "bytes_estimate": 900,
        "stored_blocks": 40,
        "removed_blocks": 15,
        "cleared": 1,
        "rejected": {"unknown_parent": 2},
        "malformed": {"schema": 1},
        "ops": 7,
        "apply_seconds": 0.5,
        "restored_from_snapshot": False,
        "rebuilds": 1,
        "rss_bytes": 5_000_000,
        "rss_anon_bytes": 3_000_000,
        "lag_p50_s": 0.001,
        "lag_p99_s": 0.004,
        "lag_hist": _hist(LAG_BOUNDS, (0.0004, 0.001, 0.003, 0.2, 120.0)),
        "hash_mismatched_pods": 1,
        "write_path": "compiled",
    }


INGESTOR = {
    "ingestor": 0,
    "messages": 50,
    "malformed": {"topic": 3, "schema": 1},
    "seq_gaps": 2,
    "seq_lost": 1,
    "replayed": 4,
    "replay_requests": 2,
    "restarts": 1,
    "recoveries": 0,
    "shard_calls": 9,
    "shard_failures": 1,
    "stored": 40,
    "removed": 15,
    "streams": 6,
}
TOKENIZER = {
    "tokenizer": 0,
    "models": {
        "qwen3": {
            "encodes": 4,
            "reused_tokens": 300,
            "encoded_tokens": 100,
            "hit_rate": 0.75,
            "latency_p50_s": 0.002,
            "latency_p99_s": 0.01,
            "latency_hist": _hist(REQUEST_BOUNDS, (0.002, 0.002, 0.01, 0.3)),
        }
    },
}
REPLICA_INDEX = {
    "live_shards": 2,
    "shards": 2,
    "keys": 7,
    "pairs": 9,
    "bytes_estimate": 900,
    "applied_msgs": 41,
    "snapshots_loaded": 2,
    "resyncs": 1,
    "malformed": 0,
    "cpu_s": 0.25,
    "lag_p50_s": 0.002,
    "lag_p99_s": 0.02,
    "lag_hist": _hist(LAG_BOUNDS, (0.002, 0.002, 0.02)),
}


def representative() -> tuple[dict[str, Any], ServeMetrics]:
    """``Client.stats()`` of a small deployment and a Serve replica's ``ServeMetrics`` after a
    few requests: every family kvray renders has samples."""
    stats = {
        "shards": [shard_stats(0), shard_stats(1)],
        "ingestors": [INGESTOR],
        "tokenizers": [TOKENIZER],
    }
    m = ServeMetrics(REPLICA_ID)
    m.observe("/route", 0.0004, 200)
    m.observe("/route", 0.003, 200)
    m.observe("/route", 2.0, 503)
    m.observe("/score", 0.001, 200)
    m.observe("/score", 0.002, 422)
    m.observe("/healthz", 0.0001, 200)
    m.observe_route(blocks=10, hit_blocks=7)
    m.index = REPLICA_INDEX
    return stats, m


def _families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(fams: dict[str, Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples
    }


def _rendered() -> tuple[str, dict[str, Metric]]:
    stats, m = representative()
    text = render(stats, m).decode()
    return text, _families(text)


def test_render_values() -> None:
    _, fams = _rendered()
    samples = _samples(fams)
    r = ("replica", REPLICA_ID)
    assert samples[("kvray_events_received_total", (("ingestor", "0"),))] == 50
    assert samples[("kvray_events_rejected_total", (("reason", "schema"),))] == 3
    assert samples[("kvray_events_rejected_total", (("reason", "topic"),))] == 3
    assert samples[("kvray_events_rejected_total", (("reason", "unknown_parent"),))] == 4
    assert samples[("kvray_blocks_applied_total", (("op", "removed"),))] == 30
    assert samples[("kvray_seq_gaps_total", ())] == 2
    assert samples[("kvray_ingest_shard_failures_total", ())] == 1
    assert samples[("kvray_keys", (("shard", "0"),))] == 10
    assert samples[("kvray_hash_mismatch_pods", (("shard", "0"),))] == 1
    assert samples[("kvray_shard_rss_bytes", (("shard", "1"),))] == 5_000_000
    assert samples[("kvray_evicted_keys_total", (("shard", "0"),))] == 4
    assert samples[("kvray_write_path_compiled", (("shard", "0"),))] == 1
    assert samples[("kvray_event_lag_seconds_count", (("shard", "0"),))] == 5
    assert samples[("kvray_event_lag_seconds_bucket", (("le", "0.001"), ("shard", "0")))] == 2
    assert samples[("kvray_event_lag_seconds_bucket", (("le", "60.0"), ("shard", "0")))] == 4
    assert samples[("kvray_event_lag_seconds_bucket", (("le", "+Inf"), ("shard", "0")))] == 5
    assert samples[("kvray_replica_keys", (r,))] == 7
    assert samples[("kvray_replica_resyncs_total", (r,))] == 1
    assert samples[("kvray_replica_lag_seconds_count", (r,))] == 3
    assert samples[("kvray_http_requests_total", (("code", "2xx"), r, ("route", "/route")))] == 2
    assert samples[("kvray_http_requests_total", (("code", "5xx"), r, ("route", "/route")))] == 1
    assert samples[("kvray_http_requests_total", (("code", "4xx"), r, ("route", "/score")))] == 1
    key = (("code", "2xx"), ("le", "0.0005"), r, ("route", "/route"))
    assert samples[("kvray_http_request_duration_seconds_bucket", key)] == 1
    lv = (("code", "2xx"), r, ("route", "/route"))
    assert samples[("kvray_http_request_duration_seconds_sum", lv)] == pytest.approx(0.0034)
    assert samples[("kvray_route_hit_blocks_total", (r,))] == 7


def test_ratios_are_counters() -> None:
    """The tokenizer's hit rate comes out as the two counters it is computed from."""
    _, fams = _rendered()
    samples = _samples(fams)
    lv = (("model", "qwen3"), ("tokenizer", "0"))
    hits = samples[("kvray_tokenizer_prefix_cache_hit_tokens_total", lv)]
    total = samples[("kvray_tokenizer_tokens_total", lv)]
    assert hits / total == TOKENIZER["models"]["qwen3"]["hit_rate"]  # type: ignore[index]
    for f in fams.values():
        assert not re.search(r"_(rate|ratio)$", f.name), f.name
        if f.type == "gauge":
            assert "hit" not in f.name, f.name


def test_histograms_are_histograms() -> None:
    _, fams = _rendered()
    hists = [f for f in fams.values() if f.type == "histogram"]
    assert {f.name for f in hists} >= {
        "kvray_event_lag_seconds",
        "kvray_replica_lag_seconds",
        "kvray_tokenization_latency_seconds",
        "kvray_http_request_duration_seconds",
    }
    for f in hists:
        series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for s in f.samples:
            base = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            d = series.setdefault(base, {"buckets": []})
            if s.name == f.name + "_bucket":
                d["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name == f.name + "_sum":
                d["sum"] = s.value
            elif s.name == f.name + "_count":
                d["count"] = s.value
            else:
                raise AssertionError(f"unexpected sample {s.name} in {f.name}")
        assert series, f.name
        for base, d in series.items():
            les = [le for le, _ in d["buckets"]]
            counts = [n for _, n in d["buckets"]]
            assert les == sorted(les) and les[-1] == math.inf, (f.name, base)
            assert counts == sorted(counts), (f.name, base)  # cumulative: monotone
            assert counts[-1] == d["count"], (f.name, base)
            assert "sum" in d, (f.name, base)


def test_no_quantile_gauges() -> None:
    _, fams = _rendered()
    for f in fams.values():
        for s in f.samples:
            assert "quantile" not in s.labels or f.type == "summary", f.name


def test_quantile_only_stats_export_no_lag_series() -> None:
    """Producers not yet reporting buckets: their quantiles are dropped, not faked as gauges."""
    old_shard = {k: v for k, v in shard_stats().items() if k != "lag_hist"}
    old_tok = {"tokenizer": 0, "models": {"qwen3": {"hit_rate": 0.75, "latency_p50_s": 0.002}}}
    m = ServeMetrics(REPLICA_ID)
    m.index = {k: v for k, v in REPLICA_INDEX.items() if k != "lag_hist"}
    text = render({"shards": [old_shard], "ingestors": [INGESTOR], "tokenizers": [old_tok]}, m)
    fams = _families(text.decode())
    for name in ("kvray_event_lag_seconds", "kvray_replica_lag_seconds"):
        assert not fams.get(name) or not fams[name].samples, name
    assert not fams["kvray_tokenization_latency_seconds"].samples
    assert not any("quantile" in s.labels for f in fams.values() for s in f.samples)
    assert _samples(fams)[("kvray_keys", (("shard", "0"),))] == 10


def test_malformed_histogram_state_is_skipped() -> None:
    bad = shard_stats()
    bad["lag_hist"] = {"bounds": [0.1, 1.0], "counts": [1, 2], "sum": 0.5}  # one count short
    fams = _families(render({"shards": [bad]}).decode())
    assert not fams["kvray_event_lag_seconds"].samples


def test_replica_label_exactly_on_replica_local_series() -> None:
    text, fams = _rendered()
    assert {f.name for f in fams.values() if f.samples} >= REPLICA_LOCAL - {
        "kvray_scoring_latency_seconds"  # only from the older dict form
    }
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    for f in fams.values():
        for s in f.samples:
            if f.name in REPLICA_LOCAL:
                assert s.labels.get("replica") == REPLICA_ID, s
            else:
                assert "replica" not in s.labels, s
        help_ = next(v for k, v in helps.items() if k in (f.name, f.name + "_total"))
        if f.name not in REPLICA_LOCAL:
            assert "cluster-wide" in help_ and "max" in help_, f.name


def test_build_info() -> None:
    _, fams = _rendered()
    (s,) = fams["kvray_build_info"].samples
    assert s.value == 1
    assert s.labels["version"] == metadata.version("kvray")
    assert s.labels["ray"] == metadata.version("ray")
    assert s.labels["write_path"] in ("compiled", "python")
    assert re.fullmatch(r"3\.\d+\.\d+.*", s.labels["python"])
    assert s.labels["replica"] == REPLICA_ID
    (s,) = _families(render({}).decode())["kvray_build_info"].samples  # no Serve replica
    assert "replica" not in s.labels


def test_counters_end_in_total() -> None:
    text, _ = _rendered()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    counters = [n for n, t in types.items() if t == "counter"]
    assert len(counters) > 10
    assert all(n.endswith("_total") for n in counters), counters
    for name in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(base) == "histogram", name


def test_no_global_registry() -> None:
    render(*representative())
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("kvray_")]


def test_histogram_class() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):  # a value equal to a bound counts in that bucket
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.total == pytest.approx(4.65)
    assert h.state() == {"bounds": [0.1, 1.0], "counts": [2, 2, 1], "sum": h.total}
    h.reset()
    assert h.count == 0 and h.total == 0
    for bad in ((), (1.0, 0.5), (0.1, 0.1), (0.1, math.inf)):
        with pytest.raises(ValueError):
            Histogram(bad)
    assert lag_histogram().bounds == LAG_BOUNDS and LAG_BOUNDS[-1] >= 30
    lat = LatencyHistogram()
    lat.observe(0.0004)
    assert lat.bounds == REQUEST_BOUNDS and lat.buckets()[0] == ("0.0005", 1)


def test_serve_metrics_status_classes_and_route_cap() -> None:
    m = ServeMetrics("r")
    for status in (200, 204, 307, 404, 500, 0):
        m.observe("/route", 0.001, status)
    assert sorted(code for _, code in m.requests) == ["2xx", "3xx", "4xx", "5xx", "other"]
    assert m.requests[("/route", "2xx")].count == 2
    for i in range(200):  # a path scan must not explode the route label
        m.observe(f"/probe/{i}", 0.001, 404)
    routes = {r for r, _ in m.requests}
    assert len(routes) <= 65 and "other" in routes
    m.observe("/route", 0.001, 200)  # a route seen before the cap keeps its label
    assert m.requests[("/route", "2xx")].count == 3


def test_older_serve_dict_still_renders() -> None:
    """The ingress's previous call: ``render(stats, {"score_buckets", "score_sum", "replica"})``."""
    hist = LatencyHistogram()
    for v in (0.0004, 0.003, 2.0):
        hist.observe(v)
    text = render(
        {"shards": [shard_stats()], "ingestors": [INGESTOR], "tokenizers": [TOKENIZER]},
        {"score_buckets": hist.buckets(), "score_sum": hist.total, "replica": REPLICA_INDEX},
    ).decode()
    fams = _families(text)
    (count,) = [s for s in fams["kvray_scoring_latency_seconds"].samples if "_count" in s.name]
    assert count.value == 3 and count.labels["replica"]
    assert fams["kvray_replica_keys"].samples[0].value == 7
    assert (
        not _families(render({}, {}).decode())["kvray_build_info"].samples[0].labels.get("replica")
    )
