"""kvray's Prometheus metrics: every name and label declared once, rendered from actor stats.

kvray's state lives in many actors; rather than have each export its own endpoint, ``/metrics``
gathers their ``stats()`` dicts at scrape time and renders them here (a custom collector on a
private registry, so nothing is global). This is the only module importing prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StatsCollector(Collector):
    def __init__(self, stats: Mapping[str, Any], serve: Mapping[str, Any]) -> None:
        self.stats = stats
        self.serve = serve

    def collect(self) -> Iterator[Any]:  # noqa: C901 - one flat list of metric families
        ing = self.stats.get("ingestors", [])
        shards = self.stats.get("shards", [])
        toks = self.stats.get("tokenizers", [])

        c = CounterMetricFamily(
            "kvray_events_received", "ZMQ messages received by ingestors", labels=["ingestor"]
        )
        for s in ing:
            c.add_metric([str(s["ingestor"])], s["messages"])
        yield c
        c = CounterMetricFamily(
            "kvray_events_rejected", "Messages or blocks rejected, by reason", labels=["reason"]
        )
        reasons: dict[str, float] = {}
        for s in ing:
            for r, n in s["malformed"].items():
                reasons[r] = reasons.get(r, 0) + n
        for s in shards:
            for part in (s["malformed"], s["rejected"]):
                for r, n in part.items():
                    reasons[r] = reasons.get(r, 0) + n
        for r, n in sorted(reasons.items()):
            c.add_metric([r], n)
        yield c
        c = CounterMetricFamily(
            "kvray_blocks_applied", "Block events applied to the index", labels=["op"]
        )
        c.add_metric(["stored"], sum(s["stored_blocks"] for s in shards))
        c.add_metric(["removed"], sum(s["removed_blocks"] for s in shards))
        c.add_metric(["cleared_pods"], sum(s["cleared"] for s in shards))
        yield c
        for name, key, doc in (
            ("kvray_seq_gaps", "seq_gaps", "Sequence gaps seen"),
            ("kvray_seq_lost", "seq_lost", "Messages known missing and not recovered"),
            ("kvray_replayed", "replayed", "Messages recovered by replay"),
            ("kvray_replay_requests", "replay_requests", "Replay requests sent to pods"),
            ("kvray_pod_restarts", "restarts", "Publisher restarts detected"),
            ("kvray_shard_recoveries", "recoveries", "Shard resynchronisations"),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], sum(s[key] for s in ing))
            yield c
        for name, key, doc in (
            ("kvray_pods", "pods", "Holders with a slot in the index"),
            ("kvray_keys", "keys", "Distinct (key, tier) entries"),
            ("kvray_block_pod_pairs", "pairs", "(block, holder, tier) entries"),
            ("kvray_index_bytes", "bytes_estimate", "Estimated index bytes"),
            ("kvray_hash_mismatch_pods", "hash_mismatched_pods", "Pods failing the hash check"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            for s in shards:
                g.add_metric([str(s["shard"])], s[key])
            yield g
        g = GaugeMetricFamily(
            "kvray_event_lag_seconds",
            "Publisher timestamp to applied, recent batches",
            labels=["shard", "quantile"],
        )
        for s in shards:
            g.add_metric([str(s["shard"]), "0.5"], s["lag_p50_s"])
            g.add_metric([str(s["shard"]), "0.99"], s["lag_p99_s"])
        yield g
        g = GaugeMetricFamily(
            "kvray_write_path_compiled",
            "1 when the shard's write path runs the C extension (kvray._speedups)",
            labels=["shard"],
        )
        for s in shards:
            g.add_metric([str(s["shard"])], float(s.get("write_path") == "compiled"))
        yield g
        c = CounterMetricFamily(
            "kvray_shard_apply_seconds", "Time shards spent applying ops", labels=["shard"]
        )
        for s in shards:
            c.add_metric([str(s["shard"])], s["apply_seconds"])
        yield c
        g = GaugeMetricFamily(
            "kvray_prefix_cache_hit_rate",
            "Tokenizer prefix-cache hit rate (tokens)",
            labels=["tokenizer", "model"],
        )
        lat = GaugeMetricFamily(
            "kvray_tokenization_latency_seconds",
            "Tokenization latency quantiles",
            labels=["tokenizer", "model", "quantile"],
        )
        for t in toks:
            for model, m in t["models"].items():
                g.add_metric([str(t["tokenizer"]), model], m["hit_rate"])
                lat.add_metric([str(t["tokenizer"]), model, "0.5"], m["latency_p50_s"])
                lat.add_metric([str(t["tokenizer"]), model, "0.99"], m["latency_p99_s"])
        yield g
        yield lat
        rep = self.serve.get("replica")
        if rep:  # the answering replica's own read replica
            for name, key, doc, kind in (
                ("kvray_replica_live_shards", "live_shards", "Shards the replica follows", "g"),
                ("kvray_replica_keys", "keys", "Keys in the read replica", "g"),
                ("kvray_replica_bytes", "bytes_estimate", "Estimated read-replica bytes", "g"),
                ("kvray_replica_changes", "applied_msgs", "Change messages applied", "c"),
                ("kvray_replica_snapshots", "snapshots_loaded", "Shard snapshots loaded", "c"),
                (
                    "kvray_replica_resyncs",
                    "resyncs",
                    "Gaps or restarts that forced a snapshot",
                    "c",
                ),
            ):
                fam: Any = (
                    GaugeMetricFamily(name, doc) if kind == "g" else CounterMetricFamily(name, doc)
                )
                fam.add_metric([], rep[key])
                yield fam
            g = GaugeMetricFamily(
                "kvray_replica_lag_seconds",
                "Shard publish to applied in the read replica, recent changes",
                labels=["quantile"],
            )
            g.add_metric(["0.5"], rep.get("lag_p50_s", 0.0))
            g.add_metric(["0.99"], rep.get("lag_p99_s", 0.0))
            yield g
        buckets = self.serve.get("score_buckets")
        if buckets:
            h = HistogramMetricFamily(
                "kvray_scoring_latency_seconds", "Scoring latency at the HTTP ingress"
            )
            h.add_metric([], buckets, sum_value=self.serve.get("score_sum", 0.0))
            yield h


def render(
    stats: Mapping[str, Any], serve: Mapping[str, Any] | ServeMetrics | None = None
) -> bytes:
    """Prometheus text exposition of ``Client.stats()`` (+ the ingress replica's own series)."""
    reg = CollectorRegistry(auto_describe=False)
    if isinstance(serve, ServeMetrics):
        serve = serve.as_dict()
    reg.register(_StatsCollector(stats, serve or {}))
    return generate_latest(reg)  # type: ignore[no-any-return]


class LatencyHistogram:
    """A tiny cumulative histogram for the ingress (no global prometheus state)."""

    BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, b in enumerate(self.BOUNDS):
            if seconds <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for b, n in zip(self.BOUNDS, self.counts, strict=False):
            acc += n
            out.append((str(b), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class ServeMetrics:
    """What one Serve ingress replica measures itself: request latency by route and status.

    The ingress calls ``observe`` once per request and passes the object to ``render`` on
    ``/metrics``; series it produces carry the replica's id (``replica`` label).
    """

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.latency = LatencyHistogram()
        self.index: Mapping[str, Any] | None = None
        """The replica's read-replica stats (``Replica.stats()``), set before rendering."""

    def observe(self, route: str, seconds: float, status: int) -> None:
        if route.startswith("/score") and status < 400:
            self.latency.observe(seconds)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "score_buckets": self.latency.buckets(),
            "score_sum": self.latency.total,
        }
        if self.index is not None:
            out["replica"] = dict(self.index)
        return out
