"""Tokenizer prefix cache: chunk-aligned text prefixes → the token ids of one real tokenization.

Key invariant: every :meth:`PrefixStore.lookup` answer is a prefix of *one* tokenization that was
passed to :meth:`PrefixStore.insert`, for a text that shares the looked-up characters; tokens from
two different inserts are never stitched together.

Layout. The text is cut into ``chunk_chars``-character chunks. Chunk ``j`` is named by a chained
hash, ``h_j = xxh3_64(utf8(chunk_j), seed=h_{j-1})`` with ``h_{-1} = 0``, so ``h_j`` names the
whole prefix ``text[:(j + 1) * chunk_chars]``. The entry under ``h_j`` holds only the tokens whose
end offset falls inside chunk ``j`` (ids, start and end char offsets as ``array('I')``), so a
conversation of T tokens costs O(T) memory however many prefixes it has. A lookup walks the chain
from chunk 0 and concatenates the entries. The text's last, partial chunk is stored under a
*terminal* key (same chain, salted seed): it means "this exact text ended here", so an exact
repeat of a text is answered completely, with no re-tokenization at all.

Consistency. Two texts sharing chunk ``j`` can tokenize it differently (a BPE merge may cross
into text they do not share), so each entry records the version of the parent entry it was
written under. An insert keeps an entry only when its tokens and parent link are unchanged and
otherwise writes a fresh version; a lookup stops at the first entry whose parent link does not
match. Versions are never reused, hence a linked walk is a snapshot of a single insert.

Cost model. Per token: 12 bytes (id, start, end as u32) plus ~0.5 KB per entry of Python overhead
(three arrays and a record), i.e. ~8 bytes per token at 256-char chunks (~60 tokens per chunk).
``lookup``/``insert`` are O(chars) hashing plus O(tokens) C-level array copies. The bound is a
total token count (an entry with no tokens counts as one); eviction is least recently used, and a
walk touches its entries deepest-first so that a chain is evicted from its tail, never from its
root (a missing root would orphan the whole chain).

Hash collisions of the 64-bit chained key are not detected (probability ~2^-64 per pair).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvray.errors import ConfigError

__all__ = [
    "DEFAULT_CHUNK_CHARS",
    "DEFAULT_MAX_TOKENS",
    "PrefixHit",
    "PrefixStore",
    "PrefixStoreStats",
    "first_chunk_route",
]

DEFAULT_CHUNK_CHARS = 256
"""~60 Qwen3 tokens of English text: small enough that a divergence wastes little, large enough
that a 128k-char conversation is a 500-link chain (≈0.3 ms to hash)."""

DEFAULT_MAX_TOKENS = 4_000_000
"""~32 MB of token data at ~8 bytes per token; about 120 conversations of 32k tokens."""

_TERMINAL_SALT = 0x9E3779B97F4A7C15
"""XOR-ed into the seed of a terminal key so that it never names the same thing as a chunk key
(2^64 / golden ratio; any odd constant would do)."""

_U32 = "I"
"""array typecode for ids and char offsets: vocabularies and prompts are far below 2^32."""


def _hash(chunk: str, seed: int) -> int:
    # surrogatepass: Python strings may hold lone surrogates (e.g. from JSON); they must hash,
    # not raise, and they still hash differently from any valid text.
    return xxhash.xxh3_64_intdigest(chunk.encode("utf-8", "surrogatepass"), seed=seed)


def first_chunk_route(text: str, pool_size: int, chunk_chars: int) -> int:
    """Pick the pool member that owns a text's first chunk.

    Uses the same key as the first link of :class:`PrefixStore`'s chain (xxh3_64, seed 0), which
    is stable across processes (unlike the salted built-in ``hash``), so every text sharing a
    first chunk meets the same member, and with it that member's cached prefixes.

    Args:
        text: the prompt or rendered chat.
        pool_size: number of pool members.
        chunk_chars: characters in the first chunk; use the store's ``chunk_chars``.

    Returns:
        A member index in ``range(pool_size)``.

    Raises:
        ConfigError: ``pool_size`` or ``chunk_chars`` is below 1.
    """
    if pool_size < 1:
        raise ConfigError(f"pool_size must be >= 1, got {pool_size}")
    if chunk_chars < 1:
        raise ConfigError(f"chunk_chars must be >= 1, got {chunk_chars}")
    return _hash(text[:chunk_chars], 0) % pool_size


@dataclass(slots=True, frozen=True)
class PrefixHit:
    """The cached part of a text's tokenization, as parallel u32 arrays."""

    chars: int
    """Characters of the looked-up text covered: a multiple of ``chunk_chars``, or the whole
    text when ``complete``. 0 on a miss."""
    token_ids: array[int]
    """Ids of the tokens that end within ``text[:chars]``, in order."""
    starts: array[int]
    """Start char offset of each token."""
    ends: array[int]
    """End char offset (exclusive) of each token; non-decreasing, all ``<= chars``."""
    complete: bool
    """True when this exact text was inserted: ``token_ids`` is its whole tokenization.
    Otherwise the last tokens may belong to a longer text and need re-checking by the caller."""

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """``(start, end)`` pairs, for callers that prefer them over the arrays."""
        return list(zip(self.starts, self.ends, strict=True))


@dataclass(slots=True, frozen=True)
class PrefixStoreStats:
    """Counters of a :class:`PrefixStore`, as plain data."""

    lookups: int
    """Calls to ``lookup``."""
    hits: int
    """Lookups that covered at least one chunk (or a whole short text)."""
    misses: int
    """Lookups that covered nothing."""
    complete_hits: int
    """Lookups answered with a whole tokenization (exact repeats of an inserted text)."""
    hit_tokens: int
    """Tokens returned by lookups, summed."""
    entries: int
    """Entries held now."""
    tokens: int
    """Token charge held now (an entry with no tokens counts as one)."""
    max_tokens: int
    """The bound on ``tokens``."""
    evictions: int
    """Entries evicted by the bound since start."""

    @property
    def hit_rate(self) -> float:
        """Fraction of lookups that were hits (0.0 before the first lookup)."""
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass(slots=True, frozen=True)
class _Entry:
    ids: array[int]
    starts: array[int]
    ends: array[int]
    version: int
    """Unique per write; children record it as their ``parent``."""
    parent: int
    """The version of the parent entry this was written under (0 for chunk 0)."""

    @property
    def cost(self) -> int:
        return max(1, len(self.ids))


class PrefixStore:
    """A bounded LRU map from chunk-aligned text prefixes to their tokens (see module docstring).

    Not thread-safe: callers that share one store across threads hold a lock around calls.
    """

    def __init__(
        self, *, chunk_chars: int = DEFAULT_CHUNK_CHARS, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> None:
        """Create an empty store.

        Args:
            chunk_chars: characters per chunk (the granularity of reuse).
            max_tokens: bound on the total tokens held; least recently used entries go first.

        Raises:
            ConfigError: a bound is below 1.
        """
        if chunk_chars < 1:
            raise ConfigError(f"chunk_chars must be >= 1, got {chunk_chars}")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        self.chunk_chars = chunk_chars
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._tokens = 0
        self._next_version = 1
        self._lookups = 0
        self._hits = 0
        self._complete_hits = 0
        self._hit_tokens = 0
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, text: str) -> PrefixHit:
        """Return the tokens of the longest cached prefix of ``text``.

        Args:
            text: the text about to be tokenized.

        Returns:
            The hit; ``chars == 0`` (and empty arrays) on a miss.
        """
        self._lookups += 1
        size = self.chunk_chars
        full = len(text) // size
        walked: list[int] = []
        found: list[_Entry] = []
        seed, parent = 0, 0
        for j in range(full):
            key = _hash(text[j * size : (j + 1) * size], seed)
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent:
                break
            walked.append(key)
            found.append(entry)
            seed, parent = key, entry.version
        chars = len(found) * size
        complete = False
        if len(found) == full and text:
            key = _hash(text[full * size :], seed ^ _TERMINAL_SALT)
            entry = self._entries.get(key)
            if entry is not None and entry.parent == parent:
                walked.append(key)
                found.append(entry)
                chars, complete = len(text), True
        self._touch(walked)
        ids, starts, ends = array(_U32), array(_U32), array(_U32)
        for entry in found:
            ids.extend(entry.ids)
            starts.extend(entry.starts)
            ends.extend(entry.ends)
        if chars:
            self._hits += 1
            self._hit_tokens += len(ids)
            self._complete_hits += complete
        return PrefixHit(chars, ids, starts, ends, complete)

    def insert(
        self,
        text: str,
        token_ids: Sequence[int],
        starts: Sequence[int],
        ends: Sequence[int],
    ) -> None:
        """Remember the complete tokenization of ``text``.

        Entries already holding the same tokens under the same parent are kept (and touched);
        the others are (re)written. Then the bound is enforced.

        Args:
            text: the tokenized text; an empty text is not stored.
            token_ids: its token ids, in order.
            starts: start char offset of each token.
            ends: end char offset of each token; must be non-decreasing and ``<= len(text)``.

        Raises:
            ValueError: the three sequences differ in length or an offset is past the text.
        """
        if not (len(token_ids) == len(starts) == len(ends)):
            raise ValueError(
                f"token_ids, starts and ends differ in length: "
                f"{len(token_ids)}, {len(starts)}, {len(ends)}"
            )
        if not text:
            return
        if ends and ends[-1] > len(text):
            raise ValueError(f"token offset {ends[-1]} is past the text ({len(text)} chars)")
        size = self.chunk_chars
        full = len(text) // size
        walked: list[int] = []
        seed, parent, lo = 0, 0, 0
        for j in range(full + 1):
            if j < full:
                key = _hash(text[j * size : (j + 1) * size], seed)
                hi = bisect_right(ends, (j + 1) * size, lo)
            else:
                key = _hash(text[full * size :], seed ^ _TERMINAL_SALT)
                hi = len(token_ids)
            parent = self._put(key, parent, token_ids[lo:hi], starts[lo:hi], ends[lo:hi])
            walked.append(key)
            seed, lo = key, hi
        self._touch(walked)
        self._evict()

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._tokens = 0

    def stats(self) -> PrefixStoreStats:
        """Return the counters and current size."""
        return PrefixStoreStats(
            lookups=self._lookups,
            hits=self._hits,
            misses=self._lookups - self._hits,
            complete_hits=self._complete_hits,
            hit_tokens=self._hit_tokens,
            entries=len(self._entries),
            tokens=self._tokens,
            max_tokens=self.max_tokens,
            evictions=self._evictions,
        )

    def _put(
        self,
        key: int,
        parent: int,
        ids: Sequence[int],
        starts: Sequence[int],
        ends: Sequence[int],
    ) -> int:
        """Keep or (re)write the entry under ``key``; return its version."""
        new_ids = array(_U32, ids)
        old = self._entries.get(key)
        if old is not None:
            if (
                old.parent == parent
                and old.ids == new_ids
                and old.starts == array(_U32, starts)
                and old.ends == array(_U32, ends)
            ):
                return old.version
            self._tokens -= old.cost
        entry = _Entry(new_ids, array(_U32, starts), array(_U32, ends), self._next_version, parent)
        self._next_version += 1
        self._entries[key] = entry
        self._tokens += entry.cost
        return entry.version

    def _touch(self, walked: list[int]) -> None:
        # Deepest first, so the root ends most recently used and eviction trims chains from the
        # tail; evicting a root first would orphan (and waste) everything below it.
        for key in reversed(walked):
            self._entries.move_to_end(key)

    def _evict(self) -> None:
        while self._tokens > self.max_tokens and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._tokens -= entry.cost
            self._evictions += 1
