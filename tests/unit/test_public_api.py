"""The public surface is explicit and pinned."""

from __future__ import annotations

import kvray


def test_all_is_pinned_and_sorted() -> None:
    assert kvray.__all__ == sorted(kvray.__all__, key=str.casefold)
    assert set(kvray.__all__) == {
        "BackendUnavailable",
        "BadRequest",
        "Config",
        "ConfigError",
        "IndexConfig",
        "Indexer",
        "KvrayError",
        "MalformedFrame",
        "__version__",
        "connect",
        "load_config",
    }
    for name in kvray.__all__:
        assert hasattr(kvray, name), name


def test_errors_share_one_root() -> None:
    for name in (
        "BackendUnavailable",
        "BadRequest",
        "ConfigError",
        "MalformedFrame",
    ):
        assert issubclass(getattr(kvray, name), kvray.KvrayError)
