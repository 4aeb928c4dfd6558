"""The Ray runtime against real ZMQ publishers: ingestion, sharding, replay, restarts, recovery."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, IndexConfig, ModelConfig
from kvray.core.messages import ShardStats
from kvray.core.sharding import shard_of
from kvray.errors import ConfigError
from kvray.sim import SimPod, SimPublisher
from kvray.tokenization import find_bundled_qwen3
from tests.helpers import sync, wait_until

NS = "kvray-it-runtime"
MODEL = "qwen3"


@pytest.fixture(scope="module")
def deployment(ray_session: None) -> Iterator[Client]:
    cfg = Config(
        namespace=NS,
        num_shards=2,
        num_ingestors=1,
        num_tokenizers=1,
        index=IndexConfig(models={MODEL: ModelConfig(tokenizer=str(find_bundled_qwen3()))}),
        events=EventsConfig(bind=["tcp://127.0.0.1:0"], flush_interval_s=0.002),
    )
    runtime.start(cfg, snapshot_interval_s=3600)
    client = kvray.connect(NS)
    yield client
    runtime.stop(NS)


class Fleet:
    """Simulated pods publishing into the deployment's bound endpoint."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.endpoint = client.endpoints[0][0]
        self.pods: dict[str, SimPod] = {}

    def add(self, pod_id: str, *, replay: bool = True, num_blocks: int = 64) -> SimPod:
        pub = SimPublisher(
            self.endpoint,
            f"kv@{pod_id}@{MODEL}",
            replay_endpoint="tcp://127.0.0.1:0" if replay else None,
        )
        assert pub.wait_connected()
        if replay:
            self.client.register_replay(pod_id, pub.replay_endpoint)
        pod = SimPod(pod_id, MODEL, num_blocks=num_blocks, publisher=pub)
        self.pods[pod_id] = pod
        return pod

    def sync(self) -> bool:
        """Wait until every batch the pods published (or dropped) is applied."""
        expect = {p: pod.publisher.seq for p, pod in self.pods.items() if pod.publisher}
        return sync(self.client, expect)

    def reference(self) -> kvray.Indexer:
        ix = kvray.Indexer()
        for pod in self.pods.values():
            assert pod.publisher is not None
            for frames in pod.publisher.history():
                ix.apply(frames)
        return ix

    def close(self) -> None:
        for pod in self.pods.values():
            assert pod.publisher is not None
            pod.publisher.close()


@pytest.fixture()
def fleet(deployment: Client) -> Iterator[Fleet]:
    f = Fleet(deployment)
    yield f
    f.close()
    for pod in f.pods:
        deployment.remove_pod(pod)


def _prompts(rng: random.Random, n: int, shared: int = 48) -> list[list[int]]:
    system = [rng.randrange(150_000) for _ in range(shared)]
    return [system + [rng.randrange(150_000) for _ in range(rng.randint(0, 90))] for _ in range(n)]


def _agree(client: Client, ref: kvray.Indexer, prompts: list[list[int]]) -> None:
    for p in prompts:
        assert client.score_tokens(p, MODEL) == ref.score_tokens(p, MODEL)


def test_events_land_in_owning_shards_and_scores_match_indexer(
    deployment: Client, fleet: Fleet
) -> None:
    rng = random.Random(1)
    prompts = _prompts(rng, 30)
    pods = [fleet.add(f"10.1.0.{i}") for i in range(4)]
    for i, p in enumerate(prompts):
        pods[i % 4].serve(p)
    assert fleet.sync()
    ref = fleet.reference()
    _agree(deployment, ref, prompts)
    assert any(deployment.score_tokens(p, MODEL) for p in prompts)
    for info in deployment.pods():
        if info["pod"].startswith("10.1.0."):
            assert info["shard"] == deployment.owner(info["pod"]) == shard_of(info["pod"], 2)
            assert info["hash_contract"]["status"] == "ok"


def test_seq_gap_is_healed_by_replay(deployment: Client, fleet: Fleet) -> None:
    rng = random.Random(2)
    pod = fleet.add("10.2.0.1")
    prompts = _prompts(rng, 12)
    for p in prompts[:4]:
        pod.serve(p)
    assert pod.publisher is not None
    pod.publisher.drop_next = 3  # lost on the wire, kept in the pod's replay buffer
    for p in prompts[4:]:
        pod.serve(p)
    assert fleet.sync()
    _agree(deployment, fleet.reference(), prompts)
    st = deployment.stats().ingestors[0]
    assert st.replayed >= 3 and st.seq_gaps >= 1


def test_gap_without_replay_is_counted_lost(deployment: Client, fleet: Fleet) -> None:
    rng = random.Random(3)
    pod = fleet.add("10.3.0.1", replay=False)
    before = deployment.stats().ingestors[0].seq_lost
    prompts = _prompts(rng, 6)
    pod.serve(prompts[0])
    assert pod.publisher is not None
    pod.publisher.drop_next = 2
    for p in prompts[1:]:
        pod.serve(p)
    assert fleet.sync()
    assert deployment.stats().ingestors[0].seq_lost >= before + 2


def test_pod_restart_clears_its_blocks(deployment: Client, fleet: Fleet) -> None:
    rng = random.Random(4)
    pod = fleet.add("10.4.0.1")
    old = _prompts(rng, 3)
    for p in old:
        pod.serve(p)
    assert fleet.sync()
    assert deployment.score_tokens(old[0], MODEL).get("10.4.0.1")
    assert pod.publisher is not None
    pod.publisher.close()
    fresh = fleet.add("10.4.0.1")  # a new process: seq starts at 0 again
    new = [rng.randrange(150_000) for _ in range(64)]
    fresh.serve(new)
    assert fleet.sync()
    assert deployment.score_tokens(old[0], MODEL).get("10.4.0.1") is None
    assert deployment.score_tokens(new, MODEL) == {"10.4.0.1": 4.0}


def test_killed_shard_is_rebuilt_from_snapshot_and_replay(deployment: Client, fleet: Fleet) -> None:
    rng = random.Random(5)
    pods = [fleet.add(f"10.5.0.{i}") for i in range(4)]
    prompts = _prompts(rng, 24)
    for i, p in enumerate(prompts[:12]):
        pods[i % 4].serve(p)
    assert fleet.sync()
    ray.get(deployment.controller.snapshot_now.remote())
    for i, p in enumerate(prompts[12:]):
        pods[i % 4].serve(p)
    assert fleet.sync()
    before = {tuple(p): deployment.score_tokens(p, MODEL) for p in prompts}
    assert deployment.replica is not None
    loaded = deployment.replica.stats().snapshots_loaded
    victim = deployment.shards[deployment.owner("10.5.0.0")]
    ray.kill(victim, no_restart=False)
    ref = fleet.reference()
    direct = kvray.connect(deployment.namespace, replica=False)  # asks the shards themselves

    def rebuilt(_: Client) -> bool:
        try:
            st: ShardStats = ray.get(victim.stats.remote(), timeout=5)
            return st.restored_from_snapshot and all(
                direct.score_tokens(p, MODEL) == ref.score_tokens(p, MODEL) for p in prompts
            )
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return False

    ok = wait_until(deployment, rebuilt, timeout_s=60, interval_s=0.2)
    assert ok, str(deployment.stats().ingestors)
    assert {tuple(p): direct.score_tokens(p, MODEL) for p in prompts} == before
    # The replica follows the restarted shard's new stream (a new snapshot) and agrees.
    assert wait_until(
        deployment,
        lambda c: c.replica is not None and c.replica.stats().snapshots_loaded > loaded,
        timeout_s=10,
    )
    assert sync(deployment)
    assert {tuple(p): deployment.score_tokens(p, MODEL) for p in prompts} == before


def test_speculative_route_then_real_events(deployment: Client, fleet: Fleet) -> None:
    """The pod's own events settle a route's speculative entries: its stored blocks stay
    (confirmed), the rest expire; an eviction takes a block away at once."""
    pod = fleet.add("10.6.0.1")
    toks = list(range(1000, 1064))
    # A TTL no stall between record and score can outlast; the expiry is waited for.
    deployment.record_route("10.6.0.1", MODEL, toks, ttl_s=3.0)
    assert deployment.score_tokens(toks, MODEL) == {"10.6.0.1": 4.0}
    pod.serve(toks[:32])
    assert fleet.sync()
    ok = wait_until(
        deployment, lambda c: c.score_tokens(toks, MODEL) == {"10.6.0.1": 2.0}, timeout_s=20
    )
    assert ok, deployment.score_tokens(toks, MODEL)


def test_prompt_scoring_through_tokenizer_actor(deployment: Client, fleet: Fleet) -> None:
    from kvray.tokenization import load_tokenizer

    tok = load_tokenizer(find_bundled_qwen3())
    prompt = "You are a helpful assistant. " * 20 + "What is the capital of France?"
    tokens = tok.encode(prompt)
    pod = fleet.add("10.7.0.1")
    pod.serve(tokens)
    assert fleet.sync()
    want = {"10.7.0.1": float(len(tokens) // 16)}
    assert deployment.score_prompt(prompt, MODEL) == want
    assert deployment.score_prompt(prompt, MODEL, pods=["nobody"]) == {}


def test_replica_answers_like_the_shards_without_calling_them(
    deployment: Client, fleet: Fleet
) -> None:
    assert deployment.replica is not None and deployment.replica.ready()
    direct = kvray.connect(NS, replica=False)
    rng = random.Random(11)
    prompts = _prompts(rng, 40)
    pods = [fleet.add(f"10.11.0.{i}") for i in range(4)]
    for i, p in enumerate(prompts):
        pods[i % 4].serve(p)  # 64-block pods: evictions (BlockRemoved) happen too
    assert fleet.sync()
    ops_before = sum(s.ops for s in deployment.stats().shards)
    served = [p for p in prompts if direct.score_tokens(p, MODEL)]
    assert served
    for p in prompts:
        assert deployment.score_tokens(p, MODEL) == direct.score_tokens(p, MODEL)
        some = ["10.11.0.1", "10.11.0.2"]
        assert deployment.score_tokens(p, MODEL, pods=some) == direct.score_tokens(
            p, MODEL, pods=some
        )
    assert deployment.replica.positions()["10.11.0.1"] == pods[1].publisher.seq - 1  # type: ignore[union-attr]
    # Speculative entries reach the replica before record_route returns, and expire there
    # with no event and no score call reaching the shard.
    toks = list(range(5000, 5064))
    # (A TTL no stall between the two calls can outlast: the expiry is then waited for.)
    deployment.record_route("10.11.0.3", MODEL, toks, ttl_s=3.0)
    assert deployment.score_tokens(toks, MODEL) == {"10.11.0.3": 4.0}
    assert wait_until(deployment, lambda c: c.score_tokens(toks, MODEL) == {}, timeout_s=20)
    assert direct.score_tokens(toks, MODEL) == {}
    # Scoring on the replica sent the shards no work (ops counts only event batches).
    assert sum(s.ops for s in deployment.stats().shards) == ops_before


def test_connect_refuses_a_replica_the_shards_do_not_feed(
    ray_session: None, tmp_path: Path
) -> None:
    cfg = Config(
        namespace=NS + "-norep",
        num_shards=1,
        replica={"enabled": False},
        snapshots={"dir": str(tmp_path / "snaps"), "interval_s": 3600},
    )
    runtime.start(cfg)
    try:
        # The snapshot directory comes from the config (kvray.yaml, KVRAY_SNAPSHOTS__DIR or a
        # Serve config's args), not only from runtime.start's argument.
        st = ray.get(kvray.connect(cfg.namespace).controller.status.remote())
        assert Path(st["snapshots"]) == tmp_path / "snaps"
        assert kvray.connect(cfg.namespace).replica is None
        with pytest.raises(ConfigError, match="do not publish"):
            kvray.connect(cfg.namespace, replica=True)
    finally:
        runtime.stop(cfg.namespace)


def test_an_unchanged_shard_is_not_copied_again(deployment: Client, fleet: Fleet) -> None:
    """The controller's snapshot pull skips a shard with no write since its last copy, and
    takes one again after a write (the held snapshot stays the restorable state)."""
    pod = fleet.add("10.9.0.1")
    pod.serve([random.Random(9).randrange(150_000) for _ in range(64)])
    assert fleet.sync()
    shard = deployment.shards[deployment.owner("10.9.0.1")]
    version, data = ray.get(shard.snapshot_if_changed.remote(None))
    assert data is not None
    again, none = ray.get(shard.snapshot_if_changed.remote(version))
    assert none is None and tuple(again) == tuple(version)
    assert ray.get(shard.snapshot_if_changed.remote(("another-life", version[1])))[1] is not None
    pod.serve([random.Random(10).randrange(150_000) for _ in range(64)])
    assert fleet.sync()
    after, data2 = ray.get(shard.snapshot_if_changed.remote(version))
    assert data2 is not None and tuple(after) != tuple(version)
    assert ray.get(deployment.controller.snapshot_now.remote()) == len(deployment.shards)
    i = deployment.owner("10.9.0.1")
    held = ray.get(deployment.controller.latest_snapshot.remote(i))
    assert held == ray.get(shard.snapshot.remote())  # what it holds is the shard's state now
    # ... in a file on the controller's node (this machine), not in the controller's memory
    st = ray.get(deployment.controller.status.remote())
    assert st["snapshot_bytes_in_memory"] == 0
    assert (Path(st["snapshots"]) / f"shard-{i}.snapshot").read_bytes() == held
