"""The Serve HTTP endpoint end to end: real Ray cluster, real ZMQ pods, real tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig, ServeConfig
from kvray.serve.app import APP_NAME, find_http, start_http, stop_http
from kvray.sim import SimPod, SimPublisher
from kvray.tokenization import find_bundled_qwen3, load_tokenizer

pytestmark = pytest.mark.e2e

NS = "kvray-e2e-http"
MODEL = "qwen3"
TOKEN = "s3cret-token"


def _cfg() -> Config:
    return Config(
        namespace=NS,
        num_shards=2,
        index=IndexConfig(models={MODEL: ModelConfig(tokenizer=str(find_bundled_qwen3()))}),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
        serve=ServeConfig(auth_token=TOKEN, max_body_bytes=4 * 2**20, max_pods_per_request=8),
    )


@pytest.fixture(scope="module")
def stack(ray_session: None) -> Iterator[tuple[str, Client, SimPod]]:
    """Serve + kvray; ``base`` is the fast path's URL (what ``start_http`` returns)."""
    cfg = _cfg()
    runtime.start(cfg)
    client = kvray.connect(NS)
    base = start_http(cfg)
    pub = SimPublisher(client.endpoints[0][0], f"kv@10.9.0.1@{MODEL}")
    assert pub.wait_connected()
    pod = SimPod("10.9.0.1", MODEL, publisher=pub)
    yield base, client, pod
    pub.close()
    stop_http()
    runtime.stop(NS)


@pytest.fixture(params=["fast", "serve"])
def base(request: pytest.FixtureRequest, stack: tuple[str, Client, SimPod]) -> str:
    """Both HTTP paths of one replica: the fast listener and Serve's own (FastAPI)."""
    return stack[0] if request.param == "fast" else find_http(_cfg(), fast=False)


def _h() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_score_completions_and_chat(base: str, stack: tuple[str, Client, SimPod]) -> None:
    _, client, pod = stack
    tok = load_tokenizer(find_bundled_qwen3())
    prompt = "Summarise the following report. " * 30
    tokens = tok.encode(prompt)
    pod.serve(tokens)
    messages = [
        {"role": "system", "content": "You are terse. " * 40},
        {"role": "user", "content": "hello"},
    ]
    chat_tokens = tok.encode_chat(messages)
    pod.serve(chat_tokens)
    assert client.sync({"10.9.0.1": pod.publisher.seq})  # type: ignore[union-attr]
    r = httpx.post(
        f"{base}/score_completions", json={"model": MODEL, "prompt": prompt}, headers=_h()
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["blocks"] == len(tokens) // 16
    assert body["scores"] == {"10.9.0.1": float(len(tokens) // 16)}
    r = httpx.post(
        f"{base}/score_chat_completions", json={"model": MODEL, "messages": messages}, headers=_h()
    )
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == {"10.9.0.1": float(len(chat_tokens) // 16)}
    r = httpx.post(
        f"{base}/score_tokens",
        json={"model": MODEL, "token_ids": tokens, "pods": ["other"]},
        headers=_h(),
    )
    assert r.json()["scores"] == {}


def test_route_records_a_speculative_entry(base: str) -> None:
    a, b = f"{base}-a", f"{base}-b"  # pods of their own: both paths run this test
    toks = list(range(5000, 5064))
    body = {"model": MODEL, "token_ids": toks, "pods": [a, b], "load": {a: 500, b: 10}}
    r = httpx.post(f"{base}/route", json=body, headers=_h())
    assert r.status_code == 200, r.text
    assert (r.json()["pod"], r.json()["reason"]) == (b, "spread")  # cached nowhere: the lighter
    # The entry is visible to the very next request (the replica waited for it).
    r2 = httpx.post(
        f"{base}/score_tokens",
        json={"model": MODEL, "token_ids": toks, "pods": [a, b]},
        headers=_h(),
    )
    assert r2.json()["scores"] == {b: 4.0}


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/score_completions", {"model": MODEL}, 422, "prompt"),
        ("/score_completions", {"model": MODEL, "prompt": "x", "bogus": 1}, 422, "bogus"),
        (
            "/score_tokens",
            {"model": MODEL, "token_ids": [-1]},
            422,
            "greater than or equal to 0|>= 0",
        ),
        ("/score_tokens", {"model": MODEL, "token_ids": [1], "pods": ["p"] * 9}, 400, "at most 8"),
        (
            "/score_chat_completions",
            {"model": MODEL, "messages": [{"role": "user"}]},
            400,
            "content",
        ),
        ("/score_completions", {"model": "no-such-model", "prompt": "hi"}, 400, "tokenizer"),
        ("/route", {"model": MODEL, "pods": ["a"]}, 400, "exactly one"),
    ],
)
def test_bad_requests_get_clear_4xx(
    base: str, path: str, body: dict[str, Any], status: int, words: str
) -> None:
    r = httpx.post(f"{base}{path}", json=body, headers=_h())
    assert r.status_code == status, r.text
    assert re.search(words, r.text), r.text


def test_auth_size_limit_health_metrics_pods(base: str) -> None:
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/pods").status_code == 401
    r = httpx.post(
        f"{base}/score_tokens",
        json={"model": MODEL, "token_ids": [1]},
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401
    big = httpx.post(
        f"{base}/score_completions",
        content=b"x" * (4 * 2**20 + 1),
        headers={**_h(), "content-type": "application/json"},
    )
    assert big.status_code == 413
    pods = httpx.get(f"{base}/pods", headers=_h()).json()["pods"]
    assert any(p["pod"] == "10.9.0.1" for p in pods)
    m = httpx.get(f"{base}/metrics", headers=_h())
    assert m.status_code == 200
    assert "kvray_events_received_total" in m.text and "kvray_keys{" in m.text
    assert "kvray_replica_live_shards 2.0" in m.text  # the answering replica follows both


def test_deployment_handle(stack: tuple[str, Client, SimPod]) -> None:
    from ray import serve

    h = serve.get_app_handle(APP_NAME)
    out = h.score_tokens_dict.remote(
        {"model": MODEL, "token_ids": list(range(5000, 5016))}
    ).result()
    assert set(out) == {"model", "scores", "blocks", "tokens"}
    assert ray.is_initialized()


def test_openapi_is_pinned() -> None:
    from kvray.serve.app import make_app

    app, _ = make_app({})
    spec = app.openapi()
    assert set(spec["paths"]) == {
        "/healthz",
        "/score_completions",
        "/score_chat_completions",
        "/score_tokens",
        "/route",
        "/pods",
        "/metrics",
    }
    req = spec["components"]["schemas"]["ScoreCompletionsRequest"]
    assert req["required"] == ["model", "prompt"]
    assert "422" in spec["paths"]["/score_completions"]["post"]["responses"]


def test_unknown_route_and_wrong_method(base: str) -> None:
    r = httpx.get(f"{base}/no-such-route", headers=_h())
    assert r.status_code == 404 and "Not Found" in r.json()["detail"]
    r = httpx.get(f"{base}/score_tokens", headers=_h())
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["detail"]
    r = httpx.post(
        f"{base}/score_tokens",
        content=b"{not json",
        headers={**_h(), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "kvray"
