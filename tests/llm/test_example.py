"""``examples/serve_llm.py`` end to end, small: every router through the real OpenAI endpoint,
the JSON it promises. Correctness only; the numbers are the example's own business."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_llm_example_small(tmp_path: Path) -> None:
    out = tmp_path / "serve_llm.json"
    cmd = [sys.executable, str(ROOT / "examples" / "serve_llm.py"),
           "--routers", "kvray,prefix_cache_affinity,kv_aware,power_of_two",
           "--replicas", "2", "--ingress", "1", "--requests", "30", "--rate", "20",
           "--port", "18123", "--json", str(out), "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["routers"]) == {"kvray", "prefix_cache_affinity", "kv_aware", "power_of_two"}
    for name, r in result["routers"].items():
        for field in ("hit_rate", "oracle_fraction", "ttft_p50_s", "ttft_p99_s",
                      "overhead_p50_ms", "overhead_p99_ms", "fallbacks"):  # fmt: skip
            assert field in r, (name, field)
        assert r["errors"] == 0 and r["requests"] == 30, (name, r)
        assert 0.0 <= r["hit_rate"] <= 1.0
    # Ray's KVAwareRouter has no KVTokenTracker under build_openai_app: every request is a
    # random pick, and the example says so.
    assert result["routers"]["kv_aware"]["fallback_reasons"] == {"no_kv_token_tracker": 30}
    assert (tmp_path / "serve_llm_oracle_fraction.png").stat().st_size > 0
