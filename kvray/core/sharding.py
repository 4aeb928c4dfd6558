"""Which shard owns a holder: a stable keyed hash of the holder id, never Python's ``hash()``.

Python salts ``str`` hashes per process (PYTHONHASHSEED), so two ingestors would disagree about
owners; xxh3-64 of the UTF-8 id gives every process, and every restart, the same answer.
"""

from __future__ import annotations

import functools

import xxhash


@functools.lru_cache(maxsize=65536)
def shard_of(holder: str, num_shards: int) -> int:
    """The shard index in ``[0, num_shards)`` owning ``holder`` (memoised: asked per message)."""
    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    return int(xxhash.xxh3_64_intdigest(holder.encode("utf-8")) % num_shards)
