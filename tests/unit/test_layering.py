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


def test_core_imports_no_adapter() -> None:
    """Nothing under ``kvray/core`` imports an adapter package (backends register
    themselves with ``core.index.registry``), the runtime (actors, serve) or the change
    stream's sockets."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parents[2] / "kvray" / "core"
    banned = ("kvray.backends", "kvray.actors", "kvray.serve", "kvray.changes", "kvray.client")
    found = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.startswith(banned)]
    assert not found, found


def test_redis_backend_registers_itself() -> None:
    code = (
        "import sys\n"
        "import kvray.backends\n"
        "from kvray.core.index.registry import create_backend, is_registered\n"
        "assert is_registered('redis') and 'redis' not in sys.modules\n"
        "create_backend('memory')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
