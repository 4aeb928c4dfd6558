"""The markdown report (tables, targets, profile accounting) and the PNG of the ratios."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._util import table
from benchmarks.dynamo.kvray_side import KVRAY
from benchmarks.dynamo.measure import ms
from benchmarks.dynamo.workload import BLOCK, SIZES, Stream
from kvray.core import fast

Result = tuple[Stream, dict[str, Any], dict[str, Any]]
"""(stream, Dynamo's measures, kvray's measures) for one pod count."""


def compare(
    stream: Stream, dyn: dict[str, Any], kv: dict[str, Any]
) -> tuple[int, int, list[str], dict[str, int]]:
    """(queries compared, disagreeing queries, examples, causes)."""
    n = bad = 0
    examples: list[str] = []
    causes: Counter[str] = Counter()
    for size in SIZES:
        for q, (d, k, t) in enumerate(
            zip(dyn["scores"][size], kv["scores"][size], stream.truth[size], strict=True)
        ):
            n += 1
            if kv["scores_http"][size][q] != k:
                causes["kvray HTTP != kvray.connect()"] += 1
            if d == k:
                if k != t:
                    causes["both differ from the simulated caches"] += 1
                continue
            bad += 1
            for pod in sorted(set(d) | set(k), key=lambda s: int(s[3:])):
                dv, kv_, tv = d.get(pod, 0), k.get(pod, 0), t.get(pod, 0)
                if dv == kv_:
                    continue
                who = "kvray" if kv_ == tv else "Dynamo" if dv == tv else "neither"
                causes[f"{who} matches the simulated cache"] += 1
                if len(examples) < 8:
                    examples.append(
                        f"{size}-block query {q}, {pod}: kvray {kv_}, Dynamo {dv}, "
                        f"simulated cache {tv} blocks"
                    )
    return n, bad, examples, dict(causes)


@dataclass
class _Numbers:
    """One pod count's headline numbers and kvray/Dynamo ratios."""

    be: int
    d_rate: float
    k_rate: float
    d_cpu: float
    k_cpu: float
    k_cpu_act: float
    d_mem: float
    k_mem: float
    k_mem_all: float
    d_rss: float
    k_rss: float
    k_est: float
    p50: dict[str, float]
    p50_128: dict[str, float]

    def mem_ratio(self, k: float) -> float:
        return k / self.d_mem if self.d_mem > 0 else float("nan")


def _numbers(stream: Stream, dyn: dict[str, Any], kv: dict[str, Any]) -> _Numbers:
    be, pairs = stream.block_events, stream.live_pairs

    def p50(size: int) -> dict[str, float]:
        return {
            key: ms(kv[key][size], 50) / ms(dyn["lat"][size], 50)
            for key in ("lat_connect", "lat_http")
        }

    return _Numbers(
        be=be,
        d_rate=be / dyn["ingest_s"],
        k_rate=be / kv["ingest_s"],
        d_cpu=dyn["cpu_s"] / be * 1e6,
        k_cpu=kv["cpu_s"] / be * 1e6,
        k_cpu_act=kv["cpu_actors_s"] / be * 1e6,
        d_mem=dyn["anon_delta"] / pairs,
        k_mem=kv["anon_delta"] / pairs,
        k_mem_all=kv.get("anon_all", float("nan")) / pairs,
        d_rss=dyn["rss_delta_1s"] / pairs,
        k_rss=kv["rss_delta_1s"] / pairs,
        k_est=kv["bytes_estimate"] / pairs,
        p50=p50(1024),
        p50_128=p50(128),
    )


def _rows(x: _Numbers, dyn: dict[str, Any], kv: dict[str, Any]) -> list[list[str]]:
    """The per-pod-count table: ingest, CPU, memory and latency rows."""
    rows = [
        [
            "ingest, block-events/s (first frame sent → all applied)",
            f"{x.k_rate / 1e3:,.0f} k",
            f"{x.d_rate / 1e3:,.0f} k",
            f"{x.k_rate / x.d_rate:.2f}",
        ],
        [
            "CPU s per 1 M block-events (kvray: its Ray processes + the connect() "
            "replica thread / actors only)",
            f"{x.k_cpu:.2f} / {x.k_cpu_act:.2f}",
            f"{x.d_cpu:.2f}",
            f"{x.k_cpu / x.d_cpu:.2f} / {x.k_cpu_act / x.d_cpu:.2f}",
        ],
        [
            "memory per live (block, pod) pair, every copy: RssAnon delta of every kvray "
            "process (shards, controller, ingestor, tokenizer, Serve replica; this process, "
            "which holds the connect() replica and the publishers)",
            f"{x.k_mem_all:.1f} B",
            f"{x.d_mem:.1f} B",
            f"{x.k_mem_all / x.d_mem:.2f}" if x.d_mem > 0 else "n/a",
        ],
        [
            "memory per live (block, pod) pair: private heap growth, RssAnon delta "
            f"(kvray: the {KVRAY.shards} shard processes)",
            f"{x.k_mem:.1f} B",
            f"{x.d_mem:.1f} B",
            f"{x.k_mem / x.d_mem:.2f}" if x.d_mem > 0 else "n/a",
        ],
        [
            "memory per pair: RSS delta (also counts shared pages, e.g. Ray's object store)",
            f"{x.k_rss:.1f} B",
            f"{x.d_rss:.1f} B",
            f"{x.k_rss / x.d_rss:.2f}" if x.d_rss > 0 else "n/a",
        ],
        [
            "memory per pair: kvray shards' own `bytes_estimate` vs Dynamo's RssAnon delta",
            f"{x.k_est:.1f} B",
            f"{x.d_mem:.1f} B",
            f"{x.k_est / x.d_mem:.2f}" if x.d_mem > 0 else "n/a",
        ],
    ]
    for size in SIZES:
        dl = dyn["lat"][size]
        for label, key in (("kvray.connect()", "lat_connect"), ("kvray HTTP", "lat_http")):
            kl = kv[key][size]
            rows.append(
                [
                    f"query {size} blocks p50 / p99 (ms): {label} vs Dynamo HTTP",
                    f"{ms(kl, 50):.2f} / {ms(kl, 99):.2f}",
                    f"{ms(dl, 50):.2f} / {ms(dl, 99):.2f}",
                    f"{ms(kl, 50) / ms(dl, 50):.2f} / {ms(kl, 99) / ms(dl, 99):.2f}",
                ]
            )
    return rows


def _alt_rows(
    stream: Stream, dyn: dict[str, Any], kv: dict[str, Any]
) -> tuple[list[list[str]], list[str]]:
    """Rows and detail lines for the other ``--dynamo-threads`` values (agreement only)."""
    rows, lines = [], []
    for alt in dyn.get("alt", []):
        an, abad, _, acauses = compare(stream, alt, kv)
        rows.append(
            [
                f"… same with Dynamo --threads {alt['threads_flag']} (its ingest: "
                f"{stream.block_events / alt['ingest_s'] / 1e3:,.0f} k block-events/s)",
                f"{abad} of {an}",
                "",
                "",
            ]
        )
        applied_alt = ", ".join(f"{k} {int(v):,}" for k, v in sorted(alt["applied"].items()))
        lines.append(
            f"- Dynamo --threads {alt['threads_flag']}: applied {applied_alt}; "
            + ("; ".join(f"{k}: {v}" for k, v in acauses.items()) or "no disagreement")
            + "."
        )
    return rows, lines


def _runs_line(be: int, dyn: dict[str, Any], kv: dict[str, Any]) -> list[str]:
    d_runs, k_runs = dyn.get("ingest_runs", []), kv.get("ingest_runs", [])
    if len(d_runs) < 2:
        return []
    rates = ", ".join(
        f"{be / d / 1e3:,.0f} k / {be / k / 1e3:,.0f} k = {d / k:.2f}"
        for d, k in zip(d_runs, k_runs, strict=True)
    )
    return [
        f"- ingest over {len(d_runs)} alternating runs of each system (Dynamo / kvray, "
        f"block-events/s = ratio, in run order): {rates}; the tables use each system's median "
        "run (all its measures from that run)."
    ]


def _door_line(kv: dict[str, Any]) -> list[str]:
    if not kv.get("lat_http_noop"):
        return []
    return [
        "- Serve's door against its floor: kvray `/score_tokens` p50 "
        + " / ".join(f"{ms(kv['lat_http'][z], 50):.3f}" for z in SIZES)
        + " ms, a no-op Serve deployment (Starlette `__call__`, msgspec decode of "
        "the same bodies, direct ingress) "
        + " / ".join(f"{ms(kv['lat_http_noop'][z], 50):.3f}" for z in SIZES)
        + f" ms ({' / '.join(str(z) for z in SIZES)} blocks)."
    ]


def _memory_line(stream: Stream, dyn: dict[str, Any], kv: dict[str, Any]) -> str:
    mib = 2**20
    rep_est = kv.get("replica_bytes_estimate", 0)
    return (
        f"- RssAnon deltas: Dynamo {dyn['anon_delta'] / mib:.1f} MiB, kvray shards "
        f"{kv['anon_delta'] / mib:.1f} MiB after `release_memory` (malloc_trim; "
        f"{kv.get('anon_delta_untrimmed', 0) / mib:.1f} MiB before it: freed ZMQ buffers "
        "still resident). "
        f"RSS deltas: Dynamo {dyn['rss_delta'] / mib:.1f} MiB at completion, "
        f"{dyn['rss_delta_1s'] / mib:.1f} MiB 1 s later; kvray shards "
        f"{kv['rss_delta'] / mib:.1f} / {kv['rss_delta_1s'] / mib:.1f} MiB (ingestor "
        f"{kv['ingestor_rss_delta'] / mib:.1f} MiB, not counted); shards' "
        f"`bytes_estimate` {kv['bytes_estimate'] / mib:.1f} MiB; each read replica "
        f"(`kvray.connect()`, every Serve replica) holds another "
        f"{rep_est / mib:.1f} MiB "
        f"({rep_est / max(stream.live_pairs, 1):.1f} B per "
        f"pair, {kv.get('replica_pairs', 0):,} pairs)."
        + (
            " Every copy, RssAnon delta: "
            + ", ".join(f"{r} {v / mib:.1f} MiB" for r, v in kv["anon_by_role"].items())
            + f"; {kv['anon_all'] / mib:.1f} MiB in all."
            if "anon_by_role" in kv
            else ""
        )
    )


def _detail(stream: Stream, dyn: dict[str, Any], kv: dict[str, Any], rounds: int) -> list[str]:
    """The bullet list under a pod count's table."""
    be = stream.block_events
    applied = ", ".join(f"{k} {int(v):,}" for k, v in sorted(dyn["applied"].items()))
    rej = ", ".join(f"{k} {v:,}" for k, v in sorted(kv["rejected"].items())) or "none"
    return [
        f"- stream: {stream.requests:,} requests on {stream.pods} simulated pods "
        f"(capacity {stream.capacity:,} blocks each) → {len(stream.frames):,} batches, "
        f"{stream.events:,} events, {be:,} block-events ({stream.stored_blocks:,} stored, "
        f"{stream.removed_blocks:,} removed); {stream.live_pairs:,} (block, pod) pairs live at "
        f"the end (kvray's shards count {kv['pairs']:,} pairs in {kv['keys']:,} keys).",
        f"- publishing alone took {dyn['publish_s']:.2f} s (Dynamo run) / "
        f"{kv['publish_s']:.2f} s (kvray run); ingest {dyn['ingest_s']:.2f} s / "
        f"{kv['ingest_s']:.2f} s.",
        *_runs_line(be, dyn, kv),
        *_door_line(kv),
        f"- Dynamo applied: {applied}"
        + (" (STALLED)" if dyn.get("stalled") else "")
        + f"; kvray rejected: {rej}.",
        f"- CPU during ingest: Dynamo {dyn['cpu_s']:.2f} s ({dyn['threads']} threads); "
        "kvray " + ", ".join(f"{r} {v:.2f} s" for r, v in sorted(kv["cpu_by_role"].items())) + ".",
        _memory_line(stream, dyn, kv),
        f"- other work on the machine (CPU s of processes outside this benchmark, "
        f"measured over each system's ingest + query phase): "
        f"{dyn['foreign_cpu_s']:.2f} s in {dyn['phase_wall_s']:.1f} s (Dynamo phase), "
        f"{kv['foreign_cpu_s']:.2f} s in {kv['phase_wall_s']:.1f} s (kvray phase); "
        f"before them: {dyn.get('quiet', '?')} / {kv.get('quiet', '?')}; attempt "
        f"{dyn.get('attempt', 1)} / {kv.get('attempt', 1)} kept.",
        f"- latency samples: {len(dyn['lat'][SIZES[0]])} per size and path "
        f"({len(stream.queries[SIZES[0]])} prompts × {rounds} rounds).",
    ]


def _pods_section(stream: Stream, dyn: dict[str, Any], kv: dict[str, Any], rounds: int) -> str:
    """``## N pods``: the table, then the details and any disagreement."""
    n, bad, examples, causes = compare(stream, dyn, kv)
    rows = _rows(_numbers(stream, dyn, kv), dyn, kv)
    rows.append(
        [
            f"queries whose per-pod blocks disagree (Dynamo --threads {dyn['threads_flag']})",
            f"{bad} of {n}",
            "",
            "",
        ]
    )
    alt_rows, alt_lines = _alt_rows(stream, dyn, kv)
    rows += alt_rows
    detail = _detail(stream, dyn, kv, rounds)
    if causes:
        detail.append("- agreement detail: " + "; ".join(f"{k}: {v}" for k, v in causes.items()))
    detail += [f"  - {e}" for e in examples]
    detail += alt_lines
    return (
        f"## {stream.pods} pods\n\n"
        + table(["measure", "kvray", "Dynamo", "kvray/Dynamo"], rows)
        + "\n\n"
        + "\n".join(detail)
    )


def kvray_wrong(stream: Stream, kv: dict[str, Any]) -> int:
    """Queries where kvray (``connect()`` or HTTP) differs from the simulated caches."""

    def nz(d: dict[str, int]) -> dict[str, int]:
        return {p: v for p, v in d.items() if v}

    return sum(
        nz(k) != nz(t) or nz(h) != nz(t)
        for size in SIZES
        for k, h, t in zip(
            kv["scores"][size], kv["scores_http"][size], stream.truth[size], strict=True
        )
    )


def _checks(x: _Numbers, wrong: int) -> list[tuple[str, float, bool]]:
    """(target, value, met) for one pod count."""
    checks = [
        ("ingest ≥ 1.0× Dynamo", x.k_rate / x.d_rate, x.k_rate / x.d_rate >= 1.0),
        (
            "memory per pair, every copy ≤ 1.0× (RssAnon)",
            x.mem_ratio(x.k_mem_all),
            x.d_mem > 0 and x.k_mem_all / x.d_mem <= 1.0,
        ),
        (
            "memory per pair, shards ≤ 1.0× (RssAnon)",
            x.mem_ratio(x.k_mem),
            x.d_mem > 0 and x.k_mem / x.d_mem <= 1.0,
        ),
        (
            "memory per pair ≤ 1.0× (bytes_estimate)",
            x.mem_ratio(x.k_est),
            x.d_mem > 0 and x.k_est / x.d_mem <= 1.0,
        ),
    ]
    for key, label, limit, shown in (
        ("lat_connect", "connect()", 1.0, "1.0×"),
        ("lat_http", "kvray HTTP", 3.0, "3×"),
    ):
        for size, p50 in ((128, x.p50_128), (1024, x.p50)):
            name = f"{label} p50 ≤ {shown} Dynamo HTTP ({size} blocks)"
            checks.append((name, p50[key], p50[key] <= limit))
    checks.append(("kvray's scores wrong (vs the simulated caches)", float(wrong), wrong == 0))
    return checks


def _png_ratios(pods: int, x: _Numbers) -> dict[str, Any]:
    return {
        "pods": pods,
        "ingest rate": x.k_rate / x.d_rate,
        "CPU / M events": x.k_cpu / x.d_cpu,
        "mem/pair (RssAnon)": x.k_mem / x.d_mem if x.d_mem > 0 else 0.0,
        "mem/pair, all copies": x.k_mem_all / x.d_mem if x.d_mem > 0 else 0.0,
        "mem/pair (estimate)": x.k_est / x.d_mem if x.d_mem > 0 else 0.0,
        "connect p50 128": x.p50_128["lat_connect"],
        "connect p50 1024": x.p50["lat_connect"],
        "HTTP p50 128": x.p50_128["lat_http"],
        "HTTP p50 1024": x.p50["lat_http"],
    }


def _accounting(dyn: dict[str, Any], kv: dict[str, Any]) -> str:
    """Where kvray's ingest CPU went (unprofiled run)."""
    by_role = kv["cpu_by_role"]
    ist = kv["ingestor_stats"]
    return (
        f"Ingest accounting (unprofiled run): the {KVRAY.shards} shards, which read their "
        f"pods themselves, used {by_role.get('IndexShard', 0.0):.2f} CPU s "
        f"({ist['messages']:,} messages "
        f"received, applied in {ist['shard_calls']:,} local calls; wall time inside "
        f"`IndexShard.apply` — decode, keys, index, change stream — {kv['apply_s']:.2f} s, "
        "which includes waiting for one of the 2 cores). Following the change stream cost "
        f"the Serve replica {by_role.get('ServeReplica', 0.0):.2f} s and the "
        f"benchmark's `kvray.connect()` replica thread "
        f"{by_role.get('connect() replica', 0.0):.2f} s (counted in kvray's CPU "
        f"above). The ingestor actor ({kv.get('ingestor_actor_messages', 0):,} messages: "
        f"no pod of its own here) used {by_role.get('Ingestor', 0.0):.2f} s; Ray's system "
        f"processes (raylet, GCS, Serve, ...) {by_role.get('ray-system', 0.0):.2f} s; Dynamo's "
        f"whole process {dyn['cpu_s']:.2f} s."
    )


def _breakdown(dyn: dict[str, Any], kv: dict[str, Any]) -> str:
    """The query path's pieces, p50 per size, as a table with its caption."""
    brows = []
    for size in SIZES:
        b = kv["breakdown"][size]
        brows.append(
            [f"{size}"]
            + [f"{b[k]:.3f}" for k in ("keys", "noop", "one_shard", "fan_out", "replica")]
            + [f"{b['total']:.3f}"]
            + [f"{ms(kv['lat_http'][size], 50):.3f}", f"{ms(dyn['lat'][size], 50):.3f}"]
        )
    return (
        "Query path, p50 in ms (unprofiled run): `block_keys` on the client; a no-op Ray "
        "actor call carrying the same keys (the floor of any actor call); one shard's "
        f"`score`; the {KVRAY.shards}-shard fan-out `score_keys` (a client without a replica);"
        " `score_keys` on the client's in-process replica (what `kvray.connect()` does by "
        "default); all of `score_tokens`; "
        "kvray HTTP; "
        "Dynamo HTTP.\n\n"
        + table(
            ["blocks", "block_keys", "no-op actor call", "1 shard score"]
            + [f"{KVRAY.shards}-shard fan-out", "replica score_keys", "score_tokens"]
            + ["kvray HTTP", "Dynamo HTTP"],
            brows,
        )
    )


def _dominates(dyn: dict[str, Any], kv: dict[str, Any]) -> str:
    b1, b2 = kv["breakdown"][SIZES[0]], kv["breakdown"][SIZES[-1]]
    d1, d2 = ms(dyn["lat"][SIZES[0]], 50), ms(dyn["lat"][SIZES[-1]], 50)
    return (
        "**What dominates the query path.** A no-op Ray actor call alone takes "
        f"{b1['noop']:.2f} / {b2['noop']:.2f} ms ({SIZES[0]} / {SIZES[-1]} blocks), "
        f"{b1['noop'] / d1:.1f}× / {b2['noop'] / d2:.1f}× Dynamo's whole HTTP query, and "
        f"the {KVRAY.shards}-shard fan-out {b1['fan_out']:.2f} / {b2['fan_out']:.2f} ms: "
        "that is why queries go to the in-process replica, where the prefix walk takes "
        f"{b1['replica']:.3f} / {b2['replica']:.3f} ms and computing the keys is "
        f"{100 * b1['keys'] / b1['total']:.0f} % / {100 * b2['keys'] / b2['total']:.0f} % "
        "of `score_tokens`. HTTP (the replica's fast path) adds "
        f"{ms(kv['lat_http'][SIZES[0]], 50) - b1['total']:.2f} / "
        f"{ms(kv['lat_http'][SIZES[-1]], 50) - b2['total']:.2f} ms on top of it (uvicorn, "
        "msgspec parsing, the response; see below)."
    )


def _setup(results: list[Result], dynamo_threads: str, meta: dict[str, Any]) -> str:
    return (
        "Setup: Dynamo `ai-dynamo-runtime` "
        f"{meta['dynamo_version']} (`python -m dynamo.indexer --block-size {BLOCK} --threads "
        f"{dynamo_threads.split(',')[0]}`, pods registered with `POST /register`, "
        "queried with `POST /query`, ingestion complete when the sum of "
        "`dynamo_kvrouter_kv_cache_events_applied` reaches the events sent); kvray: "
        f"{KVRAY.shards} shards, 1 ingestor, request keys, hash checks on (defaults), write path "
        + ("compiled (`kvray._speedups`)" if fast.COMPILED else "pure Python (no C extension)")
        + (f", flush_messages {KVRAY.events['flush_messages']}" if KVRAY.events else "")
        + ", pods added with `client.add_pod`, complete "
        "when `wait_applied(client, expect)` returns; HTTP `POST /score_tokens` (Ray Serve, direct "
        "ingress). Same pre-encoded vLLM 0.33 frames from binding PUB sockets, same order, "
        "same prompts, same keep-alive HTTP client (bodies pre-encoded). "
        f"Machine: {os.cpu_count()} cores; 1-minute load before the run {meta['load_before']}, "
        f"after {meta['load_after']}. "
        + (
            "Dynamo ran in a private network namespace (its HTTP server binds 0.0.0.0)."
            if all(d["netns"] for _, d, _ in results)
            else "Dynamo ran on the host network (no `unshare`): its HTTP port was on 0.0.0.0."
        )
    )


def _repro_section(repro: list[dict[str, Any]]) -> str:
    lines = [
        "## Dynamo's over-count, reduced to 8 events\n",
        "Greedy minimisation of the disagreeing events gave this shape (run by the "
        "benchmark itself, `repro_phase`): a 100-block path; pod B stores blocks 0-4, "
        "5-30, 31-32, 33-80 and pod A stores 0-4, 5-45, 46-99 in interleaved `BlockStored` "
        "events (each also carrying 3 private blocks after its path segment, as a "
        "request's own tail does); then A evicts block 70. Right answer: A 70, B 81.\n",
    ]
    for r in repro:
        lines.append(
            f"- `--threads {r['threads']}`: before the eviction {r['before']}, after it "
            f"{r['after']}"
            + (" — **B credited with A's blocks**" if r["after"].get("B") != 81 else " — right")
        )
    return "\n".join(lines)


def render(
    results: list[Result],
    profiles: list[str],
    dynamo_threads: str,
    rounds: int,
    meta: dict[str, Any],
) -> tuple[str, list[dict[str, Any]]]:
    """The report's markdown body and the ratios for the PNG."""
    sections = [_setup(results, dynamo_threads, meta)]
    targets_rows = []
    ratios_for_png = []
    prof_parts: list[str] = []
    for stream, dyn, kv in results:
        x = _numbers(stream, dyn, kv)
        sections.append(_pods_section(stream, dyn, kv, rounds))
        for name, val, ok in _checks(x, kvray_wrong(stream, kv)):
            targets_rows.append(
                [f"{stream.pods} pods", name, f"{val:.2f}", "pass" if ok else "**FAIL**"]
            )
        prof = [f"### {stream.pods} pods", _accounting(dyn, kv), _breakdown(dyn, kv)]
        prof_parts.append("\n\n".join([*prof, _dominates(dyn, kv)]))
        ratios_for_png.append(_png_ratios(stream.pods, x))
    sections.insert(
        1,
        "## Targets (kvray/Dynamo)\n\n"
        + table(["pods", "target", "value", "result"], targets_rows),
    )
    for i, spied in enumerate(profiles):
        prof_parts[i] += "\n\n" + spied
    sections.append(
        "## Profile (kvray)\n\n" + meta.get("profile_intro", "") + "\n\n" + "\n\n".join(prof_parts)
    )
    if meta.get("repro"):
        sections.append(_repro_section(meta["repro"]))
    if meta.get("example"):
        sections.append(
            "## Dynamo's answer, as observed (first prompt, trimmed)\n\n```json\n"
            + json.dumps(meta["example"], indent=None)[:1200]
            + "\n```"
        )
    return "\n\n".join(sections), ratios_for_png


_PNG_TARGETS = {
    "ingest rate": 1.0,
    "mem/pair (RssAnon)": 1.0,
    "mem/pair, all copies": 1.0,
    "mem/pair (estimate)": 1.0,
    "connect p50 128": 1.0,
    "connect p50 1024": 1.0,
    "HTTP p50 128": 3.0,
    "HTTP p50 1024": 3.0,
}


def plot(ratios: list[dict[str, Any]], path: Path) -> str | None:
    """Bars of the kvray/Dynamo ratios per pod count (log scale), targets in red; returns a
    note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is not importable."
    labels = [k for k in ratios[0] if k != "pods"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ratios)
    for i, r in enumerate(ratios):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [r[k] for k in labels], width, label=f"{r['pods']} pods")
        for x, k in zip(xs, labels, strict=True):
            ax.annotate(f"{r[k]:.2f}", (x, r[k]), ha="center", va="bottom", fontsize=7)
    for j, k in enumerate(labels):
        if k in _PNG_TARGETS:
            ax.hlines(_PNG_TARGETS[k], j - width / 2, j + width * (len(ratios) - 0.5), colors="red")
    ax.plot([], [], color="red", label="target")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(ratios) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel("kvray / Dynamo (log)")
    ax.set_title("kvray vs Dynamo standalone indexer (ingest: higher is better; rest: lower)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
