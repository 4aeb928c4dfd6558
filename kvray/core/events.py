"""vLLM's KV-event wire types, mirrored as msgspec Structs, and the one decoder kvray uses.

A payload is one msgpack event batch ``[ts, events, data_parallel_rank]`` (or a map with those
keys). Events are maps tagged by ``"type"`` (vLLM ≥ 0.24) or positional arrays whose first element
is the type name (vLLM ≤ 0.23). Unknown fields are ignored; new vLLM fields are declared with
defaults at the end, as vLLM itself does, so old frames keep decoding.

Invariant: ``EventDecoder.decode`` returns an ``EventBatch`` or raises ``MalformedFrame``; no
other exception escapes, whatever the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from kvray.core.fast import msgpack_u32_count, scan_frame
from kvray.errors import MalformedFrame

U64 = Annotated[int, msgspec.Meta(ge=0)]
BlockHash = U64 | bytes
"""A block hash as published: a u64 (vLLM default) or the raw digest bytes."""

_NO_TOKENS = msgspec.Raw(b"\x90")  # an empty msgpack array


class BlockStored(
    msgspec.Struct, tag=True, tag_field="type", gc=False, rename={"token_raw": "token_ids"}
):
    """New full blocks entered a pod's prefix cache (one event per request step)."""

    block_hashes: list[BlockHash]
    """Hashes of the stored blocks, in prompt order."""
    parent_block_hash: BlockHash | None = None
    """Hash of the block just before the first stored block; nil when they start at token 0."""
    token_raw: msgspec.Raw = _NO_TOKENS
    """The wire's ``token_ids`` (all tokens of all stored blocks, n_blocks × block_size), kept
    as msgpack bytes: the write path hashes them in place (``core.fast.chain_msgpack``) instead
    of building an int per token. ``EventDecoder`` checks they are u32 ints of the right count;
    ``token_ids`` decodes them."""
    block_size: int = 16
    """Tokens per block on that pod."""
    lora_id: int | None = None
    """Deprecated integer LoRA id."""
    medium: str | None = None
    """Storage tier (``"GPU"``, ``"CPU"``, ...); nil means GPU."""
    lora_name: str | None = None
    """LoRA adapter name, when the request used one."""
    extra_keys: list[Any] | None = None
    """Per block, the UNTAGGED extra keys vLLM hashed (LoRA name, salt, ``[mm_id, offset]``)."""
    group_idx: int | None = None
    """KV-cache group (hybrid models)."""

    @property
    def has_tokens(self) -> bool:
        """True unless ``token_ids`` is empty (an empty msgpack array is one byte)."""
        return len(self.token_raw) > 1

    @property
    def token_ids(self) -> list[int]:
        """The tokens as ints (decoded on each access; the hot path never needs them)."""
        return msgspec.msgpack.decode(self.token_raw, type=list[int])  # type: ignore[no-any-return]


class BlockRemoved(msgspec.Struct, tag=True, tag_field="type", gc=False):
    """Blocks left a pod's prefix cache (vLLM emits one per evicted block)."""

    block_hashes: list[BlockHash]
    """Hashes of the removed blocks."""
    medium: str | None = None
    """Tier they were removed from; nil means GPU."""
    group_idx: int | None = None
    """KV-cache group (hybrid models)."""


class AllBlocksCleared(msgspec.Struct, tag=True, tag_field="type", gc=False):
    """The pod's prefix cache was reset: it now holds nothing (no removals precede this)."""


class _BlockStoredArr(BlockStored, array_like=True, tag="BlockStored"):
    pass


class _BlockRemovedArr(BlockRemoved, array_like=True, tag="BlockRemoved"):
    pass


class _AllBlocksClearedArr(AllBlocksCleared, array_like=True, tag="AllBlocksCleared"):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class _BatchArrMap(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class _BatchArrArr(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[_BlockStoredArr | _BlockRemovedArr | _AllBlocksClearedArr]
    data_parallel_rank: int | None = None


class _BatchMapMap(msgspec.Struct, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


class _BatchMapArr(msgspec.Struct, gc=False):
    ts: float
    events: list[_BlockStoredArr | _BlockRemovedArr | _AllBlocksClearedArr]
    data_parallel_rank: int | None = None


@dataclass(slots=True)
class EventBatch:
    """One decoded payload: its timestamp, events (in order) and data-parallel rank."""

    ts: float
    """Publisher wall clock, seconds."""
    events: list[Any]
    """``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` instances (or subclasses)."""
    data_parallel_rank: int | None
    """The engine's DP rank (nil or 0 for the pod itself)."""


@dataclass(slots=True, frozen=True)
class FrameHead:
    """A payload in fast form (``kvray.core.fast.scan_frame``), its events left in the bytes:
    a shard applies it with ``IndexWriter.apply_frames`` and decodes it only if that declines."""

    ts: float
    data_parallel_rank: int | None
    scan: Any = field(default=None, compare=False, repr=False)
    """What the scan found in the payload (it holds the payload), for ``apply_frames``: the
    frame is parsed once."""


@dataclass(slots=True, frozen=True)
class DecodeLimits:
    """Bounds that turn absurd input into ``MalformedFrame(reason="size")`` instead of OOM."""

    max_payload_bytes: int = 64 * 2**20
    """Largest payload accepted (vLLM batches are KBs; 64 MiB is far beyond any real step)."""
    max_events: int = 100_000
    """Most events in one batch."""
    max_blocks_per_event: int = 1 << 20
    """Most block hashes in one event (1 M blocks = 16 M tokens at block size 16)."""


_ARRAY_HEADS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MAP_HEADS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


class EventDecoder:
    """Decodes payloads of any supported form; remembers which event form last worked.

    Build one per ingestor (decoders are cheap but not free) and call ``decode`` per payload.
    """

    def __init__(self, limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits()
        self._arr: list[Any] = [
            msgspec.msgpack.Decoder(_BatchArrMap),
            msgspec.msgpack.Decoder(_BatchArrArr),
        ]
        self._map: list[Any] = [
            msgspec.msgpack.Decoder(_BatchMapMap),
            msgspec.msgpack.Decoder(_BatchMapArr),
        ]

    def head(self, payload: bytes) -> FrameHead | None:
        """The payload's ts and rank when it is in fast form (then ``decode`` cannot fail on
        it), else None. Always None without the C extension."""
        if scan_frame is None or not isinstance(payload, bytes | bytearray | memoryview):
            return None
        got = scan_frame(payload, *self.limit_args, True)
        return None if got is None else FrameHead(*got)

    def decode_lazy(self, payload: bytes) -> EventBatch | FrameHead:
        """``head`` when the payload is in fast form, else ``decode``."""
        return self.head(payload) or self.decode(payload)

    @property
    def limit_args(self) -> tuple[int, int, int]:
        """The limits as ``apply_frames`` takes them."""
        lim = self.limits
        return lim.max_payload_bytes, lim.max_events, lim.max_blocks_per_event

    def decode(self, payload: bytes) -> EventBatch:
        """Decode one payload.

        Raises:
            MalformedFrame: with ``reason`` ``size``, ``msgpack``, ``schema`` or ``token_count``.
        """
        lim = self.limits
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise MalformedFrame(f"payload must be bytes, not {type(payload).__name__}")
        if len(payload) > lim.max_payload_bytes:
            raise MalformedFrame(
                f"payload of {len(payload)} bytes exceeds {lim.max_payload_bytes}", reason="size"
            )
        if not payload:
            raise MalformedFrame("empty payload", reason="msgpack")
        head = payload[0]
        if head in _ARRAY_HEADS:
            decoders = self._arr
        elif head in _MAP_HEADS:
            decoders = self._map
        else:
            raise MalformedFrame(
                f"payload is not a msgpack array or map batch (first byte 0x{head:02x})",
                reason="msgpack",
            )
        first_error: Exception | None = None
        for i, dec in enumerate(decoders):
            try:
                raw = dec.decode(payload)
            except msgspec.ValidationError as exc:
                first_error = first_error or exc
                continue
            except (msgspec.DecodeError, RecursionError, MemoryError, ValueError) as exc:
                raise MalformedFrame(f"invalid msgpack: {exc}", reason="msgpack") from exc
            if i:  # the other event form worked: try it first next time (legacy pods)
                decoders.reverse()
            batch = EventBatch(raw.ts, raw.events, raw.data_parallel_rank)
            self._check(batch, len(payload))
            return batch
        raise MalformedFrame(f"not a vLLM event batch: {_describe(first_error)}", reason="schema")

    def _check(self, batch: EventBatch, payload_len: int) -> None:
        lim = self.limits
        events = batch.events
        if len(events) > lim.max_events:
            raise MalformedFrame(
                f"batch has {len(events)} events, more than {lim.max_events}", reason="size"
            )
        # Every block hash takes at least one byte: a payload shorter than the per-event bound
        # cannot break it, and only BlockStored events have more to check (most events are
        # one-block removals, so this loop is on the hot path).
        count_blocks = payload_len > lim.max_blocks_per_event
        for ev in events:
            cls = ev.__class__
            if cls is BlockStored or cls is _BlockStoredArr:
                self._check_stored(ev)
            elif (
                count_blocks
                and (cls is BlockRemoved or cls is _BlockRemovedArr)
                and len(ev.block_hashes) > lim.max_blocks_per_event
            ):
                n = len(ev.block_hashes)
                raise MalformedFrame(f"BlockRemoved with {n} blocks", reason="size")

    def _check_stored(self, ev: BlockStored) -> None:
        n = len(ev.block_hashes)
        if n > self.limits.max_blocks_per_event:
            raise MalformedFrame(f"BlockStored with {n} blocks", reason="size")
        if ev.block_size <= 0:
            raise MalformedFrame(f"BlockStored block_size must be positive, got {ev.block_size}")
        if ev.has_tokens:
            try:
                ntok = msgpack_u32_count(ev.token_raw)
            except ValueError as exc:
                raise MalformedFrame(f"BlockStored {exc}", reason="schema") from exc
            if ntok and ntok != n * ev.block_size:
                raise MalformedFrame(
                    f"BlockStored has {ntok} token_ids for {n} blocks of {ev.block_size}",
                    reason="token_count",
                )
        if ev.extra_keys is not None and len(ev.extra_keys) != n:
            raise MalformedFrame(
                f"BlockStored has {len(ev.extra_keys)} extra_keys entries for {n} blocks"
            )


class _PeekArr(msgspec.Struct, array_like=True, gc=False):
    ts: Any
    events: msgspec.Raw
    data_parallel_rank: int | None = None


class _PeekMap(msgspec.Struct, gc=False):
    events: msgspec.Raw
    data_parallel_rank: int | None = None


_peek_arr = msgspec.msgpack.Decoder(_PeekArr)
_peek_map = msgspec.msgpack.Decoder(_PeekMap)


def peek_rank(payload: bytes) -> int | None:
    """A batch's data-parallel rank without decoding its events (~100× cheaper than ``decode``).

    Ingestors need the rank to find the stream (pod, rank) before the owning shard decodes.

    Raises:
        MalformedFrame: when the payload is not a batch at all.
    """
    if not payload:
        raise MalformedFrame("empty payload", reason="msgpack")
    head = payload[0]
    dec = _peek_arr if head in _ARRAY_HEADS else _peek_map if head in _MAP_HEADS else None
    if dec is None:
        raise MalformedFrame(
            f"payload is not a msgpack array or map batch (first byte 0x{head:02x})",
            reason="msgpack",
        )
    try:
        return dec.decode(payload).data_parallel_rank  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise MalformedFrame(f"not a vLLM event batch: {_describe(exc)}") from exc
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        raise MalformedFrame(f"invalid msgpack: {exc}", reason="msgpack") from exc


_PATHS = (("$[0]", "`ts`"), ("$[1]", "`events`"), ("$[2]", "`data_parallel_rank`"))


def _describe(exc: Exception | None) -> str:
    """msgspec's error with batch positions named (``$[1][0]`` → ``events[0]``)."""
    text = str(exc)
    for raw, name in _PATHS:
        text = text.replace(raw, name)
    return text.replace("`$.", "`")


def as_u64(h: int | bytes) -> int:
    """A published hash as the u64 events carry by default (raw digests: their last 8 bytes)."""
    if isinstance(h, int):
        return h
    return int.from_bytes(h[-8:], "big")


class WireBlockStored(msgspec.Struct, tag="BlockStored", tag_field="type", omit_defaults=True):
    """``BlockStored`` exactly as vLLM 0.33 declares it, for byte-identical encoding.

    Required fields (no default) are always written, optional ones only when set: the same
    15-field layout makes msgspec emit the same map16 header vLLM does.
    """

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[int] | None = None


class WireBlockRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type", omit_defaults=True):
    """``BlockRemoved`` exactly as vLLM 0.33 declares it."""

    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class WireAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    """``AllBlocksCleared`` exactly as vLLM 0.33 declares it."""


WireEvent = WireBlockStored | WireBlockRemoved | WireAllBlocksCleared


class _WireBatch(msgspec.Struct, array_like=True, omit_defaults=False):
    ts: float
    events: list[WireEvent]
    data_parallel_rank: int | None


class _LegacyBlockStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None


class _LegacyBlockRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class _LegacyAllBlocksCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


class _LegacyBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[_LegacyBlockStored | _LegacyBlockRemoved | _LegacyAllBlocksCleared]
    data_parallel_rank: int | None


_encoder = msgspec.msgpack.Encoder()


def encode_batch(
    events: list[WireEvent], *, ts: float, data_parallel_rank: int | None = 0, legacy: bool = False
) -> bytes:
    """Encode a batch the way vLLM's publisher does: byte-identical to vLLM 0.33 by default.

    With ``legacy=True``, events are positional arrays as vLLM ≤ 0.23 sent them (the fields
    vLLM 0.33 added are dropped).
    """
    if not legacy:
        return _encoder.encode(_WireBatch(ts, events, data_parallel_rank))
    conv: list[Any] = []
    for ev in events:
        if isinstance(ev, WireBlockStored):
            conv.append(
                _LegacyBlockStored(
                    ev.block_hashes,
                    ev.parent_block_hash,
                    ev.token_ids,
                    ev.block_size,
                    ev.lora_id,
                    ev.medium,
                    ev.lora_name,
                )
            )
        elif isinstance(ev, WireBlockRemoved):
            conv.append(_LegacyBlockRemoved(ev.block_hashes, ev.medium))
        else:
            conv.append(_LegacyAllBlocksCleared())
    return _encoder.encode(_LegacyBatch(ts, conv, data_parallel_rank))
