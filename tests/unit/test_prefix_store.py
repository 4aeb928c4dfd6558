"""PrefixStore: chained lookup, single-source answers, LRU bound and order, stats, routing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvray.core.prefix_store import PrefixStore, first_chunk_route
from kvray.errors import ConfigError

C = 8  # chunk size used throughout: small, so short strings span several chunks


def char_tokens(text: str, salt: int = 0) -> tuple[list[int], list[int], list[int]]:
    """A stand-in tokenizer: one token per character (id = code point + salt)."""
    return (
        [ord(ch) + salt for ch in text],
        list(range(len(text))),
        list(range(1, len(text) + 1)),
    )


def pair_tokens(text: str) -> tuple[list[int], list[int], list[int]]:
    """Another stand-in: one token per two characters, so tokens cross odd chunk boundaries."""
    starts = list(range(0, len(text), 2))
    ends = [min(s + 2, len(text)) for s in starts]
    return [sum(map(ord, text[s:e])) for s, e in zip(starts, ends, strict=True)], starts, ends


def test_exact_repeat_is_complete() -> None:
    store = PrefixStore(chunk_chars=C)
    text = "abcdefghijklmnopqrstuvwxyz"  # 3 full chunks + a 2-char terminal
    ids, starts, ends = char_tokens(text)
    store.insert(text, ids, starts, ends)
    hit = store.lookup(text)
    assert hit.complete and hit.chars == len(text)
    assert list(hit.token_ids) == ids
    assert hit.offsets == list(zip(starts, ends, strict=True))


def test_chunk_aligned_prefix_of_another_text() -> None:
    store = PrefixStore(chunk_chars=C)
    text = "abcdefghijklmnopqrstuvwxyz"
    store.insert(text, *pair_tokens(text))
    query = text[:19] + "XYZ"  # shares 2 full chunks (16 chars), diverges inside chunk 2
    hit = store.lookup(query)
    assert (hit.chars, hit.complete) == (16, False)
    ids, starts, ends = pair_tokens(text)
    k = sum(e <= 16 for e in ends)
    assert list(hit.token_ids) == ids[:k] and list(hit.ends) == ends[:k]
    assert all(e <= hit.chars for e in hit.ends)


def test_short_text_and_miss() -> None:
    store = PrefixStore(chunk_chars=C)
    store.insert("abc", *char_tokens("abc"))
    assert store.lookup("abc").complete
    miss = store.lookup("abd")
    assert (miss.chars, len(miss.token_ids), miss.complete) == (0, 0, False)
    assert store.lookup("").chars == 0


def test_text_ending_on_a_chunk_boundary_needs_the_terminal_key() -> None:
    store = PrefixStore(chunk_chars=C)
    long = "0123456789abcdefXY"
    store.insert(long, *char_tokens(long))
    hit = store.lookup(long[:16])  # two full chunks, but this exact text was never inserted
    assert (hit.chars, hit.complete) == (16, False)
    store.insert(long[:16], *char_tokens(long[:16]))
    assert store.lookup(long[:16]).complete


def test_never_mixes_two_tokenizations() -> None:
    store = PrefixStore(chunk_chars=C)
    a = "abcdefgh" + "ijklmnop" + "qr"
    b = "abcdefgh" + "ZZZ"
    store.insert(a, *char_tokens(a, salt=0))
    # b shares chunk 0 but (as with a merge crossing the chunk) tokenized it differently.
    store.insert(b, *char_tokens(b, salt=1000))
    hit = store.lookup(a)
    # chunk 0 now holds b's tokens, so a's chunk 1 (written under the old chunk 0) is unlinked.
    assert hit.chars == C
    assert list(hit.token_ids) == [ord(ch) + 1000 for ch in "abcdefgh"]
    # Re-inserting a restores a fully linked chain of a's tokens.
    store.insert(a, *char_tokens(a))
    hit = store.lookup(a)
    assert hit.complete and list(hit.token_ids) == char_tokens(a)[0]


def test_same_tokens_keep_entries_and_links() -> None:
    store = PrefixStore(chunk_chars=C)
    a = "abcdefgh" + "ijklmnop" + "qr"
    store.insert(a, *char_tokens(a))
    entries = store.stats().entries
    b = "abcdefgh" + "ijklmnop" + "st"  # same first two chunks, same tokens
    store.insert(b, *char_tokens(b))
    assert store.stats().entries == entries + 1  # only b's terminal entry is new
    assert store.lookup(a).complete and store.lookup(b).complete


def test_lru_bound_and_eviction_order() -> None:
    store = PrefixStore(chunk_chars=C, max_tokens=60)
    texts = [f"{i}" * 24 for i in range(3)]  # 24 tokens each: 3 chunks + an empty terminal
    for text in texts[:2]:
        store.insert(text, *char_tokens(text))
    store.lookup(texts[0])  # texts[0] is now more recently used than texts[1]
    store.insert(texts[2], *char_tokens(texts[2]))  # 75 charged > 60: evict 15
    stats = store.stats()
    assert stats.tokens <= 60 and stats.evictions > 0
    assert store.lookup(texts[0]).complete
    assert store.lookup(texts[2]).complete
    # texts[1] lost its tail first: its root is still there (chains are trimmed from the tail).
    partial = store.lookup(texts[1])
    assert 0 < partial.chars < len(texts[1])


def test_a_text_larger_than_the_bound_keeps_its_head() -> None:
    store = PrefixStore(chunk_chars=C, max_tokens=20)
    text = "abcdefghijklmnopqrstuvwxyzABCDEF"  # 32 tokens in 4 chunks
    store.insert(text, *char_tokens(text))
    assert store.stats().tokens <= 20
    hit = store.lookup(text)
    assert hit.chars == 16 and list(hit.token_ids) == char_tokens(text)[0][:16]


def test_memory_is_linear_for_a_growing_conversation() -> None:
    store = PrefixStore(chunk_chars=C)
    text = ""
    for turn in range(200):
        text += f"turn {turn:03d}: hello.\n"  # 20 chars per turn
        store.insert(text, *char_tokens(text))
    # Per-chunk storage: the final chain (4000 tokens) plus one small terminal per turn.
    assert store.stats().tokens <= len(text) + 200 * C


def test_stats_counts() -> None:
    store = PrefixStore(chunk_chars=C)
    text = "abcdefghijklmnopq"
    store.insert(text, *char_tokens(text))
    store.lookup(text)
    store.lookup(text[:10] + "?")
    store.lookup("nothing in common")
    stats = store.stats()
    assert (stats.lookups, stats.hits, stats.misses, stats.complete_hits) == (3, 2, 1, 1)
    assert stats.hit_tokens == len(text) + C
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert stats.entries == 3 and stats.tokens == len(text)
    store.clear()
    assert store.stats().entries == 0 and store.lookup(text).chars == 0


def test_insert_rejects_inconsistent_input() -> None:
    store = PrefixStore(chunk_chars=C)
    with pytest.raises(ValueError, match="differ in length"):
        store.insert("ab", [1, 2], [0], [1, 2])
    with pytest.raises(ValueError, match="past the text"):
        store.insert("ab", [1], [0], [3])
    with pytest.raises(ConfigError):
        PrefixStore(chunk_chars=0)
    with pytest.raises(ConfigError):
        PrefixStore(max_tokens=0)


def test_lone_surrogates_hash() -> None:
    store = PrefixStore(chunk_chars=C)
    text = "a\ud800b" * 5
    store.insert(text, *char_tokens(text))
    assert store.lookup(text).complete


ROUTE_TEXTS = ["", "hello world", "<|im_start|>system\nYou are a helpful assistant." * 3]


def test_route_is_in_range_and_follows_the_first_chunk() -> None:
    for text in ROUTE_TEXTS:
        for pool in (1, 3, 8):
            assert 0 <= first_chunk_route(text, pool, 16) < pool
    head = "x" * 16
    routes = {first_chunk_route(head + tail, 7, 16) for tail in ("", "a", "b" * 100)}
    assert len(routes) == 1
    with pytest.raises(ConfigError):
        first_chunk_route("x", 0, 16)
    with pytest.raises(ConfigError):
        first_chunk_route("x", 2, 0)


def test_route_is_stable_across_processes() -> None:
    here = [first_chunk_route(t, 1_000_003, 32) for t in ROUTE_TEXTS]
    code = (
        "from kvray.core.prefix_store import first_chunk_route as r\n"
        f"print([r(t, 1_000_003, 32) for t in {ROUTE_TEXTS!r}])"
    )
    for seed in ("1", "2"):  # built-in hash() would differ between these
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == str(here)
