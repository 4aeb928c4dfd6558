"""The client's and the indexer's prompt-level methods are one implementation, and every
synchronous client method takes exactly the arguments of its ``*_async`` twin."""

from __future__ import annotations

import inspect

import pytest

from kvray.client import Client
from kvray.core.keyed import KeyedIndex
from kvray.indexer import Indexer


@pytest.mark.parametrize("name", ["block_keys", "score_tokens", "record_route"])
def test_prompt_methods_are_written_once(name: str) -> None:
    assert getattr(Indexer, name) is getattr(KeyedIndex, name)
    assert getattr(Client, name) is getattr(KeyedIndex, name)


@pytest.mark.parametrize(
    "name",
    [
        "score_keys", "score_tokens", "score_prompt", "tokenize", "tokenize_chat", "pools",
        "route", "route_keys", "record_keys", "remove_pod", "pods", "stats",
    ],
)  # fmt: skip
def test_sync_twins_take_the_async_arguments(name: str) -> None:
    sync, coro = getattr(Client, name), getattr(Client, f"{name}_async")
    assert inspect.iscoroutinefunction(coro) and not inspect.iscoroutinefunction(sync)
    assert list(inspect.signature(sync).parameters) == list(inspect.signature(coro).parameters)


def test_cache_salt_reaches_scores_and_speculative_entries() -> None:
    """The salt is part of the keys everywhere (``Client.score_tokens`` once ignored it)."""
    ix = Indexer()
    toks = list(range(64))
    salted = ix.block_keys(toks, "m", None, "tenant-a")
    assert salted != ix.block_keys(toks, "m") and len(salted) == 4
    ix.record_route("p", "m", toks, cache_salt="tenant-a")
    assert ix.score_tokens(toks, "m", cache_salt="tenant-a") == {"p": 4.0}
    assert ix.score_tokens(toks, "m") == {}  # unsalted keys are other keys
    assert ix.score_keys(salted) == {"p": 4.0}
