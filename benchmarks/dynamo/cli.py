"""Arguments, the run (both systems per pod count, alternating) and writing the report."""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import benchmarks.dynamo as package
from benchmarks._util import init_local_ray, write_report
from benchmarks.dynamo.dynamo_side import (
    PYTHON_ENV,
    dynamo_phase,
    dynamo_version,
    find_dynamo_python,
    repro_phase,
    run_dynamo,
    run_repro,
)
from benchmarks.dynamo.kvray_side import KVRAY, run_kvray
from benchmarks.dynamo.measure import load1, measured, median_run
from benchmarks.dynamo.profiling import profile_kvray
from benchmarks.dynamo.report import Result, plot, render
from benchmarks.dynamo.workload import build_stream

PROFILE_INTRO = (
    "Accounting and the query breakdown come from the measured run; the py-spy tables from "
    "a second kvray run of the same stream with py-spy attached. 'self' = samples whose "
    "innermost frame is the function (C code such as msgspec, xxhash or "
    "Ray's core worker is billed to the Python frame that called it: `Worker.main_loop` "
    "self time is Ray's C++ core worker); 'inclusive' = samples with the function anywhere "
    "on the stack. Idle threads are excluded. Interpretation and proposed changes: "
    "`docs/dynamo.md`."
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench_dynamo.py",
        description=package.__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--out", default="benchmarks/results/dynamo.md")
    ap.add_argument("--png", default=None, help="default: --out with .png")
    ap.add_argument("--pods", default="16,256", help="comma-separated pod counts")
    ap.add_argument("--blocks", type=int, default=1_000_000, help="block-events per pod count")
    ap.add_argument("--queries", type=int, default=100, help="prompts per size (128, 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the prompts")
    ap.add_argument(
        "--dynamo-python",
        default=None,
        help=f"the interpreter that has ai-dynamo-runtime (default: ${PYTHON_ENV}, else "
        "this python, python3 on PATH or a dynamo-venv next to the repository, whichever "
        "can import dynamo.indexer)",
    )
    ap.add_argument(
        "--dynamo-threads",
        default="4,1",
        help="dynamo.indexer --threads; the first is measured, the others are only checked "
        "for agreement and ingest rate",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="ingest each system this many times, alternating; the tables use each one's median",
    )
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=900,
        help="before each system's phase, wait up to this many seconds for other processes "
        "to use < 0.15 cores (0: do not wait)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="redo a system's phase when others used > 0.25 cores during it",
    )
    ap.add_argument(
        "--kvray-shards",
        type=int,
        default=2,
        help="kvray num_shards (default: kvray's own default)",
    )
    ap.add_argument(
        "--kvray-flush-messages", type=int, default=None, help="kvray events.flush_messages"
    )
    ap.add_argument("--dynamo-phase", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--repro-phase", nargs=2, help=argparse.SUPPRESS)
    return ap


def _one_pod_count(
    args: argparse.Namespace, python: str, pods: int, tmp: Path
) -> tuple[Result, str | None]:
    """Both systems on one stream, ``--repeat`` times each, alternating; then the other
    ``--dynamo-threads`` values and (unless ``--no-profile``) kvray under py-spy."""
    stream = build_stream(pods, args.blocks, args.queries)
    print(
        f"[{pods} pods] stream: {stream.block_events:,} block-events in "
        f"{len(stream.frames):,} batches ({stream.gen_s:.1f} s to generate)",
        flush=True,
    )
    threads = [int(x) for x in str(args.dynamo_threads).split(",")]
    # The systems alternate, --repeat times each: run-to-run noise on a shared VM is
    # ±15 %, and alternating exposes both to the same drift.
    dyns, kvs = [], []
    for r in range(args.repeat):
        run_d = partial(run_dynamo, stream, python, args.rounds, tmp, threads[0])
        dyns.append(measured(run_d, args.quiet_wait, args.retries, "Dynamo"))
        print(f"[{pods} pods] Dynamo: ingest {dyns[-1]['ingest_s']:.2f} s", flush=True)
        run_k = partial(run_kvray, stream, args.rounds, f"benchdyn{pods}r{r}")
        kvs.append(measured(run_k, args.quiet_wait, args.retries, "kvray"))
        print(f"[{pods} pods] kvray: ingest {kvs[-1]['ingest_s']:.2f} s", flush=True)
    dyn, kv = median_run(dyns), median_run(kvs)
    # Other --threads values: agreement and ingest rate only (the table uses the first).
    dyn["alt"] = [run_dynamo(stream, python, args.rounds, tmp, t) for t in threads[1:]]
    profile = None
    if not args.no_profile:
        try:
            profile = profile_kvray(stream, args.rounds, f"benchdynp{pods}", tmp)
        except FileNotFoundError as exc:
            profile = f"py-spy tables skipped: {exc}."
        print(f"[{pods} pods] profiled", flush=True)
    return (stream, dyn, kv), profile


def _measure(
    args: argparse.Namespace, python: str, meta: dict[str, Any]
) -> tuple[list[Result], list[str]]:
    """Every pod count on a fresh local Ray cluster of our own; then Dynamo's repro."""
    import ray

    init_local_ray()  # always a fresh cluster of our own, never one someone else started here
    results, profiles = [], []
    with tempfile.TemporaryDirectory(prefix="bench_dynamo_") as td:
        for pods in [int(x) for x in args.pods.split(",")]:
            result, profile = _one_pod_count(args, python, pods, Path(td))
            meta["example"] = result[1].get("example_answer")
            results.append(result)
            if profile is not None:
                profiles.append(profile)
    ray.shutdown()
    meta["repro"] = [run_repro(python, int(t)) for t in str(args.dynamo_threads).split(",")]
    return results, profiles


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.dynamo_phase:
        dynamo_phase(*args.dynamo_phase)
        return
    if args.repro_phase:
        threads, netns = int(args.repro_phase[0]), args.repro_phase[1] == "1"
        print(json.dumps(repro_phase(args.dynamo_python, threads, netns)))
        return
    python = find_dynamo_python(args.dynamo_python)
    print(f"Dynamo's interpreter: {python}", flush=True)
    KVRAY.shards = args.kvray_shards
    if args.kvray_flush_messages:
        KVRAY.events["flush_messages"] = args.kvray_flush_messages
    meta: dict[str, Any] = {
        "dynamo_version": dynamo_version(python),
        "load_before": f"{load1():.2f}",
    }
    results, profiles = _measure(args, python, meta)
    meta["load_after"] = f"{load1():.2f}"
    meta["profile_intro"] = PROFILE_INTRO
    png = Path(args.png) if args.png else Path(args.out).with_suffix(".png")
    body, ratios = render(results, profiles, args.dynamo_threads, args.rounds, meta)
    note = plot(ratios, png)
    if note:
        body += "\n\n" + note
    text = write_report(args.out, "kvray vs NVIDIA Dynamo's standalone KV indexer", [body])
    print(text)
