"""What a shard reports about itself: per-holder pod info and its stats (pure functions)."""

from __future__ import annotations

from kvray._proc import rss_anon_bytes, rss_bytes
from kvray.core import fast
from kvray.core.index.base import IndexBackend, IndexStats
from kvray.core.messages import PodInfo, ShardStats
from kvray.core.ordering import OrderedApplier
from kvray.core.stats import quantile
from kvray.errors import BackendUnavailable
from kvray.types import PodId


def pods_info(shard_id: int, applier: OrderedApplier) -> list[PodInfo]:
    """Per holder: model, last seq, seconds since last event, hash-contract status, pool."""
    w, positions = applier.writer, applier.positions
    now, contracts = w.clock(), w.contract()
    out = []
    for holder in set(w.last_seen) | set(positions):
        held, pool_size = w.pools.get(holder)
        out.append(PodInfo(
            pod=holder, shard=shard_id, model=w.models.get(PodId(holder)),
            last_seq=positions.get(holder),
            idle_s=round(now - w.last_seen.get(PodId(holder), now), 3),
            hash_contract=contracts.get(holder, {"status": "unchecked"}),
            blocks=held, pool_blocks=pool_size or None,
        ))  # fmt: skip
    return sorted(out, key=lambda p: p.pod)


def shard_stats(
    shard_id: int,
    backend: IndexBackend,
    backend_name: str,
    applier: OrderedApplier,
    *,
    restored_from_snapshot: bool,
    rebuilds: int,
    change_bytes: int = 0,
) -> ShardStats:
    """A shard's ``stats()`` (``kvray.metrics`` renders them); answers while the backend is
    down (``backend_up`` false)."""
    try:
        st, backend_up = backend.stats(), True
    except BackendUnavailable:
        st, backend_up = IndexStats(backend=backend_name), False
    a = applier
    return ShardStats(
        backend_up=backend_up, shard=shard_id, backend=st.backend, keys=st.keys,
        pairs=st.pairs, pods=st.pods, evicted_keys=st.evicted_keys,
        bytes_estimate=st.bytes_estimate, stored_blocks=a.applied.stored_blocks,
        removed_blocks=a.applied.removed_blocks, cleared=a.applied.cleared,
        rejected=dict(a.applied.rejected), malformed=dict(a.malformed), ops=a.ops,
        apply_seconds=a.apply_seconds, restored_from_snapshot=restored_from_snapshot,
        rebuilds=rebuilds, rss_bytes=rss_bytes(), rss_anon_bytes=rss_anon_bytes(),
        lag_p50_s=quantile(a.lags, 0.50), lag_p99_s=quantile(a.lags, 0.99),
        lag_hist=a.lag_hist.state(),
        hash_mismatched_pods=sum(1 for c in a.writer.contracts.values() if c.status == "mismatch"),
        write_path="compiled" if fast.COMPILED else "python", change_bytes=change_bytes,
    )  # fmt: skip
