"""``KeyedIndex``: the prompt-level methods every index front shares, written once.

``Indexer`` (in-process) and ``Client`` (a cluster) both turn a prompt's token ids into block
keys with one ``Keyer`` and then score or record keys their own way. The prompt-level methods
(``block_keys``, ``score_tokens``, ``record_route``) are defined here, with one argument list
(LoRA, cache salt, multimodal features), so the fronts cannot drift apart; a front implements
``score_keys`` and ``record_keys``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

from kvray.core.apply import Keyer
from kvray.core.keys import LoRA, MMFeature

Scores = TypeVar("Scores", bound=Mapping[Any, float])
"""What a front's ``score_keys`` returns (holder → score)."""


class KeyedIndex(ABC, Generic[Scores]):
    keyer: Keyer

    def block_keys(
        self,
        tokens: Sequence[int],
        model: str,
        lora: LoRA | str | None = None,
        cache_salt: str | None = None,
        *,
        mm: Sequence[MMFeature] = (),
    ) -> list[int]:
        """The index keys of every full block of ``tokens`` for ``model``."""
        return self.keyer.block_keys(tokens, model, lora=lora, cache_salt=cache_salt, mm=mm)

    @abstractmethod
    def score_keys(self, keys: Sequence[int], pods: Sequence[str] | None = None) -> Scores:
        """Longest-prefix scores of every holder (or ``pods``) for precomputed keys."""

    @abstractmethod
    def record_keys(self, pod: str, keys: Sequence[int], ttl_s: float | None = None) -> None:
        """Hold ``keys`` for ``pod`` as speculative entries for ``ttl_s``."""

    def score_tokens(
        self,
        tokens: Sequence[int],
        model: str,
        pods: Sequence[str] | None = None,
        lora: LoRA | str | None = None,
        *,
        cache_salt: str | None = None,
        mm: Sequence[MMFeature] = (),
    ) -> Scores:
        """Scores of every holder (or ``pods``) for a prompt's token ids."""
        return self.score_keys(self.block_keys(tokens, model, lora, cache_salt, mm=mm), pods)

    def record_route(
        self,
        pod: str,
        model: str,
        tokens: Sequence[int] | None = None,
        *,
        keys: Sequence[int] | None = None,
        lora: LoRA | str | None = None,
        cache_salt: str | None = None,
        ttl_s: float | None = None,
    ) -> None:
        """Record that a prompt was just routed to ``pod`` (speculative entries until its
        events arrive): its ``keys``, else the block keys of ``tokens``."""
        if keys is None:
            keys = self.block_keys(tokens or [], model, lora, cache_salt)
        self.record_keys(pod, keys, ttl_s)
