"""Small helpers shared by the benchmark scripts: percentiles and markdown tables."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(path: str | Path, title: str, sections: Sequence[str]) -> str:
    """Write a markdown report with a machine header; returns its text."""
    head = (
        f"# {title}\n\n{time.strftime('%Y-%m-%d %H:%M:%S')} · Python {platform.python_version()}"
        f" · {platform.machine()}\n"
    )
    text = head + "\n" + "\n\n".join(sections) + "\n"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return text


def init_local_ray() -> None:
    """Start a private local Ray cluster the way kvray's tests do (quiet, 256 MiB store)."""
    import ray

    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        object_store_memory=256 * 2**20,
    )
