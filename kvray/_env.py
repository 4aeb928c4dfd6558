"""The few process-level knobs kvray reads from the environment, typed and prefix-checked.

Everything a user tunes lives in ``Config`` (``kvray.yaml`` + ``KVRAY_<SECTION>__<FIELD>``);
these are only the settings that must be in place before Ray starts.
"""

from __future__ import annotations

import os

RAY_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # binds Ray's local processes to 127.0.0.1
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Replicas serve HTTP themselves (~1 ms p50) instead of via Serve's proxy (~15 ms here).
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
}


def apply_local_defaults() -> None:
    """Set kvray's defaults for a local cluster, without overriding what the user set."""
    for k, v in RAY_QUIET_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def env_str(name: str, default: str | None = None) -> str | None:
    """A ``KVRAY_*`` string knob."""
    if not name.startswith("KVRAY_"):
        raise ValueError(f"kvray env knobs start with KVRAY_, got {name!r}")
    return os.environ.get(name, default)


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``).

    Called once by kvray's own processes (shards, Serve replicas) at the end of their set-up.
    A Ray worker starts with a large heap of GC-tracked objects (Ray, gRPC, pydantic, ...) that
    every full collection walks; the write path allocates short-lived lists fast enough to
    trigger such collections all the time. Measured with ``perf`` in a shard while ingesting:
    12 % of its CPU was the collector walking that start-up heap. Frozen objects are never freed
    (they were not going to be: they are the process's modules and singletons).
    """
    import gc

    gc.collect()
    gc.freeze()
