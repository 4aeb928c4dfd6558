"""kvray's one exception tree; foreign errors are mapped to it at the boundary where they occur.

::

    KvrayError
    ├── ConfigError            a configuration value is missing, unknown or out of range
    ├── MalformedFrame         a ZMQ message or event batch could not be decoded (counted, skipped)
    ├── SequenceGap            a pod's sequence numbers skipped (carries the missing range)
    ├── BackendUnavailable     the index backend (e.g. Redis) cannot be reached
    ├── HashContractMismatch   a pod's block hashes differ from what kvray recomputes
    └── BadRequest             a scoring/routing request is invalid (HTTP 4xx)
"""

from __future__ import annotations


class KvrayError(Exception):
    """Root of every error kvray raises on purpose."""


class ConfigError(KvrayError):
    """A configuration value is missing, unknown or out of range."""


class MalformedFrame(KvrayError):
    """A ZMQ message or an event batch could not be decoded.

    Attributes:
        reason: a short, stable label for metrics (``"frames"``, ``"topic"``, ``"seq"``,
            ``"msgpack"``, ``"schema"``, ``"size"``, ``"token_count"``).
    """

    def __init__(self, message: str, *, reason: str = "schema") -> None:
        super().__init__(message)
        self.reason = reason


class SequenceGap(KvrayError):
    """A pod skipped sequence numbers: ``[first_missing, next_seen)`` never arrived."""

    def __init__(self, pod: str, first_missing: int, next_seen: int) -> None:
        super().__init__(f"pod {pod!r}: seq gap, missing [{first_missing}, {next_seen})")
        self.pod = pod
        self.first_missing = first_missing
        self.next_seen = next_seen


class BackendUnavailable(KvrayError):
    """The index backend cannot be reached or answered with an error."""


class HashContractMismatch(KvrayError):
    """A pod's published block hashes differ from kvray's recomputation."""


class BadRequest(KvrayError):
    """A scoring or routing request is invalid; the message says what is wrong."""
