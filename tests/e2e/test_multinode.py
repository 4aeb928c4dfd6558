"""Shards spread over the nodes of a 3-node ``ray.cluster_utils.Cluster`` score exactly, and
the index converges again after a worker node hosting a shard is removed.

The cluster runs in a subprocess: this pytest session already has its own Ray cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_multinode_cluster() -> None:
    script = Path(__file__).with_name("multinode_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MULTINODE OK 2" in proc.stdout
    assert "NODE REMOVAL OK" in proc.stdout or "NODE REMOVAL SKIPPED" in proc.stdout
