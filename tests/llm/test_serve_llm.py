"""kvray inside Ray Serve LLM: ``build_openai_app`` with ``LLMServer`` replicas running kvray's
CPU stand-in engine (real ZMQ KV events on per-replica endpoints) and kvray's request router.

Nothing is wired by hand: the router learns each replica's KV-events endpoint from its routing
stats and registers it with kvray."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import ray
from ray import serve

import kvray
from kvray import runtime
from kvray.config import Config
from kvray.tokenization.hf import find_bundled_qwen3

NS = "kvray-llm-tests"
MODEL = "qwen3"
LEDGER = "kvray-llm-tests-ledger"
SYSTEM = "You are the assistant of a test tenant. " + " ".join(f"rule {i}." for i in range(120))


def wait(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = cond()
        except Exception:  # an actor or the app is still coming back
            got = None
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app() -> Iterator[dict[str, Any]]:
    from ray.serve.llm import build_openai_app

    from kvray.serve.llm_bench import Ledger, TimedKvrayRequestRouter, stand_in_config

    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        object_store_memory=256 * 2**20,
        namespace=NS,
    )
    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    runtime.start(
        Config.model_validate(
            {
                "namespace": NS,
                "index": {"models": {MODEL: {"tokenizer": str(find_bundled_qwen3())}}},
            }
        )
    )
    ledger = Ledger.options(name=LEDGER, namespace=NS).remote()
    cfg = stand_in_config(
        MODEL,
        router=TimedKvrayRequestRouter,
        router_kwargs={"namespace": NS, "model": MODEL, "ledger": LEDGER, "ledger_namespace": NS},
        replicas=3,
        engine={
            "num_blocks": 2048,
            "prefill_s_per_token": 1e-5,
            "decode_s_per_token": 1e-3,
            "ledger": LEDGER,
            "ledger_namespace": NS,
        },
    )
    serve.run(
        build_openai_app(
            {
                "llm_configs": [cfg],
                "ingress_deployment_config": {
                    "max_ongoing_requests": 64,
                    "ray_actor_options": {"num_cpus": 0},
                },
            }
        ),
        name="llm",
        route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )
    base = f"http://127.0.0.1:{port}"
    client = kvray.connect(NS)
    yield {"base": base, "client": client, "ledger": ledger}
    serve.delete("llm")
    runtime.stop(NS)
    serve.shutdown()
    ray.shutdown()


def chat(base: str, user: str, system: str = SYSTEM, model: str = MODEL) -> dict[str, Any]:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=60,
        json={
            "model": model,
            "max_tokens": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        },
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_replicas_register_and_repeats_hit_the_cache(app: dict[str, Any]) -> None:
    base, client = app["base"], app["client"]
    # Every replica reports its events endpoint; the router registers it with kvray. Cold
    # prompts with different prefixes spread over the replicas (24 of them: all three replicas
    # get some unless rendezvous hashing is very unlucky, p < 1e-3), and each replica's stored
    # blocks show up as its pod in kvray's index.
    first = [chat(base, "a question", system=f"Tenant {i}. {SYSTEM}") for i in range(24)]
    assert all(r["usage"]["prompt_tokens"] > 16 for r in first)
    pods = wait(
        lambda: {p["pod"] for p in client.pods()} if len(client.pods()) >= 3 else None,
        60,
        "three pods with blocks in kvray",
    )
    assert len(pods) == 3
    # The same conversations again: kvray sends each where its prefix is cached.
    for i in range(6):
        again = chat(base, "a question", system=f"Tenant {i}. {SYSTEM}")
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= again["usage"]["prompt_tokens"] - 32, again["usage"]


def test_killed_replica_is_forgotten_and_routing_continues(app: dict[str, Any]) -> None:
    base, client = app["base"], app["client"]
    before = {p["pod"] for p in client.pods()}
    assert len(before) >= 3
    victim = sorted(before)[0]
    actors = ray.util.list_named_actors(all_namespaces=True)
    name = next(
        a["name"] for a in actors if a["name"].endswith(victim) and "LLMServer" in a["name"]
    )
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    # Serve replaces the replica; the router forgets the dead pod (kvray drops its blocks).
    wait(lambda: victim not in {p["pod"] for p in client.pods()}, 90, "the dead pod forgotten")
    ok = [chat(base, f"after the kill {i}")["usage"]["prompt_tokens"] for i in range(5)]
    assert all(n > 0 for n in ok)


def test_kvray_down_falls_back_and_counts_it(app: dict[str, Any]) -> None:
    base, ledger = app["base"], app["ledger"]
    ray.get(ledger.take.remote())
    runtime.stop(NS)  # every kvray actor gone
    time.sleep(2.0)  # the router's read replica notices its shards are silent (1 s)
    try:
        served = [chat(base, f"while kvray is down {i}") for i in range(6)]
        assert len(served) == 6  # routing never fails because of kvray
        time.sleep(0.6)
        chat(base, "one more, so the router reports its counts")

        def fallbacks() -> int:
            *_, fb = ray.get(ledger.take.remote())
            counted[0] += sum(n for r, n in fb.items() if r in ("error", "timeout"))
            return counted[0] >= 6

        counted = [0]
        wait(fallbacks, 30, "the fallbacks counted")
    finally:
        runtime.start(
            Config.model_validate(
                {
                    "namespace": NS,
                    "index": {"models": {MODEL: {"tokenizer": str(find_bundled_qwen3())}}},
                }
            )
        )
