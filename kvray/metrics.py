"""kvray's Prometheus metrics: every name and label declared once, rendered from actor stats.

kvray's state lives in many actors; rather than have each export its own endpoint, ``/metrics``
gathers their typed ``stats()`` (``core.messages``) at scrape time and renders them here (a
custom collector on a private registry, so nothing is global). This is the only module
importing prometheus_client.

Two kinds of series come out of one scrape:

* cluster-wide series, rendered from the actors' ``stats()`` (shards, ingestors, tokenizers).
  Every Serve replica renders the same values, so they carry no ``replica`` label; a dashboard
  aggregates them with ``max`` across scrape targets (or reads one target), never ``sum``.
* replica-local series: the answering Serve replica's own requests (``ServeMetrics``), its
  read replica (``ServeMetrics.index``) and ``kvray_build_info``. They carry ``replica=<id>``,
  so summing over replicas counts each request once.

Latencies and lags are histograms (``_bucket``/``_sum``/``_count``), never gauges labelled
``quantile``; a ratio is exported as the two counters it is computed from. Producers that
measure a latency keep a ``Histogram`` and put ``Histogram.state()`` in their stats.
"""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from importlib import metadata
from typing import Any, TypeVar

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from kvray.core.messages import ClusterStats, ReplicaStats
from kvray.core.stats import (  # noqa: F401  (re-exported: producers and tests use them here)
    LAG_BOUNDS,
    REQUEST_BOUNDS,
    Histogram,
    LatencyHistogram,
    lag_histogram,
)
from kvray.core.stats import (
    cumulative as _cumulative,
)

_T = TypeVar("_T")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CLUSTER = " (cluster-wide: the same on every replica's scrape; aggregate with max, not sum)"
_LOCAL = " (this Serve replica's own, labelled replica)"
_MAX_ROUTES = 64  # distinct route labels per ServeMetrics; later ones count as "other"


def _from_state(state: Any) -> tuple[list[tuple[str, float]], float] | None:
    """Cumulative buckets and sum from a ``Histogram.state()`` dict; None if absent/invalid."""
    if not isinstance(state, Mapping):
        return None
    try:
        bounds = [float(b) for b in state["bounds"]]
        counts = [int(n) for n in state["counts"]]
        total = float(state["sum"])
    except (KeyError, TypeError, ValueError):
        return None
    if len(counts) != len(bounds) + 1 or any(n < 0 for n in counts):
        return None
    return _cumulative(bounds, counts), total


# --- the Serve replica's own measurements -------------------------------------------------


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class ServeMetrics:
    """What one Serve ingress replica measures itself: requests by route and status class.

    The ingress calls ``observe`` once per request, sets ``index`` to its read replica's
    ``Replica.stats()`` and passes the object to ``render`` on ``/metrics``; every series it
    produces carries the replica's id (``replica`` label).
    """

    def __init__(self, replica: str) -> None:
        self.replica = str(replica)
        self.requests: dict[tuple[str, str], Histogram] = {}
        """(route, status class) → latency histogram (its count is the request count)."""
        self._routes: set[str] = set()
        self.route_blocks = 0
        self.route_hit_blocks = 0
        self.index: ReplicaStats | Mapping[str, Any] | None = None
        """The replica's read-replica stats (``Replica.stats()``), set before rendering."""
        self.legacy_score: tuple[list[tuple[str, float]], float] | None = None

    def observe(self, route: str, seconds: float, status: int) -> None:
        """One request: its route (path), duration and HTTP status."""
        if route not in self._routes:
            if len(self._routes) >= _MAX_ROUTES:  # bound the label's cardinality (path scans)
                route = "other"
            self._routes.add(route)
        key = (route, _status_class(status))
        h = self.requests.get(key)
        if h is None:
            h = self.requests[key] = LatencyHistogram()
        h.observe(seconds)

    def observe_route(self, blocks: int, hit_blocks: int) -> None:
        """One routing decision: request blocks and those the chosen pod is expected to hold."""
        self.route_blocks += blocks
        self.route_hit_blocks += hit_blocks

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServeMetrics:
        """The older dict form (``score_buckets``/``score_sum``/``replica``)."""
        m = cls(str(d.get("replica_id") or f"{socket.gethostname()}:{os.getpid()}"))
        rep = d.get("replica")
        m.index = rep if isinstance(rep, Mapping) else None
        if d.get("score_buckets"):
            m.legacy_score = (list(d["score_buckets"]), float(d.get("score_sum", 0.0)))
        return m


# --- rendering ----------------------------------------------------------------------------


@cache
def _build_labels() -> tuple[str, str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return version("kvray"), platform.python_version(), version("ray")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) else 0.0


def _typed(value: Any, kind: type[_T]) -> _T:
    """``value`` as ``kind``: a Struct as it is, a dict (older producers, tests) converted."""
    if isinstance(value, kind):
        return value
    return msgspec.convert(value, kind, from_attributes=True)


class _StatsCollector(Collector):
    def __init__(self, stats: ClusterStats | Mapping[str, Any], serve: ServeMetrics | None) -> None:
        self.stats = _typed(stats, ClusterStats)
        self.serve = serve

    def collect(self) -> Iterator[Any]:
        yield from self._build_info()
        yield from self._ingest()
        yield from self._shards()
        yield from self._tokenizers()
        if self.serve is not None:
            yield from self._serve(self.serve)

    def _build_info(self) -> Iterable[Any]:
        from kvray.core import fast

        version, python, ray = _build_labels()
        labels = ["version", "python", "ray", "write_path"]
        values = [version, python, ray, "compiled" if fast.COMPILED else "python"]
        doc = "kvray build of the process answering the scrape"
        if self.serve is not None:
            labels.insert(0, "replica")
            values.insert(0, self.serve.replica)
            doc += _LOCAL
        g = GaugeMetricFamily("kvray_build_info", doc, labels=labels)
        g.add_metric(values, 1)
        yield g

    def _ingest(self) -> Iterable[Any]:
        ing = self.stats.ingestors
        shards = self.stats.shards
        c = CounterMetricFamily(
            "kvray_events_received",
            "ZMQ messages received by ingestors" + _CLUSTER,
            labels=["ingestor"],
        )
        for s in ing:
            c.add_metric([str(s.ingestor)], s.messages)
        yield c
        c = CounterMetricFamily(
            "kvray_events_rejected",
            "Messages or blocks rejected or malformed, by reason" + _CLUSTER,
            labels=["reason"],
        )
        reasons: dict[str, float] = {}
        for s in ing:
            for r, n in s.malformed.items():
                reasons[r] = reasons.get(r, 0) + n
        for sh in shards:
            for part in (sh.malformed, sh.rejected):
                for r, n in part.items():
                    reasons[r] = reasons.get(r, 0) + n
        for r, total in sorted(reasons.items()):
            c.add_metric([r], total)
        yield c
        c = CounterMetricFamily(
            "kvray_blocks_applied", "Block events applied to the index" + _CLUSTER, labels=["op"]
        )
        c.add_metric(["stored"], sum(sh.stored_blocks for sh in shards))
        c.add_metric(["removed"], sum(sh.removed_blocks for sh in shards))
        c.add_metric(["cleared_pods"], sum(sh.cleared for sh in shards))
        yield c
        for name, key, doc in (
            ("kvray_seq_gaps", "seq_gaps", "Sequence gaps seen"),
            ("kvray_seq_lost", "seq_lost", "Messages known missing and not recovered"),
            ("kvray_replayed", "replayed", "Messages recovered by replay"),
            ("kvray_replay_requests", "replay_requests", "Replay requests sent to pods"),
            ("kvray_pod_restarts", "restarts", "Publisher restarts detected"),
            ("kvray_shard_recoveries", "recoveries", "Shard resynchronisations"),
            ("kvray_ingest_shard_calls", "shard_calls", "Batches shipped to shards"),
            ("kvray_ingest_shard_failures", "shard_failures", "Batches a shard failed to take"),
        ):
            c = CounterMetricFamily(name, doc + _CLUSTER)
            c.add_metric([], sum(_num(getattr(s, key)) for s in ing))
            yield c
        g = GaugeMetricFamily(
            "kvray_ingest_streams", "Publisher streams followed" + _CLUSTER, labels=["ingestor"]
        )
        for s in ing:
            g.add_metric([str(s.ingestor)], s.streams)
        yield g

    def _shards(self) -> Iterable[Any]:
        shards = self.stats.shards
        for name, key, doc in (
            ("kvray_pods", "pods", "Holders with a slot in the index"),
            ("kvray_keys", "keys", "Distinct (key, tier) entries"),
            ("kvray_block_pod_pairs", "pairs", "(block, holder, tier) entries"),
            ("kvray_index_bytes", "bytes_estimate", "Estimated index bytes"),
            ("kvray_hash_mismatch_pods", "hash_mismatched_pods", "Pods failing the hash check"),
            ("kvray_shard_rss_bytes", "rss_bytes", "Shard process resident memory"),
            ("kvray_shard_rss_anon_bytes", "rss_anon_bytes", "Shard process anonymous RSS"),
        ):
            g = GaugeMetricFamily(name, doc + _CLUSTER, labels=["shard"])
            for s in shards:
                g.add_metric([str(s.shard)], _num(getattr(s, key)))
            yield g
        g = GaugeMetricFamily(
            "kvray_shard_backend_up", "1 when the shard's index backend answers" + _CLUSTER,
            labels=["shard"],
        )  # fmt: skip
        for s in shards:
            g.add_metric([str(s.shard)], float(s.backend_up))
        yield g
        g = GaugeMetricFamily(
            "kvray_write_path_compiled",
            "1 when the shard's write path runs the C extension (kvray._speedups)" + _CLUSTER,
            labels=["shard"],
        )
        for s in shards:
            g.add_metric([str(s.shard)], float(s.write_path == "compiled"))
        yield g
        for name, key, doc in (
            ("kvray_shard_apply_seconds", "apply_seconds", "Time shards spent applying ops"),
            ("kvray_shard_ops", "ops", "Ops applied by shards"),
            ("kvray_shard_rebuilds", "rebuilds", "Index rebuilds after the backend lost data"),
            ("kvray_evicted_keys", "evicted_keys", "Keys dropped by the size bound"),
        ):
            c = CounterMetricFamily(name, doc + _CLUSTER, labels=["shard"])
            for s in shards:
                c.add_metric([str(s.shard)], _num(getattr(s, key)))
            yield c
        h = HistogramMetricFamily(
            "kvray_event_lag_seconds",
            "Publisher timestamp to visible in the shard, per batch" + _CLUSTER,
            labels=["shard"],
        )
        for s in shards:  # stats with only lag_p50_s/lag_p99_s (no buckets) export nothing
            got = _from_state(s.lag_hist)
            if got:
                h.add_metric([str(s.shard)], got[0], sum_value=got[1])
        yield h

    def _tokenizers(self) -> Iterable[Any]:
        toks = self.stats.tokenizers
        labels = ["tokenizer", "model"]
        encodes = CounterMetricFamily(
            "kvray_tokenizer_encodes", "Prompts and chats encoded" + _CLUSTER, labels=labels
        )
        hits = CounterMetricFamily(
            "kvray_tokenizer_prefix_cache_hit_tokens",
            "Tokens returned from the tokenizer prefix cache; hit ratio = rate(this) / "
            "rate(kvray_tokenizer_tokens_total)" + _CLUSTER,
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "kvray_tokenizer_tokens",
            "Tokens returned by tokenizers (from the prefix cache or encoded)" + _CLUSTER,
            labels=labels,
        )
        lat = HistogramMetricFamily(
            "kvray_tokenization_latency_seconds",
            "Encode latency in the tokenizer actor" + _CLUSTER,
            labels=labels,
        )
        for t in toks:
            for model, m in t.get("models", {}).items():
                lv = [str(t["tokenizer"]), str(model)]
                if "encodes" in m:
                    encodes.add_metric(lv, _num(m["encodes"]))
                if "reused_tokens" in m and "encoded_tokens" in m:
                    reused = _num(m["reused_tokens"])
                    hits.add_metric(lv, reused)
                    tokens.add_metric(lv, reused + _num(m["encoded_tokens"]))
                got = _from_state(m.get("latency_hist"))
                if got:
                    lat.add_metric(lv, got[0], sum_value=got[1])
        yield encodes
        yield hits
        yield tokens
        yield lat

    def _serve(self, m: ServeMetrics) -> Iterable[Any]:
        rid = m.replica
        req = CounterMetricFamily(
            "kvray_http_requests",
            "HTTP requests by route and status class" + _LOCAL,
            labels=["replica", "route", "code"],
        )
        dur = HistogramMetricFamily(
            "kvray_http_request_duration_seconds",
            "HTTP request latency by route and status class" + _LOCAL,
            labels=["replica", "route", "code"],
        )
        for (route, code), hist in sorted(m.requests.items()):
            req.add_metric([rid, route, code], hist.count)
            dur.add_metric([rid, route, code], hist.buckets(), sum_value=hist.total)
        yield req
        yield dur
        c = CounterMetricFamily(
            "kvray_route_blocks", "Request blocks routed" + _LOCAL, labels=["replica"]
        )
        c.add_metric([rid], m.route_blocks)
        yield c
        c = CounterMetricFamily(
            "kvray_route_hit_blocks",
            "Routed blocks the chosen pod was expected to hold; predicted hit ratio = "
            "rate(this) / rate(kvray_route_blocks_total)" + _LOCAL,
            labels=["replica"],
        )
        c.add_metric([rid], m.route_hit_blocks)
        yield c
        if m.legacy_score is not None:
            h = HistogramMetricFamily(
                "kvray_scoring_latency_seconds",
                "Scoring latency at the HTTP ingress" + _LOCAL,
                labels=["replica"],
            )
            h.add_metric([rid], m.legacy_score[0], sum_value=m.legacy_score[1])
            yield h
        if not m.index:
            return
        rep = _typed(m.index, ReplicaStats)
        for name, key, doc, kind in (
            ("kvray_replica_live_shards", "live_shards", "Shards the read replica follows", "g"),
            ("kvray_replica_shards", "shards", "Shards in the deployment", "g"),
            ("kvray_replica_keys", "keys", "Keys in the read replica", "g"),
            (
                "kvray_replica_pairs",
                "pairs",
                "(block, holder, tier) entries in the read replica",
                "g",
            ),
            ("kvray_replica_bytes", "bytes_estimate", "Estimated read-replica bytes", "g"),
            ("kvray_replica_changes", "applied_msgs", "Change messages applied", "c"),
            ("kvray_replica_snapshots", "snapshots_loaded", "Shard snapshots loaded", "c"),
            ("kvray_replica_resyncs", "resyncs", "Gaps or restarts that forced a snapshot", "c"),
            ("kvray_replica_malformed", "malformed", "Undecodable change messages", "c"),
            ("kvray_replica_cpu_seconds", "cpu_s", "CPU time of the follower thread", "c"),
        ):
            fam: Any = (
                GaugeMetricFamily(name, doc + _LOCAL, labels=["replica"])
                if kind == "g"
                else CounterMetricFamily(name, doc + _LOCAL, labels=["replica"])
            )
            fam.add_metric([rid], _num(getattr(rep, key)))
            yield fam
        got = _from_state(rep.lag_hist)
        if got:  # stats with only lag_p50_s/lag_p99_s (no buckets) export nothing
            h = HistogramMetricFamily(
                "kvray_replica_lag_seconds",
                "Shard publish to applied in the read replica, per change message" + _LOCAL,
                labels=["replica"],
            )
            h.add_metric([rid], got[0], sum_value=got[1])
            yield h


def render(
    stats: ClusterStats | Mapping[str, Any],
    serve: Mapping[str, Any] | ServeMetrics | None = None,
) -> bytes:
    """Prometheus text exposition of ``Client.stats()`` (+ the ingress replica's own series).

    ``stats`` is a ``ClusterStats`` (or its dict form); ``serve`` is the answering replica's
    ``ServeMetrics`` (or the older dict form).
    """
    if serve is not None and not isinstance(serve, ServeMetrics):
        serve = ServeMetrics.from_dict(serve) if serve else None
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_StatsCollector(stats, serve))
    return generate_latest(reg)  # type: ignore[no-any-return]
