"""Index backends that keep their state outside the process (Redis).

Importing this package registers them with ``core.index.registry`` (the core never imports an
adapter); the Redis client library itself is imported only when a Redis backend is created.
``kvray.indexer`` and the shard import it, so ``index.backend: redis`` works wherever an index
is built.
"""

from __future__ import annotations

from typing import Any

from kvray.core.index.base import IndexBackend
from kvray.core.index.registry import is_registered, register_backend


def _redis(**kwargs: Any) -> IndexBackend:
    from kvray.backends.redis import RedisBackend  # lazy: importing kvray stays free of redis

    return RedisBackend(**kwargs)  # type: ignore[no-any-return]


if not is_registered("redis"):
    register_backend("redis", _redis)
