"""Longest-consecutive-prefix scoring (spec §5) and the merge of per-shard results.

Score of holder p for keys ``K0..Kn`` = sum, over the unbroken run ``K0..K(r-1)`` that p holds
(in any tier), of the weight of the best tier p holds each block in. A holder lacking ``K0`` is
absent from the result, never 0. This module is the reference: backends may compute the same
thing faster (the memory backend walks bitsets), and tests check them against it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from kvray.types import PodId, Tier


def score_from_holders(
    per_block: Sequence[Mapping[PodId, Collection[Tier]]],
    weights: Mapping[str, float],
    pods: Collection[str] | None = None,
) -> dict[PodId, float]:
    """Score holders from the per-block holder → tiers view.

    Args:
        per_block: for each prompt block in order, the holders of that block and their tiers.
        weights: tier → weight; a tier not named weighs 1.0.
        pods: when given, only these holders are scored.

    Returns:
        holder → score, for holders that hold block 0 (and pass the filter).
    """
    if not per_block:
        return {}
    allowed = None if pods is None else set(pods)
    scores: dict[PodId, float] = {}
    alive = [p for p in per_block[0] if allowed is None or p in allowed]
    for block in per_block:
        still = []
        for pod in alive:
            tiers = block.get(pod)
            if not tiers:
                continue
            scores[pod] = scores.get(pod, 0.0) + max(weights.get(t, 1.0) for t in tiers)
            still.append(pod)
        alive = still
        if not alive:
            break
    return scores


def merge_scores(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Union per-shard results. Shards own disjoint holders, so this is a plain dict union."""
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part)
    return merged


def normalize_scores(
    scores: Mapping[PodId, float], candidates: Iterable[PodId]
) -> dict[PodId, float]:
    """A scheduler's usual normalisation over candidates: absent → 0, else min-max to [0, 1].

    When every present candidate has the same score they all get 1.0.
    """
    cands = list(candidates)
    present = [scores[c] for c in cands if c in scores]
    if not present:
        return {c: 0.0 for c in cands}
    lo, hi = min(present), max(present)
    out: dict[PodId, float] = {}
    for c in cands:
        if c not in scores:
            out[c] = 0.0
        elif hi == lo:
            out[c] = 1.0
        else:
            out[c] = (scores[c] - lo) / (hi - lo)
    return out
