"""Index backends: the contract (``base``), in-memory and byte-budgeted backends, registry."""

from kvray.core.index.base import IndexBackend, IndexStats
from kvray.core.index.budget import BudgetIndex
from kvray.core.index.memory import MemoryIndex
from kvray.core.index.registry import create_backend, register_backend

__all__ = [
    "BudgetIndex",
    "IndexBackend",
    "IndexStats",
    "MemoryIndex",
    "create_backend",
    "register_backend",
]
