"""vLLM's prefix-cache block hash, reproduced byte for byte (spec §1).

Block ``i``'s digest is ``H((parent_digest, tuple(tokens_i), extra_keys_i))`` where the parent of
block 0 is ``NONE_HASH = H(seed_string)``. ``H`` serialises with pickle protocol 5 or canonical
CBOR and digests with SHA-256 (32 bytes) or xxh3-128 (16 bytes). Events carry the last 8 bytes
of a digest as a big-endian u64 (``event_key``). The chain always carries FULL digests.

Invariant: for every algorithm, ``block_hashes(tokens, ...)`` equals what vLLM 0.33.0 computes
(checked against ``tests/fixtures/block_hashes.json``, including the serialised bytes).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import cbor2
import xxhash

from kvray.errors import ConfigError

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
HASH_ALGOS: tuple[HashAlgo, ...] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")

DEFAULT_SEED = "vllm-none-hash"
"""vLLM's seed string for the sha256 variants when PYTHONHASHSEED is unset."""

_PICKLE_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL on every supported Python (3.8+)


def _ser_pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)


def _ser_cbor(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)  # type: ignore[no-any-return]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xxh128(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)  # type: ignore[no-any-return]


_SERIALISERS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _ser_pickle,
    "sha256_cbor": _ser_cbor,
    "xxhash": _ser_pickle,
    "xxhash_cbor": _ser_cbor,
}
_DIGESTS: dict[str, Callable[[bytes], bytes]] = {
    "sha256": _sha256,
    "sha256_cbor": _sha256,
    "xxhash": _xxh128,
    "xxhash_cbor": _xxh128,
}


def serialize(algo: str, obj: Any) -> bytes:
    """The exact bytes vLLM hashes for ``obj`` under ``algo`` (for byte-level diagnosis)."""
    return _SERIALISERS[_check_algo(algo)](obj)


def _check_algo(algo: str) -> HashAlgo:
    if algo not in _SERIALISERS:
        raise ConfigError(f"unknown hash algorithm {algo!r}; expected one of {HASH_ALGOS}")
    return algo  # type: ignore[return-value]


def event_key(digest: bytes) -> int:
    """The u64 a vLLM event carries for ``digest``: its last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")


def none_hash(algo: str, seed: str | None = None) -> bytes:
    """vLLM's ``NONE_HASH``: the digest of the seed STRING (never converted to an int).

    Args:
        algo: the pod's ``--prefix-caching-hash-algo``.
        seed: the pod's ``PYTHONHASHSEED`` value, or ``None`` when unset. Unset is only
            reproducible for the sha256 variants (``"vllm-none-hash"``); for xxhash variants vLLM
            draws a random seed per process, so ``ConfigError`` is raised.
    """
    algo = _check_algo(algo)
    if seed is None:
        if algo.startswith("xxhash"):
            raise ConfigError(
                f"{algo} with PYTHONHASHSEED unset uses a random NONE_HASH per vLLM process; "
                "set PYTHONHASHSEED on the pods and hash_seed in kvray, or use request keys"
            )
        seed = DEFAULT_SEED
    return _DIGESTS[algo](_SERIALISERS[algo](seed))


def hash_block(
    algo: str, parent: bytes | None, tokens: Sequence[int], extra_keys: Any, none: bytes
) -> bytes:
    """One block's full digest, exactly as vLLM's ``hash_block_tokens``.

    An empty or missing ``parent`` means ``none`` (vLLM tests ``if not parent_block_hash``).
    """
    algo = _check_algo(algo)
    payload = (parent or none, tuple(tokens), extra_keys)
    return _DIGESTS[algo](_SERIALISERS[algo](payload))


@dataclass(slots=True, frozen=True)
class BlockHasher:
    """A pod's hash configuration, ready to hash prompts: algorithm, seed and block size.

    ``hashes()`` is the hot path: one serialise + one digest per full block, with the
    per-block tuples cut in C (``zip(*[iter(tokens)] * block_size)``) instead of slicing.
    """

    algo: HashAlgo = "sha256"
    """vLLM's ``--prefix-caching-hash-algo``."""
    seed: str | None = None
    """The pods' ``PYTHONHASHSEED`` (None: unset)."""
    block_size: int = 16
    """Tokens per block (vLLM default 16)."""

    def __post_init__(self) -> None:
        _check_algo(self.algo)
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")

    @property
    def none_hash(self) -> bytes:
        return none_hash(self.algo, self.seed)

    def hashes(
        self,
        tokens: Sequence[int],
        extra_keys: Sequence[Any] | None = None,
        parent: bytes | None = None,
    ) -> list[bytes]:
        """Full digests of every FULL block of ``tokens`` (a partial tail gets none).

        Args:
            tokens: the prompt's token ids.
            extra_keys: one entry per block (tagged or untagged tuple, or None); None for all.
            parent: the digest before ``tokens[0]`` (None: the prompt starts at token 0).
        """
        ser = _SERIALISERS[self.algo]
        dig = _DIGESTS[self.algo]
        prev = parent or self.none_hash
        out: list[bytes] = []
        append = out.append
        blocks = zip(*[iter(tokens)] * self.block_size, strict=False)
        if extra_keys is None:
            for block in blocks:
                prev = dig(ser((prev, block, None)))
                append(prev)
        else:
            for block, extra in zip(blocks, extra_keys, strict=False):
                prev = dig(ser((prev, block, extra)))
                append(prev)
        return out

    def event_keys(
        self,
        tokens: Sequence[int],
        extra_keys: Sequence[Any] | None = None,
        parent: bytes | None = None,
    ) -> list[int]:
        """The u64 keys vLLM events carry for ``tokens`` (see ``event_key``)."""
        return [int.from_bytes(d[-8:], "big") for d in self.hashes(tokens, extra_keys, parent)]


def coarsen(hashes: Sequence[bytes], ratio: int) -> list[bytes]:
    """Hybrid models' coarse view: a block of ``ratio`` × hash_block_size tokens is named by the
    hash of its last fine block (vLLM's ``BlockHashListWithBlockSize``)."""
    return list(islice(hashes, ratio - 1, None, ratio))
