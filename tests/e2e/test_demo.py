"""``kvray demo`` end to end, tiny: real Ray, real kvray actors, simulated pods over real ZMQ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from kvray.demo import run_demo

pytestmark = pytest.mark.e2e

OUTPUTS = (
    "results.json",
    "summary.csv",
    "requests.csv",
    "hit_rate.png",
    "hit_rate_over_time.png",
    "pod_load.png",
)


def test_tiny_demo_kvray_matches_oracle_and_heals_gaps(ray_session: None, tmp_path: Path) -> None:
    code = run_demo(
        [
            "--requests", "160", "--pods", "4", "--blocks", "384", "--tenants", "6",
            "--policies", "kvray,oracle,random", "--load-weights", "", "--freshness", "sync",
            "--inject-gap", "--gap-every", "20", "--gap-size", "2",
            "--via", "handle", "--namespace", "kvray-e2e-demo",
            "--out", str(tmp_path), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert ray.is_initialized()  # the session's cluster was used and left running
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name

    res = json.loads((tmp_path / "results.json").read_text())
    runs = {r["run"]: r for r in res["runs"]}
    kv, oracle, rnd, gap = runs["kvray"], runs["oracle"], runs["random"], runs["kvray (gap)"]
    assert kv["hit_rate"] >= 0.95 * oracle["hit_rate"]
    assert kv["hit_rate"] > rnd["hit_rate"]
    assert kv["accuracy"]["accuracy"] >= 0.99
    assert kv["events"]["seq_lost"] == 0 and kv["events"]["seq_gaps"] == 0
    assert set(res["hash_contracts"].values()) == {"ok"}

    # Lost batches were noticed and replayed; requests scored after recovery are exact.
    assert gap["batches_dropped"] > 0
    assert gap["events"]["seq_gaps"] > 0 and gap["events"]["replayed"] > 0
    assert gap["events"]["seq_lost"] == 0
    assert gap["accuracy"]["fresh"]["accuracy"] >= 0.99
