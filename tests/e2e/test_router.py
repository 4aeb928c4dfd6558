"""kvray's Serve request router on fake-but-real replicas: plain Serve replicas that each run a
simulated vLLM engine publishing real KV events to kvray."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig

pytestmark = pytest.mark.e2e

NS = "kvray-e2e-router"
MODEL = "sim-llm"


@serve.deployment(
    num_replicas=3,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class="kvray.serve.router:KvrayRequestRouter",
        request_router_kwargs={"namespace": NS, "model": MODEL},
        request_routing_stats_period_s=0.5,
    ),
)
class SimEngine:
    def __init__(self, endpoint: str) -> None:
        from kvray.sim import SimPod, SimPublisher

        self.pod_id = serve.get_replica_context().replica_id.unique_id
        pub = SimPublisher(endpoint, f"kv@{self.pod_id}@{MODEL}")
        pub.wait_connected()
        self.pod = SimPod(self.pod_id, MODEL, num_blocks=1024, publisher=pub)

    def record_routing_stats(self) -> dict[str, Any]:
        return {"kvray_pod": self.pod_id}

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        res = self.pod.serve(body["token_ids"])
        return {
            "pod": self.pod_id,
            "cached_tokens": res.cached_tokens,
            "seq": self.pod.publisher.seq,
        }


@pytest.fixture(scope="module")
def stack(ray_session: None) -> Iterator[tuple[Any, Client]]:
    runtime.start(Config(namespace=NS, events=EventsConfig(bind=["tcp://127.0.0.1:0"])))
    client = kvray.connect(NS)
    handle = serve.run(SimEngine.bind(client.endpoints[0][0]), name="sim-llm", route_prefix=None)
    yield handle, client
    serve.delete("sim-llm")
    runtime.stop(NS)


def test_repeats_follow_the_cache(stack: tuple[Any, Client]) -> None:
    handle, client = stack
    rng = random.Random(7)
    # 40 full blocks and a partial one: a cached prefix worth far more than the load kvray
    # estimates from its own recent decisions (a few blocks' prefix would not be).
    prompts = [[rng.randrange(50_000) for _ in range(650)] for _ in range(4)]
    home: dict[int, str] = {}
    for i, p in enumerate(prompts):
        first = handle.remote({"token_ids": p}).result()
        home[i] = first["pod"]
        assert client.sync({first["pod"]: first["seq"]})
    for _ in range(3):
        for i, p in enumerate(prompts):
            out = handle.remote({"token_ids": p}).result()
            assert out["pod"] == home[i]
            assert out["cached_tokens"] == 640
    # A prompt sharing a prompt's first 512 tokens goes to that prompt's replica too.
    child = prompts[0][:512] + [rng.randrange(50_000) for _ in range(100)]
    out = handle.remote({"token_ids": child}).result()
    assert out["pod"] == home[0] and out["cached_tokens"] == 512


def test_unknown_prompt_falls_back_to_default_policy(stack: tuple[Any, Client]) -> None:
    handle, _ = stack
    seen = {handle.remote({"token_ids": [9, 9, 9]}).result()["pod"] for _ in range(12)}
    assert len(seen) >= 2  # power of two choices spreads requests kvray knows nothing about
