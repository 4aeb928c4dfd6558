"""How both HTTP paths (Serve's FastAPI app and each replica's fast path) answer errors."""

from __future__ import annotations

from kvray.errors import BackendUnavailable, BadRequest, ConfigError, KvrayError, MalformedFrame


def error_response(exc: KvrayError) -> tuple[int, str]:
    """The status and ``detail`` for a kvray error: 400 for bad input, 503 when the backend is
    down, else 500. Errors raised inside an actor arrive as Ray task errors that are also
    instances of the cause; the cause's own message is used, not Ray's traceback banner."""
    if isinstance(exc, BackendUnavailable):
        status = 503
    elif isinstance(exc, BadRequest | ConfigError | MalformedFrame):
        status = 400
    else:
        status = 500
    cause = getattr(exc, "cause", None)
    return status, str(cause) if isinstance(cause, KvrayError) else str(exc)


def oversized(content_length: str | None, limit: int) -> str | None:
    """Why a body announced by its ``Content-Length`` is refused (413), or None."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        return f"body of {content_length} bytes exceeds {limit}"
    return None
