"""kvray's one HTTP door end to end: the Serve replica's own ``__call__`` (direct ingress), a
real Ray cluster, real ZMQ pods, the real Qwen3 tokenizer."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig, ServeConfig
from kvray.errors import BadRequest
from kvray.serve.app import start_http
from kvray.serve.ingress import APP_NAME
from kvray.sim import SimPod, SimPublisher
from kvray.tokenization import find_bundled_qwen3, load_tokenizer
from tests.helpers import sync

pytestmark = pytest.mark.e2e

NS = "kvray-e2e-http"
MODEL = "qwen3"
TOKEN = "s3cret-token"
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


def _cfg() -> Config:
    return Config(
        namespace=NS,
        num_shards=2,
        index=IndexConfig(models={MODEL: ModelConfig(tokenizer=str(find_bundled_qwen3()))}),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
        serve=ServeConfig(
            auth_token=TOKEN, max_body_bytes=4 * 2**20, max_pods_per_request=8, side_port=0
        ),
    )


@pytest.fixture(scope="module")
def stack(ray_session: None) -> Iterator[tuple[str, Client, SimPod]]:
    """kvray's actors + the Serve ingress; ``stack[0]`` is the replica's URL (Serve's door)."""
    from ray import serve

    cfg = _cfg()
    runtime.start(cfg)
    client = kvray.connect(NS)
    base = start_http(cfg)
    pub = SimPublisher(client.endpoints[0][0], f"kv@10.9.0.1@{MODEL}")
    assert pub.wait_connected()
    pod = SimPod("10.9.0.1", MODEL, publisher=pub)
    yield base, client, pod
    pub.close()
    serve.delete(APP_NAME)
    runtime.stop(NS)


@pytest.fixture(params=["serve", "side"])
def base(request: pytest.FixtureRequest, stack: tuple[str, Client, SimPod]) -> str:
    """Both doors of one replica: Serve's own, and the opt-in side listener (the same
    handler on its own port: ``serve.side_port``)."""
    if request.param == "serve":
        return stack[0]
    from ray import serve

    url = serve.get_app_handle(APP_NAME).side_url.remote().result(timeout_s=30)
    assert url is not None
    return str(url)


def _h() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _deep(n: int) -> Any:
    v: Any = []
    for _ in range(n):
        v = [v]
    return v


def _post(url: str, body: Any) -> httpx.Response:
    return httpx.post(url, json=body, headers=_h(), timeout=30)


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
    assert sync(client, {"10.9.0.1": pod.publisher.seq})  # type: ignore[union-attr]
    r = _post(f"{base}/score_completions", {"model": MODEL, "prompt": prompt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["blocks"] == len(tokens) // 16
    assert body["scores"] == {"10.9.0.1": float(len(tokens) // 16)}
    # The OpenAI completion body a scheduler forwards to vLLM: generation fields are ignored.
    openai = {
        "model": MODEL,
        "prompt": prompt,
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n\n"],
        "top_p": 0.9,
        "seed": 7,
        "user": "tenant-a",
    }
    r = _post(f"{base}/score_completions", openai)
    assert r.status_code == 200, r.text
    assert r.json() == body
    # The prompt as token ids (OpenAI allows it): the same blocks.
    r = _post(f"{base}/score_completions", {**openai, "prompt": tokens})
    assert r.status_code == 200, r.text
    assert r.json() == body
    r = _post(f"{base}/score_chat_completions", {"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == {"10.9.0.1": float(len(chat_tokens) // 16)}
    r = _post(f"{base}/score_tokens", {"model": MODEL, "token_ids": tokens, "pods": ["other"]})
    assert r.json()["scores"] == {}


def test_chat_cache_salt_changes_the_keys(stack: tuple[str, Client, SimPod]) -> None:
    base, client, pod = stack
    tok = load_tokenizer(find_bundled_qwen3())
    messages = [
        {"role": "system", "content": "Salted tenants share nothing. " * 20},
        {"role": "user", "content": "hi"},
    ]
    tokens = tok.encode_chat(messages)
    pod.serve(tokens)  # the pod cached the unsalted prompt
    assert sync(client, {"10.9.0.1": pod.publisher.seq})  # type: ignore[union-attr]
    n = float(len(tokens) // 16)
    chat = {"model": MODEL, "messages": messages, "max_completion_tokens": 64, "stream": False}
    r = _post(f"{base}/score_chat_completions", chat)
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == {"10.9.0.1": n}
    r = _post(f"{base}/score_chat_completions", {**chat, "cache_salt": "tenant-b"})
    assert r.status_code == 200, r.text
    assert r.json()["scores"] == {} and r.json()["blocks"] == n


def test_route_records_a_speculative_entry(base: str) -> None:
    a, b = f"{base}-a", f"{base}-b"
    toks = list(range(5000, 5064))
    body = {"model": MODEL, "token_ids": toks, "pods": [a, b], "load": {a: 500, b: 10}}
    r = _post(f"{base}/route", body)
    assert r.status_code == 200, r.text
    assert (r.json()["pod"], r.json()["reason"]) == (b, "spread")  # cached nowhere: the lighter
    # The entry is visible to the very next request (the replica waited for it).
    r2 = _post(f"{base}/score_tokens", {"model": MODEL, "token_ids": toks, "pods": [a, b]})
    assert r2.json()["scores"] == {b: 4.0}


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/score_completions", {"model": MODEL}, 422, "`prompt`"),
        ("/score_completions", {"model": MODEL, "prompt": "x", "bogus": 1}, 422, "`bogus`"),
        (
            "/score_completions",
            {"model": MODEL, "prompt": "x", "temperature": "hot"},
            422,
            r"\$\.temperature",
        ),
        ("/score_tokens", {"model": MODEL, "token_ids": [-1]}, 422, r">= 0 - at `\$.token_ids"),
        ("/score_tokens", {"model": MODEL, "token_ids": [1], "pods": ["p"] * 9}, 400, "at most 8"),
        (
            "/score_chat_completions",
            {"model": MODEL, "messages": [{"role": "user"}]},
            400,
            "content",
        ),
        (
            "/score_chat_completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "documents": []},
            400,
            "documents",
        ),
        ("/score_completions", {"model": "no-such-model", "prompt": "hi"}, 400, "tokenizer"),
        (
            "/score_chat_completions",
            {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
            400,
            "tokenizer",
        ),
        ("/route", {"model": MODEL, "pods": ["a"]}, 400, "exactly one"),
        (  # deep nesting would exhaust the tokenizer actor's recursion limit: refused first
            "/score_chat_completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x", "z": _deep(500)}]},
            400,
            "deeper than",
        ),
    ],
)
def test_bad_requests_get_clear_4xx(
    base: str, path: str, body: dict[str, Any], status: int, words: str
) -> None:
    r = _post(f"{base}{path}", body)
    assert r.status_code == status, r.text
    assert re.search(words, r.json()["detail"]), r.text


def test_auth_size_limit_health_metrics_pods(base: str) -> None:
    assert httpx.get(f"{base}/healthz").json() == {
        "status": "ok",
        "app": "kvray",
        "namespace": NS,
    }
    r = httpx.get(f"{base}/pods")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
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
    assert big.status_code == 413 and "exceeds" in big.json()["detail"]
    pods = httpx.get(f"{base}/pods", headers=_h()).json()["pods"]
    assert any(p["pod"] == "10.9.0.1" for p in pods)
    m = httpx.get(f"{base}/metrics", headers=_h())
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert "kvray_events_received_total" in m.text and "kvray_keys{" in m.text
    # The answering replica follows both shards, and counts its own requests.
    assert re.search(r'kvray_replica_live_shards\{replica="[^"]+"\} 2\.0', m.text), m.text
    assert 'route="/pods"' in m.text


def test_deployment_handle_dict_methods(stack: tuple[str, Client, SimPod]) -> None:
    from ray import serve

    h = serve.get_app_handle(APP_NAME)
    toks = list(range(7000, 7032))
    out = h.score_tokens_dict.remote({"model": MODEL, "token_ids": toks}).result()
    assert set(out) == {"model", "scores", "blocks", "tokens"} and out["blocks"] == 2
    out = h.score_completions_dict.remote(
        {"model": MODEL, "prompt": "Hello there. " * 8, "max_tokens": 8, "temperature": 0}
    ).result()
    assert out["model"] == MODEL and out["tokens"] > 16
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "cache_salt": "s"}
    out = h.score_chat_dict.remote(chat).result()
    assert out["scores"] == {} and out["tokens"] > 0
    a, b = "handle-a", "handle-b"
    out = h.route_dict.remote({"model": MODEL, "pods": [a, b], "token_ids": toks}).result()
    assert out["pod"] in (a, b) and out["blocks"] == 2
    pods = h.pods_dict.remote().result()["pods"]
    assert any(p["pod"] == "10.9.0.1" for p in pods)
    with pytest.raises(BadRequest, match="`bogus`"):
        h.score_chat_dict.remote({**chat, "bogus": 1}).result()
    with pytest.raises(BadRequest, match="tokenizer"):
        h.score_completions_dict.remote({"model": "no-such-model", "prompt": "x"}).result()
    assert ray.is_initialized()


def test_openapi_and_docs(base: str) -> None:
    assert httpx.get(f"{base}/openapi.json").status_code == 401
    spec = httpx.get(f"{base}/openapi.json", headers=_h()).json()
    assert spec["info"]["title"] == "kvray" and spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {
        "/healthz",
        "/score_completions",
        "/score_chat_completions",
        "/score_tokens",
        "/route",
        "/pods",
        "/pods/{pod}",
        "/metrics",
        "/openapi.json",
        "/docs",
    }
    req = spec["components"]["schemas"]["ScoreCompletions"]
    assert req["required"] == ["model", "prompt"]
    assert {"temperature", "max_tokens", "stream", "cache_salt"} <= set(req["properties"])
    responses = spec["paths"]["/score_completions"]["post"]["responses"]
    assert {"200", "400", "401", "413", "422", "503"} <= set(responses)
    d = httpx.get(f"{base}/docs", headers=_h())
    assert d.status_code == 200 and d.headers["content-type"].startswith("text/html")
    assert "openapi.json" in d.text


def test_unknown_route_wrong_method_malformed_json(base: str) -> None:
    r = httpx.get(f"{base}/no-such-route", headers=_h())
    assert r.status_code == 404 and "Not Found" in r.json()["detail"]
    r = httpx.get(f"{base}/score_tokens", headers=_h())
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["detail"]
    r = httpx.post(
        f"{base}/score_tokens",
        content=b"{not json",
        headers={**_h(), "content-type": "application/json"},
    )
    assert r.status_code == 422 and "malformed" in r.json()["detail"], r.text


def test_pods_registered_and_forgotten_over_http(stack: tuple[str, Client, SimPod]) -> None:
    """``POST /pods`` subscribes kvray to a pod that binds its PUB socket; its blocks score;
    ``DELETE /pods/{pod}`` forgets the pod and its blocks. No config edit, no restart."""
    base, client, _ = stack
    pub = SimPublisher(
        "tcp://127.0.0.1:*", f"kv@10.9.0.77@{MODEL}", replay_endpoint="tcp://127.0.0.1:*"
    )
    try:
        body = {
            "endpoint": pub.endpoint,
            "replay_endpoint": pub.replay_endpoint,
            "pod": "10.9.0.77",
            "model": MODEL,
        }
        r = httpx.post(f"{base}/pods", json=body, headers=_h(), timeout=30)
        assert r.status_code == 200 and r.json()["action"] == "added", r.text
        assert pub.wait_connected()
        pod = SimPod("10.9.0.77", MODEL, publisher=pub)
        tokens = list(range(1000, 1000 + 16 * 5))
        pod.serve(tokens)

        def score() -> float:
            got = httpx.post(
                f"{base}/score_tokens",
                headers=_h(),
                timeout=30,
                json={"model": MODEL, "token_ids": tokens, "pods": ["10.9.0.77"]},
            ).json()
            return float(got["scores"].get("10.9.0.77", 0.0))

        assert _until(lambda: score() == 5.0, 30), score()
        r = httpx.delete(f"{base}/pods/10.9.0.77", headers=_h(), timeout=30)
        assert r.status_code == 200 and r.json() == {
            "action": "removed",
            "endpoint": None,
            "pod": "10.9.0.77",
        }
        assert _until(lambda: score() == 0.0, 30), score()
        assert "10.9.0.77" not in {p["pod"] for p in client.pods()}
        bad = httpx.post(f"{base}/pods", json={"endpoint": "http://x"}, headers=_h(), timeout=30)
        assert bad.status_code == 422 and "endpoint" in bad.json()["detail"]
    finally:
        pub.close()


def _until(cond: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False
