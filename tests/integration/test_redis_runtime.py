"""kvray on the Redis backend: Redis killed mid-stream and restarted empty; the index ends
equal to what the pods hold (snapshot + replay), with clean errors while Redis is down."""

from __future__ import annotations

import random
from contextlib import ExitStack
from pathlib import Path

import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig
from kvray.errors import BackendUnavailable
from kvray.sim import SimPod, SimPublisher
from tests.helpers import sync, wait_until

NS = "kvray-it-redis"


@pytest.fixture(scope="module")
def redis_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.redis_server import redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("no redis-server binary on PATH (apt-get install redis-server)")
    return tmp_path_factory.mktemp("r")


def test_redis_killed_and_restarted_empty(ray_session: None, redis_dir: Path) -> None:
    from tests.redis_server import start_redis_server

    with ExitStack() as stack:
        server = stack.enter_context(start_redis_server(redis_dir))
        cfg = Config(
            namespace=NS,
            num_shards=2,
            index=IndexConfig(backend="redis", redis_url=server.url),
            events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
        )
        runtime.start(cfg, snapshot_interval_s=3600)
        stack.callback(runtime.stop, NS)
        client = kvray.connect(NS)
        pods = []
        for i in range(3):
            pub = SimPublisher(
                client.endpoints[0][0], f"kv@10.20.0.{i}@m", replay_endpoint="tcp://127.0.0.1:0"
            )
            assert pub.wait_connected()
            stack.callback(pub.close)
            client.register_replay(f"10.20.0.{i}", pub.replay_endpoint or "")
            pods.append(SimPod(f"10.20.0.{i}", "m", num_blocks=64, publisher=pub))
        rng = random.Random(3)
        prompts = [[rng.randrange(5000) for _ in range(rng.randint(16, 80))] for _ in range(24)]
        for i, p in enumerate(prompts[:12]):
            pods[i % 3].serve(p)
        assert sync(client, {p.pod_id: p.publisher.seq for p in pods})  # type: ignore[union-attr]
        assert _truth(client, pods, prompts)
        ray.get(client.controller.snapshot_now.remote())

        server.process.terminate()  # Redis dies (no persistence: it will come back empty)
        server.process.wait()
        with pytest.raises(BackendUnavailable):
            client.score_tokens(prompts[0], "m")
        for i, p in enumerate(prompts[12:]):  # traffic continues during the outage
            pods[i % 3].serve(p)

        stack.enter_context(start_redis_server(redis_dir))  # same socket path, empty
        ok = wait_until(
            client, lambda c: _truth_or_false(c, pods, prompts), timeout_s=60, interval_s=0.3
        )
        assert ok, str(client.stats())
        stats = client.stats().shards
        assert sum(s.rebuilds for s in stats) >= 1


def _truth(client: Client, pods: list[SimPod], prompts: list[list[int]]) -> bool:
    names = [p.pod_id for p in pods]
    for prompt in prompts:
        want = {p.pod_id: float(n) for p in pods if (n := p.cached_prefix_blocks(prompt))}
        if client.score_tokens(prompt, "m", pods=names) != want:
            return False
    return True


def _truth_or_false(client: Client, pods: list[SimPod], prompts: list[list[int]]) -> bool:
    try:
        return _truth(client, pods, prompts)
    except (BackendUnavailable, ray.exceptions.RayError):
        return False
