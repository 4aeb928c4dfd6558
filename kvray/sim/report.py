"""Results of simulated routing runs: per-request records -> metrics, table, CSV/JSON, plots.

Invariant: every number shown or written is computed from the ``RequestRecord`` list by the pure
functions here (``summarize``), so the table, the files and the plots cannot disagree.

Metrics per run:

* hit rate: tokens served from the pods' prefix caches / prompt tokens;
* prefill tokens saved: the tokens served from cache (prefill the fleet did not do);
* load imbalance: coefficient of variation (population std / mean) of the prefill tokens each
  pod computed;
* routing latency: wall time from request to decision (scoring transport included);
* TTFT: simulated time to first token from the pods' prefill queues;
* accuracy (runs whose policy predicts): share of requests where the blocks predicted cached on
  the chosen pod equal the blocks the pod served from cache, split into requests whose pod
  had lost events not yet replayed (``stale``) and the others.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(slots=True, frozen=True)
class RequestRecord:
    """One request of one run."""

    run: str
    request: int
    t: float
    """Arrival time (simulated s)."""
    kind: str
    tenant: str
    lora: str | None
    pod: str
    """Where it was routed."""
    prompt_tokens: int
    cached_tokens: int
    """What the pod reported served from cache."""
    predicted_blocks: float | None
    """Blocks the policy predicted cached on ``pod`` (None: the policy does not predict)."""
    route_s: float
    """Wall time of the routing decision."""
    wait_s: float
    ttft_s: float
    stale: bool
    """The pod had lost event batches not yet replayed when the request was scored."""
    sync_s: float | None = None
    """Wall time waited, before scoring, for kvray to apply every earlier request's events
    (sync runs only)."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population std / mean (0 for an all-zero or empty list)."""
    if not values:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


def _accuracy(records: Sequence[RequestRecord], block_size: int) -> dict[str, Any] | None:
    scored = [r for r in records if r.predicted_blocks is not None]
    if not scored:
        return None

    def part(rs: Sequence[RequestRecord]) -> dict[str, Any]:
        errs = [(r.predicted_blocks or 0.0) - r.cached_tokens // block_size for r in rs]
        exact = sum(abs(e) < 1e-9 for e in errs)
        return {
            "requests": len(rs),
            "accuracy": exact / len(rs) if rs else math.nan,
            "over_predicted": sum(e > 1e-9 for e in errs),
            "under_predicted": sum(e < -1e-9 for e in errs),
            "mean_abs_error_blocks": statistics.fmean(abs(e) for e in errs) if errs else 0.0,
        }

    out = part(scored)
    stale = [r for r in scored if r.stale]
    out["stale"] = part(stale) if stale else None
    out["fresh"] = part([r for r in scored if not r.stale])
    return out


def summarize(
    run: str,
    records: Sequence[RequestRecord],
    pods: Sequence[str],
    block_size: int,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric of one run (see the module docstring).

    Args:
        run: the run's label.
        records: its requests.
        pods: every pod of the fleet (pods that got nothing count as zero load).
        block_size: tokens per block (to turn cached tokens into blocks).
        extra: more fields to carry (e.g. event counters).
    """
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    per_pod = dict.fromkeys(pods, 0)
    per_pod_requests = dict.fromkeys(pods, 0)
    for r in records:
        per_pod[r.pod] = per_pod.get(r.pod, 0) + r.prompt_tokens - r.cached_tokens
        per_pod_requests[r.pod] = per_pod_requests.get(r.pod, 0) + 1
    route_ms = [r.route_s * 1e3 for r in records]
    ttft = [r.ttft_s for r in records]
    syncs = [r.sync_s * 1e3 for r in records if r.sync_s is not None]
    out: dict[str, Any] = {
        "run": run,
        "requests": len(records),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "prefill_tokens_saved": cached,
        "prefill_tokens_computed": prompt - cached,
        "load_cv": coefficient_of_variation(list(per_pod.values())),
        "per_pod_prefill_tokens": per_pod,
        "per_pod_requests": per_pod_requests,
        "route_ms_p50": percentile(route_ms, 50),
        "route_ms_p99": percentile(route_ms, 99),
        "ttft_s_mean": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_s_p50": percentile(ttft, 50),
        "ttft_s_p99": percentile(ttft, 99),
        "sync_ms_p50": percentile(syncs, 50) if syncs else None,
        "sync_ms_p99": percentile(syncs, 99) if syncs else None,
        "accuracy": _accuracy(records, block_size),
    }
    out.update(extra or {})
    return out


def hit_rate_over_time(
    records: Sequence[RequestRecord], bins: int = 20
) -> tuple[list[float], list[float]]:
    """Hit rate per equal slice of simulated time: (slice mid-times, hit rates)."""
    if not records:
        return [], []
    end = max(r.t for r in records) or 1.0
    width = end / bins
    prompt = [0] * bins
    cached = [0] * bins
    for r in records:
        b = min(int(r.t / width), bins - 1)
        prompt[b] += r.prompt_tokens
        cached[b] += r.cached_tokens
    mids = [(b + 0.5) * width for b in range(bins) if prompt[b]]
    rates = [cached[b] / prompt[b] for b in range(bins) if prompt[b]]
    return mids, rates


# --- presentation ---------------------------------------------------------------------------


def table_rows(summaries: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The results table as (header, rows) of strings, oracle-relative hit rate included."""
    oracle = next((s["hit_rate"] for s in summaries if s["run"] == "oracle"), None)
    header = [
        "policy", "hit rate", "% of oracle", "prefill saved (tok)", "load CV",
        "route p50 ms", "route p99 ms", "TTFT p50 s", "TTFT p99 s", "accuracy",
    ]  # fmt: skip
    rows = []
    for s in summaries:
        acc = s.get("accuracy")
        rel = f"{100 * s['hit_rate'] / oracle:.1f}%" if oracle else "-"
        rows.append(
            [
                s["run"],
                f"{100 * s['hit_rate']:.1f}%",
                rel,
                f"{s['prefill_tokens_saved']:,}",
                f"{s['load_cv']:.2f}",
                f"{s['route_ms_p50']:.2f}",
                f"{s['route_ms_p99']:.2f}",
                f"{s['ttft_s_p50']:.3f}",
                f"{s['ttft_s_p99']:.3f}",
                "-" if acc is None else f"{100 * acc['accuracy']:.2f}% (n={acc['requests']})",
            ]
        )
    return header, rows


def render_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The results table as aligned plain text (for logs and terminals alike)."""
    header, rows = table_rows(summaries)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def write_results(
    out_dir: Path,
    summaries: Sequence[Mapping[str, Any]],
    records: Sequence[RequestRecord],
    meta: Mapping[str, Any],
) -> list[Path]:
    """Write ``results.json`` (meta + summaries), ``summary.csv`` and ``requests.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    res = out_dir / "results.json"
    res.write_text(json.dumps({**meta, "runs": list(summaries)}, indent=2, default=str))
    summary_csv = out_dir / "summary.csv"
    flat = [
        "run", "requests", "hit_rate", "prefill_tokens_saved", "prefill_tokens_computed",
        "load_cv", "route_ms_p50", "route_ms_p99", "ttft_s_mean", "ttft_s_p50", "ttft_s_p99",
        "sync_ms_p50",
    ]  # fmt: skip
    with summary_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*flat, "accuracy", "accuracy_fresh", "accuracy_stale"])
        for s in summaries:
            acc = s.get("accuracy") or {}
            stale = acc.get("stale") or {}
            w.writerow(
                [s[k] for k in flat]
                + [
                    acc.get("accuracy", ""),
                    (acc.get("fresh") or {}).get("accuracy", ""),
                    stale.get("accuracy", ""),
                ]
            )
    req_csv = out_dir / "requests.csv"
    names = [f.name for f in fields(RequestRecord)]
    with req_csv.open("w", newline="") as f:
        dw = csv.DictWriter(f, fieldnames=names)
        dw.writeheader()
        for r in records:
            dw.writerow(asdict(r))
    return [res, summary_csv, req_csv]


def write_plots(
    out_dir: Path,
    summaries: Sequence[Mapping[str, Any]],
    records: Sequence[RequestRecord],
) -> list[Path]:
    """PNG plots: hit rate per policy, hit rate over time, per-pod load, load-weight effect."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and never a GUI backend in actors
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = [s["run"] for s in summaries]

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(runs) + 1.5))
    rates = [100 * s["hit_rate"] for s in summaries]
    ax.barh(runs, rates, color=["#2a7" if r.startswith("kvray") else "#888" for r in runs])
    for y, v in enumerate(rates):
        ax.text(v + 0.5, y, f"{v:.1f}%", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("prefix-cache hit rate (% of prompt tokens served from cache)")
    ax.set_xlim(0, 105)
    ax.set_title("Hit rate per routing policy")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "hit_rate.png", plt))

    fig, ax = plt.subplots(figsize=(10, 4.5))
    by_run: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_run.setdefault(r.run, []).append(r)
    for run in runs:
        xs, ys = hit_rate_over_time(by_run.get(run, []))
        ax.plot(xs, [100 * y for y in ys], label=run, lw=2 if run.startswith("kvray") else 1)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title("Hit rate over time (cold caches at t=0)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    written.append(_save(fig, out_dir / "hit_rate_over_time.png", plt))

    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(runs)), 4.5))
    pods = sorted({p for s in summaries for p in s["per_pod_prefill_tokens"]})
    width = 0.8 / max(len(pods), 1)
    for i, pod in enumerate(pods):
        vals = [s["per_pod_prefill_tokens"].get(pod, 0) / 1e3 for s in summaries]
        ax.bar([x + i * width for x in range(len(runs))], vals, width, label=pod)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(runs))], runs, rotation=30, ha="right")
    ax.set_ylabel("prefill tokens computed (thousands)")
    ax.set_title("Per-pod load (prefill work each pod did)")
    ax.legend(fontsize=6, ncol=4)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "pod_load.png", plt))

    sweep = sorted(
        (
            (float(s["load_weight"]), s)
            for s in summaries
            if s.get("load_weight") is not None
            and s.get("freshness") == "sync"
            and not s.get("batches_dropped")
        ),
        key=lambda ws: ws[0],
    )
    if len(sweep) >= 2:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ws = [w for w, _ in sweep]
        ax.plot(ws, [100 * s["hit_rate"] for _, s in sweep], "o-", label="hit rate (%)")
        ax.set_xlabel("load_weight")
        ax.set_ylabel("hit rate (%)")
        ax2 = ax.twinx()
        ax2.plot(ws, [s["ttft_s_p99"] for _, s in sweep], "s--", color="#c44", label="TTFT p99")
        ax2.plot(ws, [s["load_cv"] for _, s in sweep], "^:", color="#a6c", label="load CV")
        ax2.set_ylabel("TTFT p99 (s) / load CV")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
        ax.set_title("kvray score - load_weight x normalised load")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "load_weight.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
