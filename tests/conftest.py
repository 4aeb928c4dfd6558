"""Shared test setup: quiet, local-only Ray settings and fixture paths."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports ray: keep every Ray process on 127.0.0.1, quiet and offline.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
