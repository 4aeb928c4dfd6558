"""How the HTTP ingress answers errors: a status and a ``detail`` message, never a 5xx for bad
input."""

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


def exception_response(exc: BaseException) -> tuple[int, str] | None:
    """The status and ``detail`` for an exception raised while answering a request, or None
    when it is a bug (the caller logs it and answers 500).

    kvray's own errors map by ``error_response``; an actor that died, restarts or timed out
    (any Ray error but a task's own exception) is a 503; a client that went away mid-body, 400.
    """
    if isinstance(exc, KvrayError):
        return error_response(exc)
    from ray.exceptions import RayError, RayTaskError
    from starlette.requests import ClientDisconnect

    if isinstance(exc, RayTaskError):  # an actor raised something kvray does not raise: a bug
        return None
    if isinstance(exc, RayError):
        return 503, f"kvray's backend is unavailable ({type(exc).__name__}); retry"
    if isinstance(exc, ClientDisconnect):
        return 400, "client disconnected"
    return None


def oversized(content_length: str | None, limit: int) -> str | None:
    """Why a body announced by its ``Content-Length`` is refused (413), or None."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        return f"body of {content_length} bytes exceeds {limit}"
    return None
