"""The scripts in ``examples/`` run for real: in-process, over HTTP, on Ray, and as a publisher.

A small kvray stack (runtime + HTTP, events bound on 127.0.0.1:0, the bundled Qwen3 tokenizer)
runs on the session's Ray cluster. ``publish_events.py`` feeds it from simulated pods, then the
two schedulers must pick the pod that caches the prompt and record their choices.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig
from kvray.serve.app import start_http, stop_http
from kvray.sim import SimPod, SimPublisher
from kvray.tokenization import find_bundled_qwen3, load_tokenizer
from tests.helpers import sync

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NS = "kvray-e2e-examples"
MODEL = "qwen3"
POD_A, POD_B, POD_C = "10.8.0.1", "10.8.0.2", "10.8.0.3"
PROMPT = "You are a meticulous assistant that answers in haiku. " * 12 + "First question:"


def _main(name: str) -> Callable[[list[str]], int]:
    """An example's ``main`` (run_path: its Ray classes pickle by value, as from a script)."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]  # type: ignore[no-any-return]


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _own_base(client: Client, endpoint: str, first: str) -> str:
    """The base URL of *this* stack's HTTP API.

    ``start_http`` returns the first ``/healthz`` that answers on ports 30000+, which may belong
    to another kvray on this machine (a concurrent test run); a marker pod published into this
    stack's socket tells ours apart.
    """
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    pub = SimPublisher(endpoint, f"kv@{marker}@{MODEL}")
    try:
        assert pub.wait_connected()
        SimPod(marker, MODEL, publisher=pub).serve(list(range(16)))
        assert sync(client, {marker: pub.seq})
    finally:
        pub.close()
    for base in [first, *(f"http://127.0.0.1:{p}" for p in range(30000, 30016))]:
        try:
            pods = httpx.get(f"{base}/pods", timeout=2).json().get("pods", [])
        except (httpx.HTTPError, ValueError):
            continue
        if any(p.get("pod") == marker for p in pods):
            client.remove_pod(marker)
            return base
    raise AssertionError("this stack's HTTP API answered on no port")


@pytest.fixture(scope="module")
def stack(ray_session: None) -> Iterator[tuple[str, Client, str]]:
    cfg = Config(
        namespace=NS,
        num_shards=2,
        index=IndexConfig(models={MODEL: ModelConfig(tokenizer=str(find_bundled_qwen3()))}),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"]),
    )
    runtime.start(cfg)
    try:
        client = kvray.connect(NS)
        endpoint = client.endpoints[0][0]
        base = _own_base(client, endpoint, start_http(cfg))
        yield base, client, endpoint
    finally:
        stop_http()
        runtime.stop(NS)


def _run_captured(name: str, argv: list[str]) -> tuple[int, str]:
    """Run an example's ``main`` with stdout captured (module fixtures have no ``capsys``)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _main(name)(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def published(stack: tuple[str, Client, str]) -> dict[str, dict[str, Any]]:
    """Pod A served PROMPT, pod B two unrelated synthetic requests (via publish_events.py)."""
    base, _, endpoint = stack
    common = ["--endpoint", endpoint, "--model", MODEL, "--url", base]
    rc_a, out_a = _run_captured(
        "publish_events",
        [*common, "--pod", POD_A, "--prompt", PROMPT, "--tokenizer", str(find_bundled_qwen3())],
    )
    rc_b, out_b = _run_captured(
        "publish_events", [*common, "--pod", POD_B, "--requests", "2", "--seed", "7"]
    )
    assert (rc_a, rc_b) == (0, 0), (out_a, out_b)
    return {POD_A: json.loads(out_a), POD_B: json.loads(out_b)}


def test_in_process_follows_the_captured_vllm_stream(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("in_process")([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "seq 0: BlockStored (+4 / -0 blocks)"
    assert out[1] == "  prompt 0 (4 blocks): {'10.0.0.7': 4.0}"
    after_evictions = out[
        out.index("seq 2: BlockRemoved, BlockRemoved, BlockRemoved, BlockStored (+4 / -3 blocks)")
        + 1 :
    ]
    assert after_evictions[:3] == [
        "  prompt 0 (4 blocks): {'10.0.0.7': 2.0}",
        "  prompt 1 (4 blocks): {'10.0.0.7': 3.0}",
        "  prompt 2 (4 blocks): {'10.0.0.7': 4.0}",
    ]
    cleared = out[out.index("seq 4: AllBlocksCleared (+0 / -0 blocks)") + 1 :]
    assert cleared[:4] == [f"  prompt {i} (4 blocks): {{}}" for i in range(4)]
    assert out[-1] == "hash contract of 10.0.0.7: ok (12 blocks re-hashed)"

    assert _main("in_process")(["--json"]) == 0
    records = _json_lines(capsys.readouterr().out)
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert all(s["scores"] == {} for s in records[-1]["scores"])
    assert _main("in_process")(["--events-dir", "/nonexistent"]) == 2


def test_publish_events_reach_kvray(
    stack: tuple[str, Client, str], published: dict[str, dict[str, Any]]
) -> None:
    base, _, endpoint = stack
    a, b = published[POD_A], published[POD_B]
    n_tokens = len(load_tokenizer(find_bundled_qwen3()).encode(PROMPT))
    assert a["confirmed"] is True and a["endpoint"] == endpoint
    assert a["requests"] == [
        {"tokens": n_tokens, "cached_tokens": 0, "new_blocks": n_tokens // 16, "evicted_blocks": 0}
    ]
    assert b["confirmed"] is True and b["batches"] == 2
    assert [r["cached_tokens"] for r in b["requests"]] == [0, 128]  # the shared 128-token prefix
    pods = {p["pod"]: p for p in httpx.get(f"{base}/pods").json()["pods"]}
    assert pods[POD_A]["hash_contract"]["status"] == "ok"
    assert pods[POD_B]["last_seq"] == 1


def test_publish_events_refuses_a_bind_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("publish_events")(["--endpoint", "tcp://*:5557"]) == 2
    assert "must be kvray's bound address" in capsys.readouterr().err


def test_http_scheduler_picks_the_caching_pod(
    stack: tuple[str, Client, str],
    published: dict[str, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, _, _ = stack
    blocks = published[POD_A]["requests"][0]["new_blocks"]
    sched = _main("http_scheduler")
    cands = ",".join([POD_B, POD_A, POD_C])
    assert sched(["--url", base, "--model", MODEL, "--candidates", cands, "--prompt", PROMPT]) == 0
    (out,) = _json_lines(capsys.readouterr().out)
    assert out == {
        "pod": POD_A,
        "reason": "cache",
        "scores": {POD_A: float(blocks)},
        "normalized": {POD_A: 1.0, POD_B: 0.0, POD_C: 0.0},
        "blocks": blocks,
    }

    # Nobody holds this prompt: the least loaded candidate (queued tokens), recorded so the
    # next request finds it.
    fresh = "An unrelated request about tide tables and lunar phases. " * 6
    load = f"{POD_B}=5000,{POD_A}=3000,{POD_C}=100"
    argv = ["--url", base, "--model", MODEL, "--candidates", cands, "--prompt", fresh]
    assert sched([*argv, "--load", load, "--record"]) == 0
    (out,) = _json_lines(capsys.readouterr().out)
    assert (out["pod"], out["reason"], out["scores"]) == (POD_C, "spread", {})
    # Speculative entries for POD_C: now it is the cache hit (an idle fleet, as the caller
    # says: without a load kvray would count the request it just sent POD_C as queued work,
    # which outweighs this short prompt's few blocks).
    idle = f"{POD_B}=0,{POD_A}=0,{POD_C}=0"
    assert sched([*argv, "--load", idle]) == 0
    (out,) = _json_lines(capsys.readouterr().out)
    assert (out["pod"], out["reason"]) == (POD_C, "cache")
    assert out["scores"] == {POD_C: float(out["blocks"])}

    assert (
        sched(
            [
                "--url",
                "http://127.0.0.1:9",
                "--model",
                MODEL,
                "--candidates",
                cands,
                "--token-ids",
                "1,2,3",
            ]
        )
        == 1
    )
    assert "cannot reach" in capsys.readouterr().err


def test_ray_scheduler_routes_from_an_actor(
    stack: tuple[str, Client, str],
    published: dict[str, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, client, _ = stack
    blocks = published[POD_A]["requests"][0]["new_blocks"]
    fresh = "Plan a three-day walking tour of an imaginary city. " * 6
    argv = ["--namespace", NS, "--model", MODEL, "--candidates", f"{POD_C},{POD_A}"]
    assert _main("ray_scheduler")([*argv, "--prompt", PROMPT, "--prompt", fresh]) == 0
    first, second = _json_lines(capsys.readouterr().out)
    assert (first["pod"], first["reason"], first["blocks"]) == (POD_A, "cache", blocks)
    assert first["normalized"] == {POD_A: 1.0, POD_C: 0.0}
    # The fresh prompt: no holder; POD_A just got the first request (kvray's own load
    # estimate), so POD_C. The choice is recorded.
    assert (second["pod"], second["reason"]) == (POD_C, "spread")
    assert client.score_prompt(fresh, MODEL, pods=[POD_C]) == {POD_C: float(second["blocks"])}
    assert _main("ray_scheduler")([*argv, "--token-ids", "1,x"]) == 2
