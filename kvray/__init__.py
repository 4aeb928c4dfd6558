"""kvray: a KV-cache-aware routing index for vLLM fleets, on Ray.

Public surface (pinned by ``tests/unit/test_public_api.py``): ``Indexer`` (in-process),
``connect`` (cluster client), ``Config`` / ``load_config`` and the error tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvray.config import Config, IndexConfig, load_config
from kvray.errors import (
    BackendUnavailable,
    BadRequest,
    ConfigError,
    KvrayError,
    MalformedFrame,
)
from kvray.indexer import Indexer

if TYPE_CHECKING:
    from kvray.client import Client

__version__ = "0.1.0"


def connect(namespace: str = "kvray", **kwargs: Any) -> Client:
    """A client for a running kvray on the current Ray cluster (imports Ray lazily)."""
    from kvray.client import connect as _connect

    return _connect(namespace=namespace, **kwargs)


__all__ = [
    "__version__",
    "BackendUnavailable",
    "BadRequest",
    "Config",
    "ConfigError",
    "connect",
    "IndexConfig",
    "Indexer",
    "KvrayError",
    "load_config",
    "MalformedFrame",
]
