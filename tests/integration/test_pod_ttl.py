"""``pod_ttl_s``: a pod silent while its reader listens is dropped; a pod its reader could
not hear (the ingestor was down) is kept, and the restarted ingestor replays what it missed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig
from kvray.sim import SimPod
from kvray.tokenization import find_bundled_qwen3
from tests.helpers import replaying_pod, sync, wait_until

NS = "kvray-it-ttl"
TTL_S = 1.5


@pytest.fixture(scope="module")
def deployment(ray_session: None) -> Iterator[Client]:
    cfg = Config(
        namespace=NS,
        num_shards=1,
        index=IndexConfig(
            pod_ttl_s=TTL_S, models={"m": ModelConfig(tokenizer=str(find_bundled_qwen3()))}
        ),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
    )
    runtime.start(cfg, snapshot_interval_s=3600)
    yield kvray.connect(NS)
    runtime.stop(NS)


def _positions(client: Client) -> dict[str, int | None]:
    return {p["pod"]: p["last_seq"] for p in client.pods()}


def _close(client: Client, pods: list[SimPod]) -> None:
    for pod in pods:
        pod.publisher.close()  # type: ignore[union-attr]
        client.remove_pod(pod.pod_id)


def test_silent_pod_is_dropped(deployment: Client) -> None:
    loud, quiet = (replaying_pod(deployment, f"10.12.0.{i}", num_blocks=64) for i in (1, 2))
    toks = list(range(3000, 3032))
    loud.serve(toks)
    quiet.serve(toks)
    assert sync(deployment, {"10.12.0.1": 1, "10.12.0.2": 1})
    assert set(deployment.score_tokens(toks, "m")) >= {"10.12.0.1", "10.12.0.2"}

    fresh = iter(range(10_000, 10**6, 16))

    def dropped(c: Client) -> bool:
        start = next(fresh)
        loud.serve(list(range(start, start + 16)))  # a new block: the loud pod keeps talking
        return "10.12.0.2" not in c.score_tokens(toks, "m")

    assert wait_until(deployment, dropped, timeout_s=15, interval_s=0.3)
    assert "10.12.0.1" in deployment.score_tokens(toks, "m")
    _close(deployment, [loud, quiet])


def _pid(actor: Any) -> int | None:
    try:
        return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=10))
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None  # still restarting


def test_pods_outlive_their_ingestors_outage(deployment: Client) -> None:
    """While the ingestor is down its pods are unheard, not silent: the shard keeps them (and
    their positions, from which the restarted ingestor replays what it missed). Once it
    listens again, their silence counts and they are dropped."""
    pods = [replaying_pod(deployment, f"10.13.0.{i}", num_blocks=64) for i in range(2)]
    for i, pod in enumerate(pods):
        pod.serve(list(range(20_000 + 64 * i, 20_000 + 64 * i + 48)))
    before = {pod.pod_id: pod.publisher.seq for pod in pods}  # type: ignore[union-attr]
    assert sync(deployment, before)
    ing = deployment.ingestors[0]
    first_life = _pid(ing)
    killed_at = time.monotonic()
    ray.kill(ing, no_restart=False)
    assert wait_until(ing, lambda a: _pid(a) not in (None, first_life), timeout_s=120)
    outage = time.monotonic() - killed_at
    # Back: it has not listened for TTL_S yet (its first call after an outage counts nothing).
    kept = {p: s for p, s in _positions(deployment).items() if s is not None}
    assert all(kept.get(p, -1) >= seq - 1 for p, seq in before.items()), (
        f"after a {outage:.1f} s outage (ttl {TTL_S} s) the shard holds {kept}"
    )
    assert wait_until(
        deployment, lambda c: not set(_positions(c)) & set(before), timeout_s=30, interval_s=0.2
    )
    _close(deployment, pods)
