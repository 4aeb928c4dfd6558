"""The core stays pure: importing it pulls in none of the runtime's heavy or networked libraries."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("ray", "zmq", "redis", "prometheus_client", "transformers", "tokenizers", "fastapi")


def test_core_imports_no_runtime_library() -> None:
    code = (
        "import sys, kvray.core.apply, kvray.core.index, kvray.core.prefix_store, "
        "kvray.core.scoring, kvray.core.sequencing, kvray.core.sharding, kvray.core.topics, "
        "kvray.core.ordering, kvray.core.replay_plan, kvray.core.holders, kvray.core.messages, "
        "kvray.core.epoch, kvray.changes.journal\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_indexer_imports_no_ray() -> None:
    code = (
        "import sys, kvray\nkvray.Indexer()\n"
        "bad = [m for m in ('ray', 'zmq', 'redis') if m in sys.modules]\nassert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
