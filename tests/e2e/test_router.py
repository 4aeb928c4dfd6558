"""kvray's Serve request router on fake-but-real replicas: plain Serve replicas that each run a
simulated vLLM engine publishing real KV events to kvray."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig
from tests.helpers import sync, wait_until

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
        assert sync(client, {first["pod"]: first["seq"]})
    from kvray.serve.router import ROUTERS

    routers = [r for r in ROUTERS if r._deployment_id.name == "SimEngine"]

    def idle(_: Any) -> bool:  # Serve tells the router of a completion after result() returns
        return not any(work for r in routers for work in r._inflight.values())

    for _ in range(3):
        for i, p in enumerate(prompts):
            # Requests here are one at a time: the previous one's work must be gone from the
            # router's in-flight estimate, or it counts as load on its pod.
            assert wait_until(None, idle, timeout_s=10)
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


# --- zero manual wiring: engines that bind their own event sockets, as vLLM does -------------


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0},
    request_router_config=RequestRouterConfig(
        request_router_class="kvray.serve.router:KvrayRequestRouter",
        request_router_kwargs={"namespace": NS, "model": MODEL, "timeout_s": 2.0},
        request_routing_stats_period_s=0.2,
    ),
)
class BindingEngine:
    """Binds its PUB and replay sockets itself and only reports them in its routing stats
    (Serve LLM's ``kv_event_metadata``): kvray has to find it."""

    def __init__(self) -> None:
        from kvray.sim import SimPod, SimPublisher

        self.pod_id = serve.get_replica_context().replica_id.unique_id
        self.pub = SimPublisher(
            "tcp://127.0.0.1:0", f"kv@{self.pod_id}@{MODEL}", replay_endpoint="tcp://127.0.0.1:0"
        )
        self.pod = SimPod(self.pod_id, MODEL, num_blocks=1024, publisher=self.pub)

    def record_routing_stats(self) -> dict[str, Any]:
        meta = {"endpoint": self.pub.endpoint, "replay_endpoint": self.pub.replay_endpoint}
        return {"kvray_pod": self.pod_id, "kv_event_metadata": {**meta, "block_size": 16}}

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        res = self.pod.serve(body["token_ids"])
        return {"pod": self.pod_id, "cached_tokens": res.cached_tokens, "seq": self.pub.seq}


def _wait(done: Any, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.2)
    return bool(done())


def _router() -> Any:
    from kvray.serve.router import ROUTERS

    mine = [r for r in ROUTERS if r._deployment_id.name == "BindingEngine"]
    return mine[-1] if mine else None


def _replica_actor(pod: str) -> Any:
    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].endswith(pod)
    ]
    return ray.get_actor(name, namespace="serve")


def test_replicas_are_found_routed_to_and_forgotten(stack: tuple[Any, Client]) -> None:
    _, client = stack
    handle = serve.run(BindingEngine.bind(), name="binding-llm", route_prefix=None)
    try:
        rng = random.Random(11)
        prompts = [[rng.randrange(50_000) for _ in range(650)] for _ in range(4)]
        home = {}
        for i, p in enumerate(prompts):
            out = handle.remote({"token_ids": p}).result()
            home[i] = out["pod"]

        # The router registers both replicas' endpoints with kvray once they report them
        # (each routing call looks; prompts shorter than a block fall back, unrecorded).
        def registered() -> bool:
            handle.remote({"token_ids": [1, 2, 3]}).result()
            return _router() is not None and len(_router()._registered) == 2

        assert _wait(registered), [
            (r.replica_id, r.routing_stats) for r in _router().curr_replicas.values()
        ]
        pods = set(_router()._registered.values())
        # kvray subscribed after the pods had published: the first event it sees from each
        # makes it fetch what came before from the pod's replay buffer.
        seen: set[str] = set()

        def heard_from_all() -> bool:
            seen.add(
                handle.remote({"token_ids": [rng.randrange(50_000) for _ in range(32)]}).result()[
                    "pod"
                ]
            )  # noqa: E501
            return seen >= pods

        assert _wait(heard_from_all)
        assert _wait(lambda: {p["pod"] for p in client.pods()} >= pods)
        # Once kvray sees the events (replay fills what came before the subscription),
        # repeats go where their prefix is cached.
        for i, p in enumerate(prompts):
            if i % 2:  # half of them again: kvray must know where they are
                assert _wait(lambda p=p, i=i: client.score_tokens(p, MODEL).get(home[i]) == 40.0)
                out = handle.remote({"token_ids": p}).result()
                assert out["pod"] == home[i] and out["cached_tokens"] == 640
        # A replica killed mid-run: its pod is dropped, routing goes on.
        victim = home[1]
        ray.kill(_replica_actor(victim), no_restart=True)
        assert _wait(lambda: victim not in set(_router()._registered.values()))
        assert _wait(lambda: victim not in client.score_tokens(prompts[1], MODEL))
        for p in prompts:
            assert handle.remote({"token_ids": p}).result()["pod"] != victim
        # Serve replaces it; the newcomer is registered too.
        assert _wait(lambda: len(_router()._registered) == 2)
    finally:
        serve.delete("binding-llm")


def test_kvray_down_falls_back_and_counts_it(stack: tuple[Any, Client]) -> None:
    handle, _ = stack
    from kvray.serve.router import ROUTERS

    routers = [r for r in ROUTERS if r._deployment_id.name == "SimEngine"]
    assert routers
    runtime.stop(NS)  # every kvray actor gone
    rng = random.Random(5)
    # For up to a second the router's read replica still answers from its last state (its
    # shards count as live until silent for max(1 s, 20 heartbeats)); routing meanwhile is
    # kvray's, not a fallback. Wait for the first fallback, then every request is one.
    deadline = time.monotonic() + 30
    before = sum(sum(r.fallbacks.values()) for r in routers)
    while sum(sum(r.fallbacks.values()) for r in routers) == before:
        assert time.monotonic() < deadline, "no fallback 30 s after kvray went down"
        p = [rng.randrange(50_000) for _ in range(64)]
        assert handle.remote({"token_ids": p}).result()["pod"]  # routing never fails
    before = sum(sum(r.fallbacks.values()) for r in routers)
    for _ in range(6):
        p = [rng.randrange(50_000) for _ in range(64)]
        assert handle.remote({"token_ids": p}).result()["pod"]  # routing never fails
    after = sum(sum(r.fallbacks.values()) for r in routers)
    assert after - before == 6
    assert sum(r.fallbacks["error"] + r.fallbacks["timeout"] for r in routers) >= 6


def test_decode_work_is_the_output_the_request_asks_for() -> None:
    """The router's in-flight estimate counts a request's asked-for output (capped), not a
    fixed allowance: short answers leave a cached pod free sooner."""
    from kvray.serve.router import _decode_tokens

    assert _decode_tokens({"max_tokens": 24}, 256.0) == 24.0
    assert _decode_tokens({"max_completion_tokens": 8, "max_tokens": 99}, 256.0) == 8.0
    assert _decode_tokens({"max_tokens": 4096}, 256.0) == 256.0
    assert _decode_tokens({"max_tokens": True}, 256.0) == 256.0
    assert _decode_tokens({}, 256.0) == 256.0
    assert _decode_tokens(None, 256.0) == 256.0
