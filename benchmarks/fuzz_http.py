"""Fuzz every HTTP route from the OpenAPI schema with schemathesis; no request may get a 5xx.

Run: ``python benchmarks/fuzz_http.py [--examples 2000] [--out benchmarks/results/fuzz_http.md]``
(needs ``pip install schemathesis``; the ``fuzz`` extra). Starts a local Ray cluster, kvray's
runtime with the Qwen3 tokenizer, a simulated pod, and kvray's one HTTP door with a bearer
token (the Serve replica itself, direct ingress: what ``start_http`` returns), then runs
``st run`` against that door's own ``/openapi.json`` (built from the msgspec Structs the door
decodes with) with the ``not_a_server_error`` check over every operation. Requests are counted
by the ingress itself (``kvray_http_requests_total`` of the ``/score*`` routes answered 2xx) and
by status from the schemathesis report.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvray._env import apply_local_defaults  # noqa: E402  (before ray is imported)

apply_local_defaults()

import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _util import init_local_ray, write_report  # noqa: E402

import kvray  # noqa: E402
from kvray import runtime  # noqa: E402
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig, ServeConfig  # noqa: E402
from kvray.serve.app import start_http, stop_http  # noqa: E402
from kvray.sim import SimPod, SimPublisher  # noqa: E402
from kvray.tokenization import find_bundled_qwen3  # noqa: E402

TOKEN = "fuzz-token"
REPORT_DIR = "/tmp/kvray-fuzz-report"


def _st() -> str:
    """schemathesis's CLI: next to this interpreter, else on PATH."""
    here = Path(sys.executable).with_name("st")
    return str(here) if here.exists() else (shutil.which("st") or str(here))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=2000, help="cases per operation")
    ap.add_argument("--out", default="benchmarks/results/fuzz_http.md")
    args = ap.parse_args()
    init_local_ray()
    cfg = Config(
        namespace="fuzz",
        index=IndexConfig(
            models={"qwen3": ModelConfig(tokenizer=str(find_bundled_qwen3()))},
            default_model=ModelConfig(tokenizer=str(find_bundled_qwen3())),
        ),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
        serve=ServeConfig(auth_token=TOKEN, max_prompt_chars=200_000),
    )
    runtime.start(cfg)
    client = kvray.connect("fuzz")
    base = start_http(cfg)
    pub = SimPublisher(client.endpoints[0][0], "kv@10.0.0.1@qwen3")
    pub.wait_connected()
    SimPod("10.0.0.1", "qwen3", publisher=pub).serve(list(range(256)))
    shutil.rmtree(REPORT_DIR, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run(
        [
            _st(),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "not_a_server_error",
            "-n",
            str(args.examples),
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--no-shrink",
            "--request-timeout",
            "30",
            "--seed",
            "1",
            "--report",
            "har",
            "--report-dir",
            REPORT_DIR,
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    dt = time.time() - t0
    out = proc.stdout + proc.stderr
    statuses: dict[str, int] = {}
    for har in Path(REPORT_DIR).glob("*.json"):
        for entry in json.loads(har.read_text())["log"]["entries"]:
            code = str(entry["response"]["status"])
            statuses[code] = statuses.get(code, 0) + 1
    import httpx

    print(out[-6000:], flush=True)
    try:
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    except httpx.HTTPError as exc:
        metrics = ""
        print(f"ingress unreachable after the run: {exc}", flush=True)
    scored = sum(
        int(float(n))
        for labels, n in re.findall(r"^kvray_http_requests_total\{([^}]*)\} (\S+)$", metrics, re.M)
        if 'route="/score' in labels and 'code="2xx"' in labels
    )
    summary = [
        line for line in out.splitlines() if re.search(r"passed|failed|error|cases", line, re.I)
    ]
    pub.close()
    stop_http()
    runtime.stop("fuzz")
    ray.shutdown()
    text = write_report(
        args.out,
        "kvray HTTP fuzzing (schemathesis)",
        [
            f"Target: `{base}` (what `start_http` returns: the Serve replica's own HTTP door, "
            "direct ingress, msgspec bodies; the schema is its `/openapi.json`, built from the "
            "same msgspec Structs). "
            f"`st run` exit code {proc.returncode} in {dt:.0f} s; check: not_a_server_error; "
            f"{args.examples} cases per operation; {sum(statuses.values()):,} HTTP requests "
            f"recorded (HAR), by status: {dict(sorted(statuses.items()))}; 5xx: "
            f"{sum(n for c, n in statuses.items() if c.startswith('5'))}; requests scored by the "
            f"ingress: {scored:,}",
            "```\n" + "\n".join(summary[-25:]) + "\n```",
        ],
    )
    print(text)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
