"""Names of kvray's actors inside its Ray namespace (shared by runtime, client and serve)."""

from __future__ import annotations

CONTROLLER = "kvray-controller"


def shard_name(i: int) -> str:
    return f"kvray-shard-{i}"


def ingestor_name(i: int) -> str:
    return f"kvray-ingestor-{i}"


def tokenizer_name(i: int) -> str:
    return f"kvray-tokenizer-{i}"
