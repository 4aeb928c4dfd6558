"""``Ingress.__call__`` without Serve or Ray: a stand-in client, requests through Starlette's
test client (the same ``Request`` objects Serve hands the replica)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.exceptions import GetTimeoutError
from starlette.requests import Request
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from kvray.config import Config
from kvray.core.apply import Keyer
from kvray.errors import BackendUnavailable, BadRequest
from kvray.serve import schemas as s
from kvray.serve.ingress import Ingress

M = "m"
TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeClient:
    """What the ingress uses of ``kvray.client.Client``: characters are tokens, pods hold
    key sets, a pod's score is its count of leading keys."""

    namespace = "ns"
    replica = None

    def __init__(self) -> None:
        self.keyer = Keyer(Config().index.hashing_lookup())
        self.held: dict[str, set[int]] = {}
        self.chat_calls: list[dict[str, Any]] = []
        self.fail: BaseException | None = None
        self.added: list[tuple[Any, ...]] = []
        self.removed: list[str] = []

    def add_pod(self, *args: Any) -> None:
        self.added.append(args)

    def remove_pod(self, pod: str) -> None:
        self.removed.append(pod)

    def hold(self, pod: str, tokens: Sequence[int], **kw: Any) -> None:
        self.held.setdefault(pod, set()).update(self.keyer.block_keys(tokens, M, **kw))

    def _check(self, model: str) -> None:
        if self.fail is not None:
            raise self.fail
        if model != M:
            raise BadRequest(f"no tokenizer for model {model!r}")

    async def tokenize_async(
        self, prompt: str, model: str, *, add_special_tokens: bool = True
    ) -> list[int]:
        self._check(model)
        body = list(map(ord, prompt))
        return [1, *body] if add_special_tokens else body  # 1: a BOS

    async def tokenize_chat_async(
        self, messages: list[dict[str, Any]], model: str, **kw: Any
    ) -> list[int]:
        self._check(model)
        self.chat_calls.append(kw)
        text = "".join(f"<{m['role']}>{m.get('content', '')}" for m in messages)
        if kw.get("add_generation_prompt", True):
            text += "<assistant>"
        return list(map(ord, text))

    async def score_keys_async(
        self, keys: Sequence[int], pods: Sequence[str] | None = None
    ) -> dict[str, float]:
        out = {}
        for pod, held in self.held.items():
            if pods is not None and pod not in pods:
                continue
            n = 0
            while n < len(keys) and keys[n] in held:
                n += 1
            if n:
                out[pod] = float(n)
        return out

    async def route_keys_async(
        self, pods: Sequence[str], keys: Sequence[int], model: str, **kw: Any
    ) -> tuple[Any, dict[str, float]]:
        scores = await self.score_keys_async(keys, pods)
        best = max(pods, key=lambda p: scores.get(p, 0.0))
        reason = "cache" if scores else "spread"
        d = SimpleNamespace(pod=best, reason=reason, hit_blocks=scores.get(best, 0.0))
        return d, scores

    async def pods_async(self) -> list[dict[str, Any]]:
        return [
            {
                "pod": p,
                "shard": 0,
                "model": M,
                "last_seq": 3,
                "idle_s": 0.5,
                "hash_contract": {"status": "ok"},
                "blocks": len(k),
                "pool_blocks": None,
            }
            for p, k in sorted(self.held.items())
        ]

    async def stats_async(self) -> dict[str, Any]:
        return {"shards": [], "ingestors": [], "tokenizers": []}


def _asgi(ingress: Ingress) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        resp = await ingress(Request(scope, receive))
        await resp(scope, receive, send)

    return app


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient()


@pytest.fixture
def ingress(fake: FakeClient) -> Ingress:
    cfg = {"auth_token": TOKEN, "max_body_bytes": 4096, "max_pods_per_request": 3}
    return Ingress("ns", cfg, client=fake)  # type: ignore[arg-type]


@pytest.fixture
def http(ingress: Ingress) -> Iterator[TestClient]:
    yield TestClient(_asgi(ingress))  # no lifespan (Serve sends none either)


def _post(http: TestClient, path: str, body: Any, **kw: Any) -> Any:
    return http.post(path, json=body, headers=AUTH, **kw)


def test_healthz_is_open_and_names_the_deployment(http: TestClient) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "app": "kvray", "namespace": "ns"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/pods"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("POST", "/score_tokens"),
        ("POST", "/route"),
    ],
)
def test_bearer_token_everywhere_but_healthz(http: TestClient, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        r = http.request(method, path, json={"model": M, "token_ids": [1]}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.json()["detail"]


def test_score_tokens(http: TestClient, fake: FakeClient, ingress: Ingress) -> None:
    toks = list(range(100, 164))
    fake.hold("a", toks[:32])
    fake.hold("b", toks)
    r = _post(http, "/score_tokens", {"model": M, "token_ids": toks})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"model": M, "scores": {"a": 2.0, "b": 4.0}, "blocks": 4, "tokens": 64}
    r = _post(http, "/score_tokens", {"model": M, "token_ids": toks, "pods": ["a"]})
    assert r.json()["scores"] == {"a": 2.0}
    metrics = http.get("/metrics", headers=AUTH).text  # this replica's own request series
    assert 'route="/score_tokens"' in metrics and f'replica="{ingress.metrics.replica}"' in metrics


def test_openai_completion_bodies(http: TestClient, fake: FakeClient) -> None:
    prompt = "p" * 40
    tokens = [1, *map(ord, prompt)]  # 41 tokens: 2 blocks
    fake.hold("a", tokens)
    plain = _post(http, "/score_completions", {"model": M, "prompt": prompt}).json()
    assert plain["scores"] == {"a": 2.0} and plain["tokens"] == 41
    openai = {
        "model": M,
        "prompt": prompt,
        "temperature": 0.7,
        "max_tokens": 128,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n\n"],
        "n": 1,
        "logprobs": 2,
        "user": "u",
        "request_id": "abc",
        "kv_transfer_params": {"do_remote_decode": True},
    }
    r = _post(http, "/score_completions", openai)
    assert r.status_code == 200 and r.json() == plain
    by_ids = _post(http, "/score_completions", {"model": M, "prompt": tokens}).json()
    assert by_ids == plain
    no_bos = _post(http, "/score_completions", {**openai, "add_special_tokens": False}).json()
    assert no_bos["tokens"] == 40 and no_bos["scores"] == {}  # other tokens, other keys


def test_truncation_as_vllm(http: TestClient, fake: FakeClient) -> None:
    tokens = list(range(200, 264))
    fake.hold("head", tokens[:32])
    fake.hold("tail", tokens[32:])
    body = {"model": M, "prompt": tokens, "truncate_prompt_tokens": 32}
    r = _post(http, "/score_completions", body).json()  # vLLM's generate default: left
    assert (r["tokens"], r["scores"]) == (32, {"tail": 2.0})
    r = _post(http, "/score_completions", {**body, "truncation_side": "right"}).json()
    assert (r["tokens"], r["scores"]) == (32, {"head": 2.0})
    r = _post(http, "/score_completions", {**body, "truncate_prompt_tokens": 100}).json()
    assert r["tokens"] == 64
    r = _post(http, "/score_completions", {**body, "truncate_prompt_tokens": -1})
    assert r.status_code == 400 and "truncate_prompt_tokens" in r.text
    r = _post(http, "/score_completions", {**body, "truncate_prompt_tokens": -2})
    assert r.status_code == 422 and "truncate_prompt_tokens" in r.text


def test_chat_fields(http: TestClient, fake: FakeClient) -> None:
    messages = [{"role": "system", "content": "s" * 40}, {"role": "user", "content": "hi"}]
    body = {"model": M, "messages": messages, "temperature": 0, "max_completion_tokens": 9}
    tokens = asyncio.run(fake.tokenize_chat_async(messages, M))
    fake.hold("plain", tokens)
    r = _post(http, "/score_chat_completions", body)
    assert r.status_code == 200, r.text
    n = len(tokens) // 16
    assert r.json()["scores"] == {"plain": float(n)}
    salted = _post(http, "/score_chat_completions", {**body, "cache_salt": "tenant-1"}).json()
    assert salted["scores"] == {} and salted["blocks"] == n  # the salt is in every key
    fake.hold("salted", tokens, cache_salt="tenant-1")
    salted = _post(http, "/score_chat_completions", {**body, "cache_salt": "tenant-1"}).json()
    assert salted["scores"] == {"salted": float(n)}
    fake.chat_calls.clear()
    tools = [{"type": "function", "function": {"name": "f"}}]
    body2 = {
        **body,
        "tools": tools,
        "tool_choice": "auto",
        "add_generation_prompt": False,
        "reasoning_effort": "none",
        "chat_template_kwargs": {"x": 1},
    }
    assert _post(http, "/score_chat_completions", body2).status_code == 200
    assert fake.chat_calls == [
        {
            "tools": tools,
            "add_generation_prompt": False,
            "chat_template_kwargs": {"x": 1, "reasoning_effort": "none", "enable_thinking": False},
        }
    ]


@pytest.mark.parametrize(
    ("path", "extra", "word"),
    [
        ("/score_completions", {"suffix": "tail"}, "suffix"),
        ("/score_completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
        ("/score_chat_completions", {"chat_template": "{{ x }}"}, "chat_template"),
        ("/score_chat_completions", {"documents": [{"title": "t", "text": "x"}]}, "documents"),
        ("/score_chat_completions", {"continue_final_message": True}, "continue_final_message"),
        ("/score_chat_completions", {"add_special_tokens": True}, "add_special_tokens"),
    ],
)
def test_fields_that_change_the_prompt_are_refused_not_ignored(
    http: TestClient, path: str, extra: dict[str, Any], word: str
) -> None:
    body = {"model": M, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    body.pop("messages" if path == "/score_completions" else "prompt")
    r = _post(http, path, {**body, **extra})
    assert r.status_code == 400, r.text
    assert word in r.json()["detail"]


def _deep(n: int) -> Any:
    v: Any = []
    for _ in range(n):
        v = [v]
    return v


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        (
            "/score_chat_completions",
            {"model": M, "messages": [{"role": "user", "content": "x", "z": _deep(100)}]},
            400,
            "messages nests",
        ),
        (
            "/score_chat_completions",
            {
                "model": M,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"a": _deep(100)}],
            },
            400,
            "tools nests",
        ),
        (
            "/score_chat_completions",
            {
                "model": M,
                "messages": [{"role": "u", "content": "x"}],
                "chat_template_kwargs": {"a": _deep(100)},
            },
            400,
            "chat_template_kwargs nests",
        ),
        (
            "/route",
            {
                "model": M,
                "pods": ["a"],
                "messages": [{"role": "u", "content": "x", "z": _deep(99)}],
            },
            400,
            "messages nests",
        ),
        ("/score_completions", {"model": M}, 422, "`prompt`"),
        ("/score_completions", {"model": M, "prompt": "x", "bogus": 1}, 422, "`bogus`"),
        ("/score_completions", {"model": M, "prompt": "x", "temperature": "hot"}, 422, "temperat"),
        ("/score_tokens", {"model": M, "token_ids": [-1]}, 422, r"token_ids\[0\]"),
        ("/score_tokens", {"model": M, "token_ids": [2**32]}, 422, r"token_ids\[0\]"),
        ("/score_tokens", {"model": M, "token_ids": [1], "pods": ["p"] * 4}, 400, "at most 3"),
        ("/score_completions", {"model": "nope", "prompt": "hi"}, 400, "no tokenizer"),
        ("/score_chat_completions", {"model": "nope", "messages": [{}]}, 400, "no tokenizer"),
        ("/route", {"model": M, "pods": ["a"]}, 400, "exactly one"),
        ("/route", {"model": M, "pods": ["a"], "prompt": "x", "token_ids": [1]}, 400, "one"),
        ("/route", {"model": "nope", "pods": ["a"], "prompt": "x"}, 400, "no tokenizer"),
        ("/score_tokens", [1], 422, "object"),
    ],
)
def test_bad_requests_get_clear_4xx(
    http: TestClient, path: str, body: Any, status: int, words: str
) -> None:
    import re

    r = _post(http, path, body)
    assert r.status_code == status, r.text
    assert re.search(words, r.json()["detail"]), r.text


def test_malformed_json_size_limits_methods_and_paths(http: TestClient) -> None:
    h = {**AUTH, "content-type": "application/json"}
    r = http.post("/score_tokens", content=b"{not json", headers=h)
    assert r.status_code == 422 and "malformed" in r.json()["detail"]
    r = http.post("/score_tokens", content=b"", headers=h)
    assert r.status_code == 422
    deep = b'{"model": "m", "prompt": "x", "stream_options": {"a": ' + b"[" * 1500 + b"]" * 1500
    r = http.post("/score_completions", content=deep + b"}}", headers=h)
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]
    r = http.post("/score_tokens", content=b"x" * 4097, headers=h)
    assert r.status_code == 413 and "4096" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(5):
            yield b"x" * 1000

    r = http.post("/score_tokens", content=chunks(), headers=h)
    assert r.status_code == 413
    r = http.get("/score_tokens", headers=AUTH)
    assert r.status_code == 405 and r.json()["detail"] == "Method Not Allowed"
    assert r.headers["allow"] == "POST"
    r = http.put("/pods", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    r = http.get("/pods/p1", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE"
    r = http.get("/nowhere", headers=AUTH)
    assert r.status_code == 404 and r.json()["detail"] == "Not Found"


def test_route_pods_metrics_docs(http: TestClient, fake: FakeClient) -> None:
    toks = list(range(300, 332))
    fake.hold("b", toks)
    r = _post(http, "/route", {"model": M, "pods": ["a", "b"], "token_ids": toks})
    assert r.json() == {
        "pod": "b",
        "scores": {"b": 2.0},
        "blocks": 2,
        "reason": "cache",
        "hit_blocks": 2.0,
    }
    pods = http.get("/pods", headers=AUTH).json()["pods"]
    assert [p["pod"] for p in pods] == ["b"] and pods[0]["blocks"] == 2
    m = http.get("/metrics", headers=AUTH)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert "kvray_events_received" in m.text
    spec = http.get("/openapi.json", headers=AUTH).json()
    assert spec["info"]["title"] == "kvray" and "/score_tokens" in spec["paths"]
    d = http.get("/docs", headers=AUTH)
    assert d.status_code == 200 and d.headers["content-type"].startswith("text/html")
    assert "openapi.json" in d.text and "/score_chat_completions" in d.text


def test_backend_errors(
    http: TestClient, fake: FakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": M, "prompt": "x"}
    fake.fail = BackendUnavailable("redis down")
    r = _post(http, "/score_completions", body)
    assert (r.status_code, r.json()["detail"]) == (503, "redis down")
    fake.fail = GetTimeoutError("slow")
    assert _post(http, "/score_completions", body).status_code == 503
    fake.fail = RuntimeError("a bug")
    with caplog.at_level(logging.ERROR, logger="kvray.serve"):
        r = _post(http, "/score_completions", body)
    assert (r.status_code, r.json()) == (500, {"detail": "internal error"})
    assert "a bug" in caplog.text


def test_root_path_is_stripped(ingress: Ingress) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope = {**scope, "root_path": "/kv", "path": "/kv" + scope["path"]}
        resp = await ingress(Request(scope, receive))
        await resp(scope, receive, send)

    assert TestClient(app).get("/healthz").json()["namespace"] == "ns"


def test_dict_methods(ingress: Ingress, fake: FakeClient) -> None:
    toks = list(range(400, 432))
    fake.hold("a", toks)

    async def run() -> None:
        out = await ingress.score_tokens_dict({"model": M, "token_ids": toks})
        assert out == {"model": M, "scores": {"a": 2.0}, "blocks": 2, "tokens": 32}
        out = await ingress.score_completions_dict({"model": M, "prompt": toks, "seed": 3})
        assert out["scores"] == {"a": 2.0}
        chat = {"model": M, "messages": [{"role": "user", "content": "x"}], "cache_salt": "s"}
        assert (await ingress.score_chat_dict(chat))["scores"] == {}
        out = await ingress.route_dict({"model": M, "pods": ["a", "b"], "token_ids": toks})
        assert out["pod"] == "a"
        assert (await ingress.pods_dict())["pods"][0]["pod"] == "a"
        with pytest.raises(BadRequest, match="unknown field `bogus`"):
            await ingress.score_chat_dict({**chat, "bogus": 1})
        with pytest.raises(BadRequest, match=r"\$.token_ids\[0\]"):
            await ingress.score_tokens_dict({"model": M, "token_ids": ["1"]})

    asyncio.run(run())


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


def _bodies(struct: type[s.msgspec.Struct]) -> st.SearchStrategy[Any]:
    names = st.sampled_from([*struct.__struct_fields__, "bogus"])
    return st.dictionaries(names, _json, max_size=6).map(lambda d: {"model": M, **d}) | _json


@pytest.mark.parametrize(
    ("path", "struct"),
    [
        ("/score_completions", s.ScoreCompletions),
        ("/score_chat_completions", s.ScoreChat),
        ("/score_tokens", s.ScoreTokens),
        ("/route", s.Route),
    ],
)
def test_random_bodies_never_get_a_5xx(http: TestClient, path: str, struct: Any) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(struct))
    def check(body: Any) -> None:
        r = http.post(path, content=json.dumps(body).encode(), headers=AUTH)
        assert r.status_code < 500, (body, r.text)

    check()


def test_pods_are_registered_and_forgotten_over_http(http: TestClient, ingress: Ingress) -> None:
    fake: Any = ingress.client
    body = {
        "endpoint": "tcp://10.0.0.7:5557",
        "replay_endpoint": "tcp://10.0.0.7:5558",
        "pod": "p7",
        "model": M,
    }
    r = http.post("/pods", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json() == {
        "action": "added",
        "endpoint": body["endpoint"],
        "pod": "p7",
    }
    assert fake.added[-1] == ("tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", "p7", M)
    r = http.delete("/pods/p7", headers=AUTH)
    assert r.status_code == 200 and r.json()["action"] == "removed" and fake.removed == ["p7"]
    # Bad input: a clear 4xx, nothing registered.
    n = len(fake.added)
    for bad, why in (
        ({"endpoint": "http://x"}, "endpoint"),
        ({}, "endpoint"),
        ({"endpoint": "tcp://h:1", "pod": "a#dp1"}, "pod"),
        ({"endpoint": "tcp://h:1", "extra": 1}, "extra"),
    ):
        r = http.post("/pods", json=bad, headers=AUTH)
        assert r.status_code == 422 and why in r.json()["detail"], (bad, r.json())
    assert len(fake.added) == n
    assert http.delete("/pods/a%23dp1", headers=AUTH).status_code == 400
    assert http.post("/pods", json=body).status_code == 401  # the token guards mutations
    assert http.delete("/pods/p7").status_code == 401
