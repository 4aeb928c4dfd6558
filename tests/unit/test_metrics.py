"""The Prometheus exposition of actor stats: every declared family, correct values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvray.metrics import LatencyHistogram, render

SHARD = {
    "shard": 0,
    "backend": "memory",
    "keys": 10,
    "pairs": 25,
    "pods": 3,
    "evicted_keys": 0,
    "bytes_estimate": 900,
    "stored_blocks": 40,
    "removed_blocks": 15,
    "cleared": 1,
    "rejected": {"unknown_parent": 2},
    "malformed": {"schema": 1},
    "ops": 7,
    "apply_seconds": 0.5,
    "restored_from_snapshot": False,
    "hash_mismatched_pods": 1,
    "rss_bytes": 1,
    "lag_p50_s": 0.001,
    "lag_p99_s": 0.004,
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
}
TOKENIZER = {
    "tokenizer": 0,
    "models": {"qwen3": {"hit_rate": 0.75, "latency_p50_s": 0.002, "latency_p99_s": 0.01}},
}


def test_render_all_families() -> None:
    hist = LatencyHistogram()
    for v in (0.0004, 0.003, 2.0):
        hist.observe(v)
    text = render(
        {"shards": [SHARD], "ingestors": [INGESTOR], "tokenizers": [TOKENIZER]},
        {
            "score_buckets": hist.buckets(),
            "score_sum": hist.total,
            "replica": {
                "live_shards": 2,
                "keys": 7,
                "bytes_estimate": 900,
                "applied_msgs": 41,
                "snapshots_loaded": 2,
                "resyncs": 1,
            },
        },
    ).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples
    }
    assert samples[("kvray_events_received_total", (("ingestor", "0"),))] == 50
    assert samples[("kvray_events_rejected_total", (("reason", "schema"),))] == 2
    assert samples[("kvray_events_rejected_total", (("reason", "topic"),))] == 3
    assert samples[("kvray_blocks_applied_total", (("op", "removed"),))] == 15
    assert samples[("kvray_seq_gaps_total", ())] == 2
    assert samples[("kvray_keys", (("shard", "0"),))] == 10
    assert samples[("kvray_hash_mismatch_pods", (("shard", "0"),))] == 1
    assert (
        samples[("kvray_prefix_cache_hit_rate", (("model", "qwen3"), ("tokenizer", "0")))] == 0.75
    )
    assert samples[("kvray_scoring_latency_seconds_count", ())] == 3
    assert samples[("kvray_replica_keys", ())] == 7
    assert samples[("kvray_replica_resyncs_total", ())] == 1
    assert samples[("kvray_scoring_latency_seconds_bucket", (("le", "0.0005"),))] == 1
    assert samples[("kvray_event_lag_seconds", (("quantile", "0.99"), ("shard", "0")))] == 0.004
    assert samples[("kvray_write_path_compiled", (("shard", "0"),))] == 1
