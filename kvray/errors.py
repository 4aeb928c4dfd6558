"""kvray's one exception tree; foreign errors are mapped to it at the boundary where they occur.

::

    KvrayError
    ├── ConfigError            a configuration value is missing, unknown or out of range
    ├── MalformedFrame         a ZMQ message or event batch could not be decoded (counted, skipped)
    ├── BackendUnavailable     the index backend (e.g. Redis) cannot be reached
    └── BadRequest             a scoring/routing request is invalid (HTTP 4xx)

Sequence gaps and hash-contract mismatches are not errors: the pods keep publishing, so they are
healed (replay) or counted (``hash_contract`` in ``/pods`` and the metrics), never raised.
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


class BackendUnavailable(KvrayError):
    """The index backend cannot be reached or answered with an error."""


class BadRequest(KvrayError):
    """A scoring or routing request is invalid; the message says what is wrong."""
