"""Injected faults end by comparing the index with the ground truth of what the pods hold."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig
from kvray.sim import SimPod, SimPublisher

NS = "kvray-it-faults"


@pytest.fixture(scope="module")
def deployment(ray_session: None) -> Iterator[Client]:
    cfg = Config(
        namespace=NS,
        num_shards=2,
        index=IndexConfig(pod_ttl_s=1.5),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
    )
    runtime.start(cfg, snapshot_interval_s=3600)
    yield kvray.connect(NS)
    runtime.stop(NS)


def _pod(client: Client, pod_id: str) -> SimPod:
    pub = SimPublisher(
        client.endpoints[0][0], f"kv@{pod_id}@m", replay_endpoint="tcp://127.0.0.1:0"
    )
    assert pub.wait_connected()
    client.register_replay(pod_id, pub.replay_endpoint)
    return SimPod(pod_id, "m", num_blocks=48, publisher=pub)


def _truth_matches(client: Client, pods: list[SimPod], prompts: list[list[int]]) -> bool:
    """kvray's score per pod == the blocks each simulated pod really holds."""
    for p in prompts:
        want = {pod.pod_id: float(n) for pod in pods if (n := pod.cached_prefix_blocks(p))}
        got = client.score_tokens(p, "m", pods=[pod.pod_id for pod in pods])
        if got != want:
            return False
    return True


def test_killed_ingestor_rebinds_and_recovers_by_replay(deployment: Client) -> None:
    rng = random.Random(11)
    pods = [_pod(deployment, f"10.11.0.{i}") for i in range(3)]
    prompts = [[rng.randrange(9000) for _ in range(rng.randint(16, 96))] for _ in range(30)]
    for i, p in enumerate(prompts[:15]):
        pods[i % 3].serve(p)
    assert deployment.sync({pod.pod_id: pod.publisher.seq for pod in pods})  # type: ignore[union-attr]
    ing = deployment.ingestors[0]
    ray.kill(ing, no_restart=False)
    for i, p in enumerate(prompts[15:]):  # published while the ingestor is down or restarting
        pods[i % 3].serve(p)
    assert deployment.wait_until(
        lambda c: _truth_matches(c, pods, prompts), timeout_s=60, interval_s=0.25
    )
    # The restarted ingestor rebound the ports it had (asked once its handle reaches it).
    assert deployment.wait_until(lambda c: _endpoints(ing) == c.endpoints[0], timeout_s=30)
    for pod in pods:
        pod.publisher.close()  # type: ignore[union-attr]
        deployment.remove_pod(pod.pod_id)


def _endpoints(ingestor: Any) -> list[str] | None:
    try:
        return list(ray.get(ingestor.endpoints.remote(), timeout=10))
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None  # still restarting


def test_silent_pod_is_dropped(deployment: Client) -> None:
    loud, quiet = _pod(deployment, "10.12.0.1"), _pod(deployment, "10.12.0.2")
    toks = list(range(3000, 3032))
    loud.serve(toks)
    quiet.serve(toks)
    assert deployment.sync({"10.12.0.1": 1, "10.12.0.2": 1})
    assert set(deployment.score_tokens(toks, "m")) >= {"10.12.0.1", "10.12.0.2"}

    fresh = iter(range(10_000, 10**6, 16))

    def dropped(c: Client) -> bool:
        start = next(fresh)
        loud.serve(list(range(start, start + 16)))  # a new block: the loud pod keeps talking
        return "10.12.0.2" not in c.score_tokens(toks, "m")

    assert deployment.wait_until(dropped, timeout_s=15, interval_s=0.3)
    assert "10.12.0.1" in deployment.score_tokens(toks, "m")
    for pod in (loud, quiet):
        pod.publisher.close()  # type: ignore[union-attr]
        deployment.remove_pod(pod.pod_id)
