"""ZMQ message framing (``[topic, seq, payload]``) and the ``kv@<pod>@<model>`` topic convention.

Invariant: ``parse_frames`` returns ``(topic, seq, payload)`` or raises ``MalformedFrame`` with a
reason label (``frames``, ``topic``, ``seq``); nothing else escapes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from kvray.errors import MalformedFrame

TOPIC_PREFIX = "kv"
SEQ_BYTES = 8
REPLAY_END_SEQ = b"\xff" * 8
"""The seq frame of the replay end marker ``["", "", 0xff×8, ""]``."""


@dataclass(slots=True, frozen=True)
class Topic:
    """A parsed topic: who published and for which model."""

    pod: str
    """Pod id (usually ``ip`` or ``ip:port``)."""
    model: str
    """Served model name (may contain ``/`` and ``@``)."""


_BYTES = (bytes, bytearray, memoryview)


@functools.lru_cache(maxsize=4096)
def _topic_text(topic: bytes) -> str:
    """A topic frame as text (memoised: a fleet has a few topics, sent with every message)."""
    try:
        return topic.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedFrame(f"topic is not UTF-8: {exc}", reason="topic") from exc


def parse_frames(frames: Sequence[bytes]) -> tuple[str, int, bytes]:
    """Split one ZMQ message into (topic text, seq, payload)."""
    if not isinstance(frames, list | tuple) or len(frames) != 3:
        n = len(frames) if isinstance(frames, list | tuple) else type(frames).__name__
        raise MalformedFrame(f"expected 3 frames [topic, seq, payload], got {n}", reason="frames")
    topic_b, seq_b, payload = frames
    if not (
        isinstance(topic_b, _BYTES) and isinstance(seq_b, _BYTES) and isinstance(payload, _BYTES)
    ):
        raise MalformedFrame("frames must be byte strings", reason="frames")
    topic = _topic_text(bytes(topic_b))
    if len(seq_b) != SEQ_BYTES:
        raise MalformedFrame(
            f"seq frame must be {SEQ_BYTES} bytes big-endian, got {len(seq_b)}", reason="seq"
        )
    return topic, int.from_bytes(seq_b, "big"), bytes(payload)


@functools.lru_cache(maxsize=4096)
def parse_topic(
    topic: str, *, default_pod: str | None = None, default_model: str | None = None
) -> Topic:
    """Parse ``kv@<pod>@<model>``; an empty topic (vLLM's default) uses the configured defaults.

    The pod id is the text between the first and second ``@``; the model is everything after the
    second ``@`` (so it may contain ``@``).

    Raises:
        MalformedFrame: (reason ``topic``) for any other shape, or an empty topic with no default.

    Memoised (``Topic`` is immutable): every message of a stream carries the same topic.
    """
    if not topic:
        if default_pod is None or default_model is None:
            raise MalformedFrame(
                "empty topic and no pod/model configured for this endpoint", reason="topic"
            )
        return Topic(default_pod, default_model)
    parts = topic.split("@", 2)
    if len(parts) != 3 or parts[0] != TOPIC_PREFIX or not parts[1] or not parts[2]:
        raise MalformedFrame(f"topic {topic[:200]!r} is not 'kv@<pod>@<model>'", reason="topic")
    return Topic(parts[1], parts[2])


def format_topic(pod: str, model: str) -> str:
    """The topic a pod should publish on (``--kv-events-config '{"topic": ...}'``)."""
    if "@" in pod:
        raise ValueError(f"pod id {pod!r} must not contain '@'")
    return f"{TOPIC_PREFIX}@{pod}@{model}"
