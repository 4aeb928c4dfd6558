"""The names kvray gives its identifiers, so different kinds of key cannot be mixed silently.

An ``EngineKey`` is the 64-bit block hash a vLLM pod publishes in its events (the last 8 bytes of
its digest, big-endian). A ``RequestKey`` is kvray's own token-derived chained key, namespaced by
model. The index stores one or the other (``Indexer(keys=...)``), never both in one key space.
"""

from __future__ import annotations

from typing import NewType

PodId = NewType("PodId", str)
"""A holder of blocks: the pod id from the topic, plus ``#dp<rank>`` for data-parallel rank ≥ 1."""

ModelName = NewType("ModelName", str)
"""The served model name (the ``<model>`` part of the ``kv@<pod>@<model>`` topic)."""

EngineKey = NewType("EngineKey", int)
"""A u64 block hash as carried in vLLM events, XOR-ed with the model tag inside the index."""

RequestKey = NewType("RequestKey", int)
"""kvray's u64 chained key over a block's token ids and untagged extra keys."""

Tier = NewType("Tier", str)
"""A storage medium: ``"GPU"`` (vLLM's nil medium), ``"CPU"``, ``"STORAGE"``, ..."""

GPU = Tier("GPU")

U64_MASK = (1 << 64) - 1
