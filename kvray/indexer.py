"""``kvray.Indexer``: the whole index in one process, no Ray, for users and tests.

It composes the pure core: frames → topic/seq → decoded batch → ``IndexWriter`` → backend, and
prompt tokens → block keys → longest-prefix scores. The Ray runtime runs the same pieces split
over ingestor and shard actors, so ``Indexer`` is also the reference the cluster is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import kvray.backends  # noqa: F401  (registers the Redis backend)
from kvray.config import IndexConfig
from kvray.core.apply import ApplyResult, IndexWriter
from kvray.core.events import DecodeLimits, EventBatch, EventDecoder
from kvray.core.holders import holder_id
from kvray.core.index.base import IndexStats
from kvray.core.index.registry import create_backend
from kvray.core.keyed import KeyedIndex
from kvray.core.sequencing import SeqTracker, Verdict
from kvray.core.topics import parse_frames, parse_topic
from kvray.errors import MalformedFrame
from kvray.types import PodId


@dataclass(slots=True)
class IngestCounters:
    """Counters of the frames an ``Indexer`` (or an ingestor) has seen."""

    messages: int = 0
    """ZMQ messages received."""
    malformed: dict[str, int] = field(default_factory=dict)
    """Messages rejected, by ``MalformedFrame.reason``."""
    seq_gaps: int = 0
    """Gaps seen."""
    seq_lost: int = 0
    """Messages known missing and not recovered."""
    restarts: int = 0
    """Publisher restarts detected (seq went back)."""
    applied: ApplyResult = field(default_factory=ApplyResult)
    """What the applied batches did."""


class Indexer(KeyedIndex[dict[PodId, float]]):
    """An in-process KV-block index.

    Args:
        block_size: tokens per block of the pods (vLLM default 16).
        config: an ``IndexConfig`` for everything else; keyword ``options`` override its
            fields (``keys="engine"``, ``backend="budget"``, ``hash_algo=...``, ``hash_seed=...``,
            ``tier_weights={...}``, ...).
        default_pod: pod id for frames with an empty topic (vLLM's default topic).
        default_model: model for frames with an empty topic.
        clock: time source for TTLs (tests inject one).

    Example:
        >>> ix = kvray.Indexer()
        >>> ix.apply([topic, seq, payload])          # one ZMQ message
        >>> ix.score_tokens(tokens, "meta-llama/Llama-3.1-8B")
        {'10.0.0.7': 4.0}
    """

    def __init__(
        self,
        block_size: int = 16,
        *,
        config: IndexConfig | None = None,
        default_pod: str | None = None,
        default_model: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        decode_limits: DecodeLimits | None = None,
        **options: Any,
    ) -> None:
        cfg = config or IndexConfig()
        model_keys = {"hash_algo", "hash_seed", "lora_paths", "tokenizer"}
        dm = cfg.default_model.model_dump()
        dm["block_size"] = block_size
        for k in list(options):
            if k in model_keys:
                dm[k] = options.pop(k)
        data = cfg.model_dump()
        data["default_model"] = dm
        data.update(options)
        self.config = IndexConfig.model_validate(data)
        self.backend = create_backend(self.config.backend, **self.config.backend_options())
        self.hashing = self.config.hashing_lookup()
        """model name → its ``ModelHashing`` (memoised)."""
        self.writer = IndexWriter(
            self.backend,
            self.hashing,
            key_mode=self.config.keys,
            verify_hashes=self.config.verify_hashes,
            verify_blocks=self.config.verify_blocks,
            speculative_ttl_s=self.config.speculative_ttl_s,
            clock=clock,
        )
        self.keyer = self.writer.keyer
        self.decoder = EventDecoder(decode_limits)
        self.seq = SeqTracker()
        self.counters = IngestCounters()
        self.default_pod = default_pod
        self.default_model = default_model
        self.last_seq: dict[PodId, int] = {}

    # --- write path ------------------------------------------------------------------------

    def apply(self, frames: Sequence[bytes]) -> ApplyResult:
        """Apply one ZMQ message ``[topic, seq, payload]``.

        A malformed message is counted (``counters.malformed``) and re-raised as
        ``MalformedFrame``; the index is unchanged by it.
        """
        self.counters.messages += 1
        try:
            topic_s, seq, payload = parse_frames(frames)
            topic = parse_topic(
                topic_s, default_pod=self.default_pod, default_model=self.default_model
            )
            batch = self.decoder.decode(payload)
        except MalformedFrame as exc:
            self.counters.malformed[exc.reason] = self.counters.malformed.get(exc.reason, 0) + 1
            raise
        return self.apply_batch(topic.pod, topic.model, batch, seq=seq)

    def apply_batch(
        self, pod: str, model: str, batch: EventBatch, *, seq: int | None = None
    ) -> ApplyResult:
        """Apply a decoded batch from ``pod`` (its DP rank picks the holder)."""
        holder = holder_id(pod, batch.data_parallel_rank)
        if seq is not None:
            verdict = self.seq.observe((pod, batch.data_parallel_rank or 0), seq)
            if verdict.verdict is Verdict.GAP:
                self.counters.seq_gaps += 1
                self.counters.seq_lost += verdict.missing
            elif verdict.verdict is Verdict.RESTART:
                self.counters.restarts += 1
                self.writer.clear_holder(holder)
            self.last_seq[holder] = seq
        res = self.writer.apply_batch(holder, model, batch)
        self.counters.applied.merge(res)
        return res

    def clear_pod(self, pod: str) -> None:
        """Forget everything a holder holds."""
        self.writer.clear_holder(PodId(pod))

    def drop_silent(self) -> list[PodId]:
        """Drop holders silent for longer than ``pod_ttl_s`` (no-op when it is unset)."""
        if self.config.pod_ttl_s is None:
            return []
        return self.writer.drop_silent(self.config.pod_ttl_s)

    # --- read path -------------------------------------------------------------------------

    def score_keys(
        self, keys: Sequence[int], pods: Sequence[str] | None = None
    ) -> dict[PodId, float]:
        """Longest-prefix scores for precomputed keys."""
        return self.writer.score(keys, self.config.tier_weights, pods)

    def record_keys(self, pod: str, keys: Sequence[int], ttl_s: float | None = None) -> None:
        """Hold ``keys`` for ``pod`` as speculative entries (``record_route`` of a prompt)."""
        self.writer.record_route(PodId(pod), keys, ttl_s)

    # --- introspection ---------------------------------------------------------------------

    def hash_contract(self, pod: str | None = None) -> dict[str, dict[str, Any]]:
        """Per-holder hash-contract status: ``ok``, ``mismatch`` or ``unchecked``."""
        return self.writer.contract(pod)

    def pods(self) -> list[PodId]:
        """Holders currently in the index."""
        return self.backend.pods()

    def stats(self) -> IndexStats:
        """Index sizes."""
        return self.backend.stats()

    def snapshot(self) -> bytes:
        """The index as a portable snapshot."""
        return self.backend.snapshot()

    def restore(self, data: bytes) -> None:
        """Replace the index with a snapshot."""
        self.backend.restore(data)
