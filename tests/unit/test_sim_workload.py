"""The simulator's pure parts: workload determinism, traces, policies, the fleet model, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from kvray.demo import HttpScorer, RunSpec, _serves_us, build_parser, drive, plan_runs
from kvray.errors import ConfigError
from kvray.sim.fleet import Fleet, FleetConfig, PrefillQueue
from kvray.sim.policies import (
    ApproxPrefixPolicy,
    LeastLoadedPolicy,
    PrefixPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    RouteContext,
    blend,
    make_policy,
)
from kvray.sim.report import (
    RequestRecord,
    coefficient_of_variation,
    percentile,
    render_table,
    summarize,
)
from kvray.sim.workload import (
    Request,
    Trace,
    WorkloadConfig,
    describe,
    generate,
    load_trace,
    save_trace,
)

SMALL = WorkloadConfig(
    seed=7,
    num_requests=120,
    num_tenants=5,
    system_tokens=(64, 160),
    user_tokens=(5, 30),
    reply_tokens=(5, 40),
    num_docs=4,
    doc_tokens=(40, 120),
)
PODS = ("p0", "p1", "p2")


def ctx(tokens: int = 64, **kw: object) -> RouteContext:
    return RouteContext(0.0, list(range(tokens)), PODS, 16, **kw)  # type: ignore[arg-type]


# --- workload ---------------------------------------------------------------------------------


def test_same_config_same_trace_and_seed_changes_it() -> None:
    a, b = generate(SMALL), generate(SMALL)
    assert a == b
    other = generate(dataclasses.replace(SMALL, seed=8))
    assert [r.tokens for r in other.requests] != [r.tokens for r in a.requests]


def test_trace_shape_is_realistic() -> None:
    trace = generate(SMALL)
    reqs = trace.requests
    assert [r.id for r in reqs] == list(range(120))
    assert all(x.t < y.t for x, y in zip(reqs, reqs[1:], strict=False))
    kinds = {r.kind for r in reqs}
    assert kinds == {"chat", "rag"}
    # every later turn of a chat extends the previous turn's prompt (multi-turn growth)
    last: dict[int, Request] = {}
    grown = 0
    for r in reqs:
        prev = last.get(r.session)
        if prev is not None:
            assert r.turn == prev.turn + 1
            assert r.tokens[: len(prev.tokens)] == prev.tokens
            assert r.lora == prev.lora
            grown += 1
        last[r.session] = r
    assert grown > 10
    # tenants share their system prompt across chats
    firsts = [r for r in reqs if r.kind == "chat" and r.turn == 0 and r.tenant == "tenant-0"]
    assert len(firsts) >= 2 and len({f.tokens[:64] for f in firsts}) == 1
    assert any(r.lora for r in reqs) and set(trace.lora_paths) == {r.lora for r in reqs if r.lora}
    assert describe(trace)["requests"] == 120


def test_bad_workload_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="system_tokens"):
        WorkloadConfig(system_tokens=(10, 5))
    with pytest.raises(ConfigError, match="rate_rps"):
        WorkloadConfig(rate_rps=0)


def test_trace_round_trip(tmp_path: Path) -> None:
    trace = generate(SMALL)
    path = save_trace(trace, tmp_path / "sub" / "trace.jsonl")
    assert load_trace(path) == trace
    header = json.loads(path.read_text().splitlines()[0])
    assert header["type"] == "header" and header["meta"]["config"]["seed"] == 7


def test_bad_trace_names_the_line(tmp_path: Path) -> None:
    path = save_trace(generate(SMALL), tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    lines[3] = (
        lines[3].replace('"kind":"chat"', '"kind":"nope"').replace('"kind":"rag"', '"kind":"nope"')
    )
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="line 4"):
        load_trace(path)
    (tmp_path / "no_header.jsonl").write_text(lines[1] + "\n")
    with pytest.raises(ConfigError, match="no header"):
        load_trace(tmp_path / "no_header.jsonl")
    with pytest.raises(ConfigError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")


# --- policies on fake views -------------------------------------------------------------------


def test_kvray_policy_takes_the_longest_prefix() -> None:
    pol = PrefixPolicy("scores")
    c = ctx(scores={"p1": 2.0, "p2": 3.0})
    assert pol.choose(c) == "p2"
    assert pol.predicted_blocks(c, "p2") == 3.0 and pol.predicted_blocks(c, "p0") == 0.0
    with pytest.raises(ValueError, match="needs"):
        pol.choose(ctx())


def test_ties_go_to_less_loaded_then_in_turn() -> None:
    pol = PrefixPolicy("scores")
    assert pol.choose(ctx(scores={}, loads={"p0": 5.0})) == "p1"
    seen = []
    for _ in range(6):  # idle fleet, no hits anywhere: every pod in turn, not always p0
        c = ctx(scores={})
        pod = pol.choose(c)
        pol.routed(c, pod)
        seen.append(pod)
    assert sorted(seen[:3]) == list(PODS) and seen[3:] == seen[:3]


def test_load_weight_one_minimises_estimated_ttft() -> None:
    # p0 caches 3 of 4 blocks but has 100 tokens queued; p1 caches 1 block and is idle.
    scores = {"p0": 3.0, "p1": 1.0}
    loads = {"p0": 100.0}
    assert PrefixPolicy("scores").choose(ctx(scores=scores, loads=loads)) == "p0"
    # TTFT ~ queue + uncached: p0 = 100 + 16, p1 = 0 + 48 -> p1
    assert PrefixPolicy("scores", load_weight=1.0).choose(ctx(scores=scores, loads=loads)) == "p1"
    v = blend(scores, loads, PODS, n_blocks=4, prompt_tokens=64, load_weight=1.0)
    assert v["p0"] == pytest.approx(0.75 - 100 / 64) and v["p2"] == 0.0
    assert PrefixPolicy("truth", load_weight=2).name == "oracle+load=2"
    with pytest.raises(ValueError):
        PrefixPolicy(load_weight=-1)


def test_oracle_uses_truth() -> None:
    assert make_policy("oracle", PODS).choose(ctx(truth={"p0": 1, "p2": 4})) == "p2"


def test_simple_policies() -> None:
    rr = RoundRobinPolicy()
    assert [rr.choose(ctx()) for _ in range(4)] == ["p0", "p1", "p2", "p0"]
    r1, r2 = RandomPolicy(3), RandomPolicy(3)
    assert [r1.choose(ctx()) for _ in range(20)] == [r2.choose(ctx()) for _ in range(20)]
    ll = LeastLoadedPolicy()
    assert ll.choose(ctx(loads={"p0": 9.0, "p1": 1.0, "p2": 4.0})) == "p1"
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", PODS)


def test_approx_prefix_follows_its_own_routing_history() -> None:
    pol = ApproxPrefixPolicy(PODS, seed=1)
    first = ctx(tokens=64)
    assert pol.predicted_blocks(first, "p0") == 0.0
    pod = pol.choose(first)
    pol.routed(first, pod)
    longer = RouteContext(1.0, list(range(64)) + [999] * 40, PODS, 16)
    assert pol.choose(longer) == pod  # match rate 64/104 >= 0.1: the pod it sent the prefix to
    assert pol.predicted_blocks(longer, pod) == 4.0  # the tree's belief, in full blocks
    # a prompt matching < 10% goes to a tenant holding the fewest characters
    other = RouteContext(2.0, [5_000 + i for i in range(64)], PODS, 16)
    assert pol.choose(other) != pod


def test_approx_prefix_imbalance_fallback_and_eviction() -> None:
    pol = ApproxPrefixPolicy(PODS, imbalanced_threshold=1, eviction_threshold_chars=100)
    c = ctx(tokens=64)
    pol.routed(c, "p0")
    skewed = ctx(tokens=64, queue_lens={"p0": 5})
    assert pol.choose(skewed) in ("p1", "p2")  # imbalanced: power of two, not the match
    for i in range(3):  # p0 grows past 100 chars; eviction runs every 10 simulated s
        big = RouteContext(10.0 * (i + 1), [7_000 * (i + 1) + j for j in range(80)], PODS, 16)
        pol.routed(big, "p0")
    assert pol.tree.tenant_to_char_count["p0"] <= 100


# --- fleet model ------------------------------------------------------------------------------


def test_prefill_queue_drains_fifo() -> None:
    q = PrefillQueue(tps=100.0)
    assert q.submit(50, now=0.0) == 0.0
    assert q.submit(100, now=0.0) == pytest.approx(0.5)
    q.advance(1.0)  # 100 tokens done: the first job and half of the second
    assert q.outstanding == pytest.approx(50.0) and q.queue_len == 1
    q.advance(0.5)  # earlier: no-op
    assert q.outstanding == pytest.approx(50.0)
    q.advance(5.0)
    assert q.outstanding == 0.0 and q.queue_len == 0
    with pytest.raises(ValueError):
        PrefillQueue(0)


def test_fleet_serves_and_reports_ground_truth() -> None:
    fleet = Fleet(FleetConfig(num_pods=2, num_blocks=8, prefill_tps=160.0))
    toks = list(range(64))  # 4 blocks
    first = fleet.serve("pod-00", toks, None, 0.0)
    assert (first.cached_tokens, first.new_blocks, first.ttft_s) == (0, 4, pytest.approx(0.4))
    view = fleet.observe(0.1, toks)
    assert view.truth == {"pod-00": 4, "pod-01": 0}
    assert view.loads["pod-00"] == pytest.approx(48.0) and view.queue_lens["pod-00"] == 1
    again = fleet.serve("pod-00", toks, None, 0.1)
    # Fully cached and block-aligned: vLLM recomputes the last block (hit capped at len - 1).
    assert again.cached_tokens == 48 and again.new_blocks == 1
    assert again.wait_s == pytest.approx(0.3)
    assert fleet.observe(0.2, toks, lora="adapter-x").truth == {"pod-00": 0, "pod-01": 0}
    fleet.reset(publish=False)
    assert fleet.cached_blocks() == {"pod-00": 0, "pod-01": 0}


def test_fleet_tracks_lost_batches_until_the_pod_publishes_again() -> None:
    cfg = FleetConfig(num_pods=1, num_blocks=64, replay=False)
    fleet = Fleet(cfg, {"pod-00": "inproc://kvray-unit-fleet"})  # a bound PUB, no network
    try:
        fleet.serve("pod-00", list(range(32)), None, 0.0)
        assert fleet.expected_seqs() == {"pod-00": 1}
        fleet.drop_next("pod-00", 2)
        lost = fleet.serve("pod-00", list(range(100, 132)), None, 0.1)
        assert not lost.stale and lost.expect_seq == 1  # seq 1 lost: the index stays at 1
        during = fleet.serve("pod-00", list(range(200, 232)), None, 0.2)
        assert during.stale and during.expect_seq == 1
        healed = fleet.serve("pod-00", list(range(300, 332)), None, 0.3)
        assert healed.stale and healed.expect_seq == 4  # seq 3 sent: the gap is visible now
        assert fleet.serve("pod-00", list(range(32)), None, 0.4).stale is False
        assert fleet.lost_batches() == 2
    finally:
        fleet.close()


# --- driver loop and metrics ------------------------------------------------------------------


def _ticks() -> object:
    t = iter(range(1_000_000))
    return lambda: next(t) * 0.001  # each clock read advances 1 ms


def test_drive_replays_a_policy_deterministically() -> None:
    trace = generate(SMALL)
    fleet = Fleet(FleetConfig(num_pods=3, num_blocks=64, lora_paths=dict(trace.lora_paths)))
    approx = {"eviction_threshold_chars": 64 * 16}
    runs = {}
    for label in ("oracle", "approx-prefix", "random"):
        spec = RunSpec(label, label)
        recs, extra = drive(spec, trace, fleet, None, block_size=16, seed=0, approx=approx)
        again, _ = drive(spec, trace, fleet, None, block_size=16, seed=0, approx=approx)
        assert [r.pod for r in recs] == [r.pod for r in again]
        runs[label] = summarize(label, recs, fleet.pod_ids(), 16, extra=extra)
    assert runs["oracle"]["accuracy"]["accuracy"] == 1.0  # ground truth predicts exactly
    assert runs["oracle"]["hit_rate"] > runs["random"]["hit_rate"]
    assert runs["random"]["accuracy"] is None
    with pytest.raises(ValueError, match="needs kvray"):
        drive(RunSpec("kvray", "kvray"), trace, fleet, None, block_size=16, seed=0, approx={})


def test_drive_times_routing_with_the_injected_clock() -> None:
    trace = Trace(generate(SMALL).requests[:5], "qwen3")
    fleet = Fleet(FleetConfig(num_pods=2))
    recs, _ = drive(
        RunSpec("random", "random"), trace, fleet, None, block_size=16, seed=0, approx={},
        clock=_ticks(),  # type: ignore[arg-type]
    )  # fmt: skip
    assert [r.route_s for r in recs] == pytest.approx([0.002] * 5)  # (choose) + (routed)


def test_summary_metrics() -> None:
    def rec(pod: str, prompt: int, cached: int, pred: float, stale: bool = False) -> RequestRecord:
        return RequestRecord(
            "r", 0, 0.0, "chat", "t", None, pod, prompt, cached, pred, 0.001, 0.0, 0.1, stale
        )

    recs = [rec("a", 100, 64, 4.0), rec("a", 100, 32, 3.0, stale=True), rec("b", 100, 0, 0.0)]
    s = summarize("r", recs, ["a", "b", "c"], 16)
    assert s["hit_rate"] == pytest.approx(96 / 300)
    assert s["per_pod_prefill_tokens"] == {"a": 104, "b": 100, "c": 0}
    assert s["load_cv"] == pytest.approx(coefficient_of_variation([104, 100, 0]))
    acc = s["accuracy"]
    assert acc["accuracy"] == pytest.approx(2 / 3) and acc["over_predicted"] == 1
    assert acc["fresh"]["accuracy"] == 1.0 and acc["stale"]["accuracy"] == 0.0
    assert "r" in render_table([s])
    assert percentile([3, 1, 2], 50) == 2 and math.isnan(percentile([], 99))
    assert coefficient_of_variation([0, 0]) == 0.0


def test_cli_plans_runs_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    runs = plan_runs(parser.parse_args(["--inject-gap"]))
    labels = [r.label for r in runs]
    assert labels[:4] == ["kvray", "kvray (no wait)", "kvray+load=1", "kvray+load=4"]
    assert "kvray (gap)" in labels and "approx-prefix x2 routers" in labels
    assert labels[-1] == "random"
    few = plan_runs(parser.parse_args(["--policies", "kvray,random", "--load-weights", ""]))
    assert [r.label for r in few] == ["kvray", "kvray (no wait)", "random"]
    with pytest.raises(SystemExit):
        plan_runs(parser.parse_args(["--policies", "bogus"]))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0 and "--inject-gap" in capsys.readouterr().out


# --- scoring transports -----------------------------------------------------------------------


def test_http_scorer_speaks_the_score_tokens_schema() -> None:
    import httpx

    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/score_tokens"
        assert request.headers["authorization"] == "Bearer t0k"
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"scores": {"p1": 3}, "blocks": 4, "model": "m"})

    scorer = HttpScorer("http://kvray", auth_token="t0k", transport=httpx.MockTransport(handler))
    assert scorer.score([1, 2, 3], "m", None) == {"p1": 3.0}
    assert scorer.score([1], "m", "adapter-0") == {"p1": 3.0}
    scorer.close()
    assert seen == [
        {"model": "m", "token_ids": [1, 2, 3]},
        {"model": "m", "token_ids": [1], "lora": "adapter-0"},
    ]


class _FakeClient:
    def __init__(self) -> None:
        self.routed: list[str] = []
        self.removed: list[str] = []

    def record_route(self, pod: str, model: str, tokens: list[int], ttl_s: float) -> None:
        self.routed.append(pod)

    def remove_pod(self, pod: str) -> None:
        self.removed.append(pod)


class _FakeScorer:
    via = "http"

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.client: _FakeClient | None = None

    def score(self, tokens: list[int], model: str, lora: str | None) -> dict[str, float]:
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer == "ours" and self.client is not None:
            return {self.client.routed[-1]: 2.0}
        return {}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("answer", "ours"), [("ours", True), ("theirs", False), (OSError(), False)]
)
def test_http_endpoint_must_answer_for_our_deployment(answer: object, ours: bool) -> None:
    client = _FakeClient()
    scorer = _FakeScorer(answer)
    scorer.client = client
    assert _serves_us(client, scorer, "m") is ours  # type: ignore[arg-type]
    assert client.removed == client.routed  # the probe pod is always cleaned up
