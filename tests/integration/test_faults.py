"""Injected faults end by comparing the index with the ground truth of what the pods hold."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

import kvray
from kvray import cli, runtime
from kvray.actors.naming import CONTROLLER
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig
from kvray.sim import SimPod, SimPublisher
from kvray.tokenization import find_bundled_qwen3
from tests.helpers import replaying_pod, sync, wait_until

NS = "kvray-it-faults"


@pytest.fixture(scope="module")
def deployment(ray_session: None) -> Iterator[Client]:
    cfg = Config(
        namespace=NS,
        num_shards=2,
        index=IndexConfig(models={"m": ModelConfig(tokenizer=str(find_bundled_qwen3()))}),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
    )
    runtime.start(cfg, snapshot_interval_s=3600)
    yield kvray.connect(NS)
    runtime.stop(NS)


def _pod(client: Client, pod_id: str, num_blocks: int = 48) -> SimPod:
    return replaying_pod(client, pod_id, num_blocks)


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
    assert sync(deployment, {pod.pod_id: pod.publisher.seq for pod in pods})  # type: ignore[union-attr]
    ing = deployment.ingestors[0]
    ray.kill(ing, no_restart=False)
    for i, p in enumerate(prompts[15:]):  # published while the ingestor is down or restarting
        pods[i % 3].serve(p)
    assert wait_until(
        deployment, lambda c: _truth_matches(c, pods, prompts), timeout_s=120, interval_s=0.25
    ), f"scores did not converge after the ingestor was killed: {deployment.stats().ingestors}"
    # The restarted ingestor rebound the ports it had (asked once its handle reaches it).
    assert wait_until(deployment, lambda c: _endpoints(ing) == c.endpoints[0], timeout_s=30)
    for pod in pods:
        pod.publisher.close()  # type: ignore[union-attr]
        deployment.remove_pod(pod.pod_id)


def _endpoints(ingestor: Any) -> list[str] | None:
    try:
        return list(ray.get(ingestor.endpoints.remote(), timeout=10))
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None  # still restarting


def _said(shard: Any) -> Any:
    """What a shard says of its pods and its own reader (a failing test's message)."""
    try:
        return ray.get([shard.pods_info.remote(), shard.ingest_stats.remote()], timeout=10)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        return repr(exc)


def _tokenizes(tokenizer: Any) -> bool:
    try:
        return bool(ray.get(tokenizer.encode.remote("m", "hello"), timeout=10))
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return False  # still restarting


class _Traffic:
    """Pods serving prompts from a thread (the load the faults land in), pausable."""

    def __init__(self, pods: list[SimPod], prompts: list[list[int]], seed: int) -> None:
        self.pods, self.prompts, self.rng = pods, prompts, random.Random(seed)
        self.running = threading.Event()
        self.idle = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.running.wait(0.05):
                self.idle.set()
                continue
            self.idle.clear()
            self.rng.choice(self.pods).serve(self.rng.choice(self.prompts))
            time.sleep(0.01)

    def pause(self) -> None:
        self.running.clear()
        self.idle.clear()
        assert self.idle.wait(5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_any_actor_killed_under_load_heals_exactly(deployment: Client) -> None:
    """Controller, a shard, the ingestor, a tokenizer: each killed (Ray restarts it) while
    three pods with different pools publish and evict; each time the scores converge to what
    the pods hold, and after the controller's kill new clients connect and ``kvray status``
    works."""
    rng = random.Random(15)
    pods = [_pod(deployment, f"10.15.0.{i}", n) for i, n in enumerate((12, 32, 96))]
    # Some block-aligned: recomputed duplicate blocks, whose copy counts must heal too.
    heads = [[rng.randrange(9000) for _ in range(32)] for _ in range(6)]
    prompts = [
        rng.choice(heads)
        + [rng.randrange(9000) for _ in range(16 * rng.randint(1, 4) + rng.choice((0, 7, 7)))]
        for _ in range(60)
    ]
    traffic = _Traffic(pods, prompts, seed=16)
    victims: dict[str, Any] = {
        "controller": ray.get_actor(CONTROLLER, namespace=NS),
        "shard": deployment.shards[1],
        "ingestor": deployment.ingestors[0],
        "tokenizer": deployment.tokenizers[0],
    }
    try:
        for name, victim in victims.items():
            traffic.running.set()
            time.sleep(0.5)
            ray.kill(victim, no_restart=False)
            time.sleep(1.0)  # traffic goes on while it restarts
            if name == "controller":  # a new scheduler connects while it comes back
                fresh = kvray.connect(NS, timeout_s=120)
                assert fresh.controller_status()["restarted"]
                assert isinstance(
                    fresh.score_tokens(prompts[0], "m", pods=[p.pod_id for p in pods]), dict
                )
            traffic.pause()
            assert wait_until(
                deployment,
                lambda c: _truth_matches(c, pods, prompts),
                timeout_s=120,
                interval_s=0.25,
            ), f"scores did not converge after the {name} was killed"
            if name == "controller":
                assert _truth_matches(fresh, pods, prompts)
                assert cli.main(["status", "--namespace", NS]) == 0
                fresh.close()
        # The restarted tokenizer answers (the pool's actor is the same name, a new process,
        # which loads its tokenizer again: on a loaded machine that can take a minute).
        assert wait_until(victims["tokenizer"], _tokenizes, timeout_s=180, interval_s=0.5)
        scores = deployment.score_prompt("You are a helpful assistant.", "m")
        assert isinstance(scores, dict)
    finally:
        traffic.close()
        for pod in pods:
            pod.publisher.close()  # type: ignore[union-attr]
            deployment.remove_pod(pod.pod_id)


def test_restarted_controller_keeps_pods_pins_owner_and_snapshots(deployment: Client) -> None:
    """What the controller knew survives its restart (GCS state; snapshots pulled again from
    the shards), so a shard killed afterwards restores a snapshot and reads its pod again."""
    ctl = ray.get_actor(CONTROLLER, namespace=NS)
    ray.get(ctl.claim.remote("owner-15"))
    pub = SimPublisher("tcp://127.0.0.1:0", "kv@10.16.0.1@m", replay_endpoint="tcp://127.0.0.1:0")
    deployment.add_pod(pub.endpoint, pub.replay_endpoint, "10.16.0.1", "m")  # a shard reads it
    assert pub.wait_connected()
    pod = SimPod("10.16.0.1", "m", num_blocks=24, publisher=pub)
    rng = random.Random(17)
    prompts = [[rng.randrange(9000) for _ in range(16 * rng.randint(1, 4) + 3)] for _ in range(30)]
    for p in prompts[:15]:
        pod.serve(p)
    pins = ray.get(ctl.pins.remote())
    ray.kill(ctl, no_restart=False)

    def back(c: Client) -> bool:
        st = c.controller_status()
        return bool(st["restarted"]) and len(st["snapshot_ages_s"]) == len(c.shards)

    assert wait_until(deployment, back, timeout_s=180, interval_s=0.25)
    st = deployment.controller_status()
    assert st["owner"] == "owner-15" and st["pods"] >= 1
    assert ray.get(ctl.pins.remote()) == pins
    victim = deployment.shards[pins["10.16.0.1"]]
    ray.kill(victim, no_restart=False)
    for p in prompts[15:]:
        pod.serve(p)
    try:
        assert wait_until(
            deployment, lambda c: _truth_matches(c, [pod], prompts), timeout_s=120, interval_s=0.25
        ), f"not converged: pod at seq {pub.seq}, shards say {_said(victim)}"

        def restored(_: Client) -> bool:  # the victim may still be restarting: wait for it
            try:
                return bool(ray.get(victim.stats.remote(), timeout=10).restored_from_snapshot)
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                return False

        assert wait_until(deployment, restored, timeout_s=120, interval_s=0.25)
    finally:
        pub.close()
        deployment.remove_pod("10.16.0.1")
