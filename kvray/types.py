"""The names kvray gives its identifiers, so different kinds of key cannot be mixed silently.

Block keys are plain ints of two kinds: an engine key is the 64-bit block hash a vLLM pod
publishes in its events (the last 8 bytes of its digest, big-endian); a request key is kvray's
own token-derived chained key, namespaced by model. The index stores one or the other
(``Indexer(keys=...)``), never both in one key space.
"""

from __future__ import annotations

from typing import NewType

PodId = NewType("PodId", str)
"""A holder of blocks: the pod id from the topic, plus ``#dp<rank>`` for data-parallel rank ≥ 1."""

Tier = NewType("Tier", str)
"""A storage medium: ``"GPU"`` (vLLM's nil medium), ``"CPU"``, ``"STORAGE"``, ..."""

GPU = Tier("GPU")

U64_MASK = (1 << 64) - 1
