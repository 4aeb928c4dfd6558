"""Applying decoded event batches to an index backend: keying, hash-contract checks, TTLs.

This is the whole write path of a shard, as plain Python: ``IndexWriter.apply_batch`` turns one
holder's events into backend ``add``/``remove``/``clear_pod`` calls, keyed either by kvray request
keys (default; immune to the pods' hash settings) or by the pods' engine keys. It also

* checks each pod's hash contract (re-hashes ``BlockStored`` blocks whose parent digest is known)
  and counts mismatches per holder;
* holds speculative entries (``record_route``) until their TTL passes;
* remembers when each holder was last heard from, so silent holders can be dropped;
* counts a holder's extra copies of a block: vLLM does not de-duplicate (a recomputed block is
  stored again under the same hash) and publishes one ``BlockRemoved`` per copy, so a removal
  only drops the block when it was the last copy (backends with ``ReportsHeld``: all of
  kvray's).

Invariant: nothing here raises on event content; problems are counted in ``ApplyResult``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from kvray.core.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, as_u64
from kvray.core.fast import chain_msgpack, xor_u64
from kvray.core.hashing import BlockHasher, event_key
from kvray.core.index.base import (
    SPECULATIVE,
    IndexBackend,
    SpeculativeEntries,
    engine_ops,
    held_op,
    normalize_tier,
)
from kvray.core.keys import LoRA, MMFeature, extra_keys, model_root, model_tag, request_keys
from kvray.core.routing import PoolGauges
from kvray.errors import ConfigError, MalformedFrame
from kvray.types import GPU, PodId, Tier

KeyMode = Literal["request", "engine"]


@dataclass(slots=True, frozen=True)
class ModelHashing:
    """How a model's pods hash blocks (for engine keys and the contract check)."""

    block_size: int = 16
    """Tokens per block (vLLM ``--block-size``)."""
    hasher: BlockHasher | None = None
    """The pods' algorithm and seed; None when unknown (xxhash with no seed): no checks."""
    lora_paths: Mapping[str, str] = field(default_factory=dict)
    """LoRA name → path, needed to reproduce vLLM ≥ 0.24's tagged LoRA extra key."""


@dataclass(slots=True)
class ApplyResult:
    """What one ``apply_batch`` did, as counts (metrics are published from these)."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Blocks (or events) not applied, by reason: ``unknown_parent``, ``no_token_ids``, ..."""

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    def merge(self, other: ApplyResult) -> None:
        self.stored_blocks += other.stored_blocks
        self.removed_blocks += other.removed_blocks
        self.cleared += other.cleared
        for k, v in other.rejected.items():
            self.reject(k, v)


@dataclass(slots=True)
class HashContract:
    """A holder's hash-contract record."""

    checked: int = 0
    """Blocks re-hashed."""
    mismatched: int = 0
    """Blocks whose published hash differed from kvray's recomputation."""
    block_size_mismatch: int = 0
    """Events whose block size differs from the model's configured one (never matchable)."""
    last_mismatch: str = ""
    """A human-readable description of the latest mismatch."""
    run_checked: int = 0
    """Blocks re-hashed since the holder last (re)started (``verify_blocks`` bounds it)."""

    @property
    def status(self) -> str:
        if self.mismatched or self.block_size_mismatch:
            return "mismatch"
        return "ok" if self.checked else "unchecked"

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checked": self.checked,
            "mismatched": self.mismatched,
            "block_size_mismatch": self.block_size_mismatch,
            "last_mismatch": self.last_mismatch,
        }


_DIGEST_CACHE_MAX = 1 << 16  # digests kept to check child events (~80 B each: ~5 MiB)


class Keyer:
    """Prompt → index keys, in one key mode, for any model (shared by writers and clients).

    Args:
        hashing: model name → its ``ModelHashing``.
        key_mode: ``"request"`` (default) or ``"engine"``.
    """

    def __init__(self, hashing: Callable[[str], ModelHashing], key_mode: KeyMode = "request"):
        if key_mode not in ("request", "engine"):
            raise ConfigError(f"key_mode must be 'request' or 'engine', got {key_mode!r}")
        self.hashing = hashing
        self.key_mode = key_mode

    def block_keys(
        self,
        tokens: Sequence[int],
        model: str,
        *,
        lora: LoRA | str | None = None,
        cache_salt: str | None = None,
        mm: Sequence[MMFeature] = (),
    ) -> list[int]:
        """The index keys of every full block of a prompt."""
        h = self.hashing(model)
        n = len(tokens) // h.block_size
        if isinstance(lora, str):
            lora = LoRA(lora, h.lora_paths.get(lora, ""))
        has_extra = lora is not None or cache_salt is not None or bool(mm)
        if self.key_mode == "request":
            extras = (
                extra_keys(n, h.block_size, lora=lora, cache_salt=cache_salt, mm=mm, form="event")
                if has_extra
                else None
            )
            return request_keys(tokens, h.block_size, model_root(model), extras)
        if h.hasher is None:
            raise ConfigError(
                f"engine keys need the hash algorithm and seed of model {model!r}'s pods"
            )
        tagged = (
            extra_keys(n, h.block_size, lora=lora, cache_salt=cache_salt, mm=mm)
            if has_extra
            else None
        )
        tag = model_tag(model)
        return [k ^ tag for k in h.hasher.event_keys(tokens, tagged)]


class IndexWriter:
    """The write path (and key derivation) over one backend.

    Args:
        backend: where keys live.
        hashing: model name → its ``ModelHashing``.
        key_mode: ``"request"`` (default) or ``"engine"``.
        verify_hashes: re-hash ``BlockStored`` blocks to check each pod's hash contract.
        verify_blocks: blocks re-hashed per holder run (until ``clear_holder``); 0: all.
        speculative_ttl_s: lifetime of ``record_route`` entries.
        clock: time source (injected in tests).
    """

    def __init__(
        self,
        backend: IndexBackend,
        hashing: Callable[[str], ModelHashing],
        *,
        key_mode: KeyMode = "request",
        verify_hashes: bool = True,
        verify_blocks: int = 0,
        speculative_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keyer = Keyer(hashing, key_mode)
        self.backend = backend
        self.hashing = hashing
        self.key_mode = key_mode
        self.verify_hashes = verify_hashes
        self.verify_blocks = verify_blocks
        self.speculative_ttl_s = speculative_ttl_s
        self.clock = clock
        self.contracts: dict[PodId, HashContract] = {}
        self.last_seen: dict[PodId, float] = {}
        self.models: dict[PodId, str] = {}
        self._digests: dict[int, bytes] = {}
        self._spec = SpeculativeEntries()
        self.pools = PoolGauges()
        """Each holder's KV pool (blocks held, learned size): the router weighs fullness."""
        # Store/remove with engine keys in one pass where the backend can (memory backends,
        # through the journal); any other backend gets the separate calls.
        self._add_engine, self._remove_engine = engine_ops(backend)
        self._add_held = held_op(backend)
        self._copies: dict[PodId, dict[Tier, dict[int, int]]] = {}
        """Holder → tier → engine key → copies beyond the first (absent: one copy)."""
        self._frames = getattr(backend, "apply_frames", None)
        """The backend's whole-frame path (memory backends, through the journal), or None."""

    # --- writes ----------------------------------------------------------------------------

    def apply_batch(self, holder: PodId, model: str, batch: EventBatch) -> ApplyResult:
        """Apply one holder's decoded batch, in order."""
        res = ApplyResult()
        self.last_seen[holder] = self.clock()
        self.models[holder] = model
        tag = model_tag(model)
        # vLLM emits one BlockRemoved per evicted block; a run of them with the same medium
        # is applied as one removal (they commute), which is ~30 % of a shard's write time.
        removed: list[int | bytes] = []
        removed_medium: str | None = None
        for ev in batch.events:
            if isinstance(ev, BlockRemoved):
                if removed and ev.medium != removed_medium:
                    self._removed(holder, tag, removed, removed_medium, res)
                    removed = []
                removed_medium = ev.medium
                removed.extend(ev.block_hashes)
                continue
            if removed:
                self._removed(holder, tag, removed, removed_medium, res)
                removed = []
            if isinstance(ev, BlockStored):
                self._stored(holder, model, tag, ev, res)
            elif isinstance(ev, AllBlocksCleared):
                self.backend.clear_pod(holder)
                self._spec.forget(holder)
                self._copies.pop(holder, None)
                self.pools.cleared(holder)
                res.cleared += 1
        if removed:
            self._removed(holder, tag, removed, removed_medium, res)
        if self._spec:
            self.expire()
        return res

    def apply_frames(
        self,
        holder: PodId,
        model: str,
        payloads: list[Any],
        start: int,
        limits: tuple[int, int, int],
    ) -> tuple[int, ApplyResult]:
        """Apply a run of one holder's raw frames, ``payloads[start:]`` in order (each the
        frame's bytes or the scan ``EventDecoder.head`` kept of it), in one C call while they
        and the holder allow it, doing what ``apply_batch`` does with their events. Returns the
        index of the first frame not taken (``len(payloads)``: all were; ``start``: none,
        nothing changed) and what was done.

        Taken when the backend has the path (``MemoryIndex.apply_frames``), keys are request
        keys, the frames are in fast form (``kvray.core.fast.scan_frame``), their block size is
        the model's, and the holder has no hash-contract checks left in its run and no
        speculative entries."""
        frames = self._frames
        if frames is None or self.key_mode != "request" or self._spec.holds(holder):
            return start, ApplyResult()
        h = self.hashing(model)
        if self.verify_hashes and h.hasher is not None and self._verifying(holder):
            return start, ApplyResult()
        tiers = self._copies.get(holder)
        copies = tiers.get(GPU) if tiers is not None else None
        fresh = copies is None
        if copies is None:
            copies = {}
        tag, root = model_tag(model), model_root(model)
        try:
            done = frames(holder, payloads, start, tag, root, h.block_size, copies, limits)
        finally:
            if fresh and copies:
                self._copies.setdefault(holder, {})[GPU] = copies
            elif not fresh and not copies:  # the last extra copy went, as _last_copies does
                assert tiers is not None
                del tiers[GPU]
                if not tiers:
                    del self._copies[holder]
        if done is None or done.stop == start:
            return start, ApplyResult()
        self.last_seen[holder] = self.clock()
        self.models[holder] = model
        pools = self.pools
        for n in done.pools:
            if n > 0:
                pools.stored(holder, n)
            else:
                pools.removed(holder, -n)
        res = ApplyResult(done.stored, done.removed)
        if done.unknown_parent:
            res.reject("unknown_parent", done.unknown_parent)
        if done.unknown_removed:
            res.reject("unknown_removed", done.unknown_removed)
        if self._spec:
            self.expire()
        return done.stop, res

    def _stored(
        self, holder: PodId, model: str, tag: int, ev: BlockStored, res: ApplyResult
    ) -> None:
        n = len(ev.block_hashes)
        if not n:
            return
        h = self.hashing(model)
        engine: list[int] = xor_u64(ev.block_hashes, tag)
        if ev.block_size != h.block_size:
            self._contract(holder).block_size_mismatch += 1
        if (
            self.verify_hashes
            and ev.has_tokens
            and h.hasher is not None
            and self._verifying(holder)
        ):
            self._check_contract(holder, model, tag, ev, h)
        tier = normalize_tier(ev.medium)
        if tier == GPU:
            self.pools.stored(holder, n)
        if self.key_mode == "engine":
            held = self._add_held(holder, tier, engine)
            if held:
                self._copied(holder, tier, engine, held)
            self._settle(holder, engine)
            res.stored_blocks += n
            return
        if not ev.has_tokens:
            res.reject("no_token_ids", n)
            return
        if ev.parent_block_hash is None:
            parent = model_root(model)
        else:
            found = self.backend.get_engine_map([as_u64(ev.parent_block_hash) ^ tag])[0]
            if found is None:
                res.reject("unknown_parent", n)
                return
            parent = found
        extras = ev.extra_keys
        if extras is None and ev.lora_name is not None:
            extras = [[ev.lora_name]] * n
        try:
            if extras is None or extras.count(None) == len(extras):
                # The common case: hash the tokens straight from the msgpack bytes.
                keys: list[int] = chain_msgpack(ev.token_raw, ev.block_size, parent)
            else:
                keys = request_keys(ev.token_ids, ev.block_size, parent, extras)
        except (MalformedFrame, ValueError, msgspec.ValidationError):
            res.reject("schema", n)
            return
        held = self._add_engine(holder, tier, keys, engine)
        if held:
            self._copied(holder, tier, engine, held)
        self._settle(holder, keys)
        res.stored_blocks += n

    def _copied(self, holder: PodId, tier: Tier, engine: list[int], held: list[int]) -> None:
        """Count another copy of each block ``holder`` stored while already holding it."""
        copies = self._copies.setdefault(holder, {}).setdefault(tier, {})
        for i in held:
            e = engine[i]
            copies[e] = copies.get(e, 0) + 1

    def _last_copies(self, holder: PodId, tier: Tier, engine: list[int]) -> list[int]:
        """The engine keys whose removal drops the block: those with no other copy left (the
        others lose one copy here)."""
        tiers = self._copies[holder]
        copies = tiers.get(tier)
        if not copies or copies.keys().isdisjoint(engine):
            return engine  # the common case, in C
        last: list[int] = []
        for e in engine:
            c = copies.get(e)
            if c is None:
                last.append(e)
            elif c > 1:
                copies[e] = c - 1
            else:
                del copies[e]
        if not copies:
            del tiers[tier]
            if not tiers:
                del self._copies[holder]
        return last

    def _removed(
        self,
        holder: PodId,
        tag: int,
        hashes: list[int | bytes],
        medium: str | None,
        res: ApplyResult,
    ) -> None:
        engine: list[int] = xor_u64(hashes, tag)
        tier = normalize_tier(medium)
        if tier == GPU:
            self.pools.removed(holder, len(hashes))
        if holder in self._copies:
            engine = self._last_copies(holder, tier, engine)
            if not engine:
                return
        if self.key_mode == "engine":
            keys = engine
            self.backend.remove(holder, tier, keys)
        else:
            keys, unknown = self._remove_engine(holder, tier, engine)
            if unknown:
                res.reject("unknown_removed", unknown)
        self._settle(holder, keys)
        res.removed_blocks += len(keys)

    def _settle(self, holder: PodId, keys: Sequence[int]) -> None:
        """The holder's own events supersede its speculative entries for these keys: a store
        confirms them (the real tier holds the block now), a removal refutes them."""
        if self._spec.holds(holder):
            gone = self._spec.discard(holder, keys)
            if gone:
                self.backend.remove(holder, SPECULATIVE, gone)

    def copies(self) -> dict[str, list[tuple[str, int, int]]]:
        """Holder → ``(tier, engine key, extra copies)`` for blocks held more than once (shard
        snapshots carry it, so a restored shard drops such a block at its last removal too)."""
        return {
            str(h): [(str(t), e, c) for t, cs in tiers.items() for e, c in cs.items()]
            for h, tiers in self._copies.items()
        }

    def load_copies(self, copies: Mapping[str, Sequence[tuple[str, int, int]]]) -> None:
        """Replace the copy counts with ``copies()`` output (shard restore)."""
        self._copies = {}
        for h, cs in copies.items():
            for t, e, c in cs:
                self._copies.setdefault(PodId(h), {}).setdefault(Tier(t), {})[e] = c

    # --- hash contract ---------------------------------------------------------------------

    def _verifying(self, holder: PodId) -> bool:
        """Whether this holder's blocks are still re-hashed: ``verify_blocks`` of them agree
        per run of the pod (its hash settings cannot change until it restarts)."""
        if not self.verify_blocks:
            return True
        c = self.contracts.get(holder)
        return c is None or c.run_checked < self.verify_blocks

    def _contract(self, holder: PodId) -> HashContract:
        c = self.contracts.get(holder)
        if c is None:
            c = self.contracts[holder] = HashContract()
        return c

    def _check_contract(
        self, holder: PodId, model: str, tag: int, ev: BlockStored, h: ModelHashing
    ) -> None:
        assert h.hasher is not None
        if ev.parent_block_hash is None:
            parent: bytes | None = None
        else:
            parent = self._digests.get(as_u64(ev.parent_block_hash) ^ tag)
            if parent is None:
                return  # parent digest unknown (checked elsewhere or evicted): cannot verify
        tagged = _tagged_extras(ev, h.lora_paths)
        if tagged is _UNREPRODUCIBLE:
            return  # extras kvray cannot reproduce (LoRA path unknown)
        hasher = h.hasher
        if hasher.block_size != ev.block_size:
            hasher = BlockHasher(hasher.algo, hasher.seed, ev.block_size)
        c = self._contract(holder)
        tokens: Sequence[int] = ev.token_ids
        if self.verify_blocks:  # only what is left of this run's budget (a prefix chains alone)
            tokens = tokens[: (self.verify_blocks - c.run_checked) * hasher.block_size]
        digests = hasher.hashes(tokens, tagged, parent)
        c.checked += len(digests)
        c.run_checked += len(digests)
        bad = 0
        for i, (d, published) in enumerate(zip(digests, ev.block_hashes, strict=False)):
            want = event_key(d)
            got = as_u64(published)
            if want != got:
                bad += 1
                if not c.last_mismatch or bad == 1:
                    c.last_mismatch = (
                        f"block {i} of a BlockStored: published {got:#018x}, kvray computes "
                        f"{want:#018x} with {hasher.algo}, seed {hasher.seed!r}, "
                        f"block size {hasher.block_size}"
                    )
                break  # later blocks chain from a wrong parent; one mismatch says it all
            if len(self._digests) >= _DIGEST_CACHE_MAX:
                self._digests.clear()
            self._digests[got ^ tag] = d
        c.mismatched += bad

    def contract(self, holder: str | None = None) -> dict[str, dict[str, Any]]:
        """Hash-contract status per holder (or of one holder)."""
        if holder is not None:
            c = self.contracts.get(PodId(holder))
            return {holder: (c or HashContract()).as_dict()}
        return {p: c.as_dict() for p, c in self.contracts.items()}

    # --- speculative entries, staleness ----------------------------------------------------

    def record_route(self, holder: PodId, keys: Sequence[int], ttl_s: float | None = None) -> None:
        """Hold ``keys`` for ``holder`` in the speculative tier until the TTL passes."""
        if not keys:
            return
        ttl = self.speculative_ttl_s if ttl_s is None else ttl_s
        self.backend.add(holder, SPECULATIVE, keys)
        self._spec.push(self.clock() + ttl, holder, list(keys))

    def expire(self) -> int:
        """Drop speculative entries whose TTL passed; returns how many entries expired."""
        return self._spec.expire(self.clock(), self.backend)

    def clear_holder(self, holder: PodId) -> None:
        """Forget a holder entirely (restart, removal, silence)."""
        self.backend.clear_pod(holder)
        self._spec.forget(holder)
        self._copies.pop(holder, None)
        self.pools.cleared(holder)
        self.last_seen.pop(holder, None)
        c = self.contracts.get(holder)
        if c is not None:
            c.run_checked = 0  # a restarted pod may hash differently: check it again

    def drop_silent(self, max_silence_s: float) -> list[PodId]:
        """Clear holders not heard from for longer than ``max_silence_s``; returns them."""
        gone = self.silent(max_silence_s)
        self.drop(gone)
        return gone

    def silent(self, max_silence_s: float) -> list[PodId]:
        """Holders not heard from for longer than ``max_silence_s`` (this writer's clock)."""
        cutoff = self.clock() - max_silence_s
        return [p for p, t in self.last_seen.items() if t < cutoff]

    def drop(self, holders: Iterable[PodId]) -> None:
        """Forget ``holders`` and what was learned of them (model, pool size)."""
        for p in holders:
            self.clear_holder(p)
            self.pools.forget(p)
            self.models.pop(p, None)

    def score(
        self,
        keys: Sequence[int],
        weights: Mapping[str, float],
        pods: Collection[str] | None = None,
    ) -> dict[PodId, float]:
        """Backend score after expiring stale speculative entries."""
        if self._spec:
            self.expire()
        return self.backend.score(keys, weights, pods)


_UNREPRODUCIBLE: list[Any] = []


def _tagged_extras(ev: BlockStored, lora_paths: Mapping[str, str]) -> list[Any] | None:
    """Rebuild vLLM ≥ 0.24's tagged extra keys from an event's untagged ones.

    Returns None when no block has extras, ``_UNREPRODUCIBLE`` when they cannot be rebuilt.
    """
    if ev.extra_keys is None or all(e is None for e in ev.extra_keys):
        return None
    out: list[Any] = []
    for i, entry in enumerate(ev.extra_keys):
        if entry is None:
            out.append(None)
            continue
        keys: list[Any] = []
        for j, item in enumerate(entry):
            if isinstance(item, list) and len(item) == 2:
                keys.append(("mm", item[0], item[1]))
            elif isinstance(item, str) and j == 0 and ev.lora_name == item:
                path = lora_paths.get(item)
                if path is None:
                    return _UNREPRODUCIBLE
                keys.append(("lora", item, path))
            elif isinstance(item, str) and i == 0:
                keys.append(("cache_salt", item))
            elif isinstance(item, bytes):
                keys.append(("prompt_embeds", item))
            else:
                return _UNREPRODUCIBLE
        out.append(tuple(keys))
    return out
