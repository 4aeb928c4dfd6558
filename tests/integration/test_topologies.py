"""The vLLM-default topology: pods BIND their PUB socket and kvray connects, incl. an empty
topic (pod id from config) and a data-parallel rank ≥ 1 as a distinct holder."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config, EventsConfig, PodEndpoint
from kvray.sim import SimPod, SimPublisher
from tests.helpers import sync, wait_until

NS = "kvray-it-topologies"


@pytest.fixture(scope="module")
def deployment(ray_session: None) -> Iterator[Client]:
    runtime.start(Config(namespace=NS, num_shards=2), snapshot_interval_s=3600)
    yield kvray.connect(NS)
    runtime.stop(NS)


def test_pods_that_bind_with_empty_topic_and_dp_ranks(deployment: Client) -> None:
    pubs = []
    pods = []
    for rank in (0, 1):
        # vLLM's default endpoint binds (tcp://*:5557, + rank); port 0 here: the OS picks.
        pub = SimPublisher(
            "tcp://127.0.0.1:0", "", replay_endpoint="tcp://127.0.0.1:0", data_parallel_rank=rank
        )
        deployment.add_pod(pub.endpoint, pub.replay_endpoint, "10.8.0.1", "m")
        assert pub.wait_connected()
        pubs.append(pub)
        pods.append(SimPod("10.8.0.1", "m", publisher=pub))
    toks_a = list(range(100, 164))
    toks_b = list(range(200, 232))
    pods[0].serve(toks_a)
    pods[1].serve(toks_b)
    pubs[1].drop_next = 1  # a gap on rank 1's stream, healed from its own replay socket
    pods[1].serve(toks_a[:32])
    pods[1].serve(toks_a)
    assert sync(deployment, {"10.8.0.1#0": pubs[0].seq, "10.8.0.1#1": pubs[1].seq})
    assert deployment.score_tokens(toks_a, "m") == {"10.8.0.1": 4.0, "10.8.0.1#dp1": 4.0}
    assert deployment.score_tokens(toks_b, "m") == {"10.8.0.1#dp1": 2.0}
    holders = {p["pod"] for p in deployment.pods()}
    assert {"10.8.0.1", "10.8.0.1#dp1"} <= holders
    # Added by name, the pod is pinned: both ranks live on (and are read by) one shard.
    shard_of_holder = {p["pod"]: p["shard"] for p in deployment.pods()}
    assert shard_of_holder["10.8.0.1"] == shard_of_holder["10.8.0.1#dp1"]
    assert deployment.owner("10.8.0.1#dp1") == shard_of_holder["10.8.0.1"]
    for pub in pubs:
        pub.close()


def test_unparseable_topic_is_counted_not_fatal(deployment: Client) -> None:
    ing = deployment.ingestors[0]
    before = deployment.stats().ingestors[0].malformed.get("topic", 0)
    pub = SimPublisher("tcp://127.0.0.1:0", "not-a-kv-topic")
    ray.get(ing.add_pod.remote(PodEndpoint(endpoint=pub.endpoint)))  # no pod id configured
    assert pub.wait_connected()
    SimPod("x", "m", publisher=pub).serve(list(range(32)))
    assert wait_until(
        deployment, lambda c: c.stats().ingestors[0].malformed.get("topic", 0) > before
    )
    good = SimPublisher("tcp://127.0.0.1:0", "kv@10.8.0.9@m")
    ray.get(ing.add_pod.remote(PodEndpoint(endpoint=good.endpoint)))
    assert good.wait_connected()
    SimPod("10.8.0.9", "m", publisher=good).serve(list(range(32)))
    assert sync(deployment, {"10.8.0.9": good.seq})
    assert deployment.score_tokens(list(range(32)), "m") == {"10.8.0.9": 2.0}
    pub.close()
    good.close()


def test_another_client_learns_a_pin_and_routes_to_the_pinned_shard(deployment: Client) -> None:
    """A pod pinned through one client is found by a client that connected before: once its
    cached pins are older than a second, a pod they do not name makes it ask the controller."""
    other = kvray.connect(deployment.namespace, replica=False)
    pub = SimPublisher("tcp://127.0.0.1:0", "kv@10.13.0.1@m")
    try:
        deployment.add_pod(pub.endpoint, None, "10.13.0.1", "m")
        pin = ray.get(deployment.controller.pins.remote())["10.13.0.1"]
        assert deployment.owner("10.13.0.1") == pin
        time.sleep(1.1)  # past the client's trust in pins it fetched
        assert not other.placement.is_pinned("10.13.0.1")  # its pins predate the add_pod
        assert other.owner("10.13.0.1") == other.owner("10.13.0.1#dp2") == pin
        assert other.placement.is_pinned("10.13.0.1")  # asked the controller
        assert pub.wait_connected()
        SimPod("10.13.0.1", "m", publisher=pub).serve(list(range(48)))
        assert sync(deployment, {"10.13.0.1": pub.seq})
        # Without a replica, a pod-restricted query asks only the owning (pinned) shard.
        assert other.score_tokens(list(range(48)), "m", pods=["10.13.0.1"]) == {"10.13.0.1": 3.0}
    finally:
        pub.close()
        other.close()


def test_named_pods_are_read_by_their_shard_which_recovers_after_a_kill(
    deployment: Client,
) -> None:
    """``add_pod`` with a name: the owning shard reads the pod itself (no ingestor hop); a
    killed shard comes back from its snapshot, reads its pods again and replays the rest."""
    rng = random.Random(3)
    before = {str(s.ingestor): s.messages for s in deployment.stats().ingestors}
    pods = []
    for i in range(4):
        pub = SimPublisher(
            "tcp://127.0.0.1:0", f"kv@10.12.0.{i}@m", replay_endpoint="tcp://127.0.0.1:0"
        )
        deployment.add_pod(pub.endpoint, pub.replay_endpoint, f"10.12.0.{i}", "m")
        assert pub.wait_connected()
        pods.append(SimPod(f"10.12.0.{i}", "m", num_blocks=48, publisher=pub))
    prompts = [[rng.randrange(9000) for _ in range(rng.randint(16, 96))] for _ in range(24)]
    for i, p in enumerate(prompts[:12]):
        pods[i % 4].serve(p)
    assert sync(deployment, {p.pod_id: p.publisher.seq for p in pods})  # type: ignore[union-attr]
    assert _truth(deployment, pods, prompts)
    # The controller spread the named pods evenly (a hash would often put 3 of 4 on one).
    pins = ray.get(deployment.controller.pins.remote())
    assert {p.pod_id for p in pods} <= set(pins)
    loads = [list(pins.values()).count(i) for i in range(2)]
    assert max(loads) - min(loads) <= 1
    assert all(deployment.owner(p.pod_id) == pins[p.pod_id] for p in pods)
    on_shard = {p["pod"]: p["shard"] for p in deployment.pods()}
    assert all(on_shard[p.pod_id] == pins[p.pod_id] for p in pods)
    ings = {str(s.ingestor): s for s in deployment.stats().ingestors}
    owners = {f"shard{deployment.owner(p.pod_id)}" for p in pods}
    assert all(ings[o].messages > before.get(o, 0) for o in owners)
    # The ingestor actor saw none of them.
    assert all(s.messages == before.get(n, 0) for n, s in ings.items() if n not in owners)

    ray.get(deployment.controller.snapshot_now.remote())
    victim = deployment.shards[deployment.owner("10.12.0.0")]
    ray.kill(victim, no_restart=False)
    for i, p in enumerate(prompts[12:]):  # published while the shard is down or restarting
        pods[i % 4].serve(p)
    assert wait_until(
        deployment, lambda c: _truth(c, pods, prompts, direct=True), timeout_s=60, interval_s=0.25
    )
    # The replica follows the restarted shard too.
    assert wait_until(deployment, lambda c: _truth(c, pods, prompts), timeout_s=10)
    for pod in pods:
        pod.publisher.close()  # type: ignore[union-attr]
        deployment.remove_pod(pod.pod_id)


def _truth(
    client: Client, pods: list[SimPod], prompts: list[list[int]], direct: bool = False
) -> bool:
    """Scores (from the replica, or from the shards) == what each simulated pod holds."""
    try:
        for p in prompts:
            want = {pod.pod_id: float(n) for pod in pods if (n := pod.cached_prefix_blocks(p))}
            names = [pod.pod_id for pod in pods]
            if direct:
                keys = client.block_keys(p, "m")
                refs = [s.score.remote(keys, names) for s in client.shards]
                got: dict[str, float] = {}
                for part in ray.get(refs, timeout=5):
                    got.update(part)
            else:
                got = client.score_tokens(p, "m", pods=names)
            if got != want:
                return False
    except (
        ray.exceptions.RayActorError,
        ray.exceptions.ActorUnavailableError,
        ray.exceptions.GetTimeoutError,
    ):
        return False
    return True


def test_named_pods_in_the_config_are_read_by_their_shards(ray_session: None) -> None:
    """``events.connect`` entries with a pod name: the owning shard subscribes at start."""
    pubs = [
        SimPublisher("tcp://127.0.0.1:0", "", replay_endpoint="tcp://127.0.0.1:0") for _ in range(3)
    ]
    connect = [
        PodEndpoint(
            endpoint=p.endpoint, replay_endpoint=p.replay_endpoint, pod=f"cfg{i}", model="m"
        )
        for i, p in enumerate(pubs)
    ]
    cfg = Config(namespace=NS + "-cfg", num_shards=2, events=EventsConfig(connect=connect))
    runtime.start(cfg, snapshot_interval_s=3600)
    try:
        client = kvray.connect(cfg.namespace)
        for p in pubs:
            assert p.wait_connected()
        pods = [SimPod(f"cfg{i}", "m", publisher=p) for i, p in enumerate(pubs)]
        toks = list(range(300, 364))
        for i, pod in enumerate(pods):
            pod.serve(toks[: 16 * (i + 2)])
        assert sync(client, {f"cfg{i}": p.seq for i, p in enumerate(pubs)})
        assert client.score_tokens(toks, "m") == {"cfg0": 2.0, "cfg1": 3.0, "cfg2": 4.0}
        ings = {str(s.ingestor): s.messages for s in client.stats().ingestors}
        assert ings.get("0", 0) == 0  # the ingestor actor read none of them
        assert sum(v for k, v in ings.items() if k.startswith("shard")) == 3
    finally:
        for p in pubs:
            p.close()
        runtime.stop(cfg.namespace)


def test_pods_are_added_and_removed_from_the_command_line(
    deployment: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kvray pods add/remove``: a pod registered and forgotten without a config edit."""
    from kvray.cli import main

    pub = SimPublisher("tcp://127.0.0.1:0", "kv@10.14.0.1@m")
    ns = ["--namespace", deployment.namespace]
    try:
        assert main(["pods", "add", pub.endpoint, "--pod", "10.14.0.1", "--model", "m", *ns]) == 0
        assert pub.wait_connected()
        toks = list(range(7000, 7048))
        SimPod("10.14.0.1", "m", publisher=pub).serve(toks)
        assert sync(deployment, {"10.14.0.1": pub.seq})
        assert deployment.score_tokens(toks, "m") == {"10.14.0.1": 3.0}
        assert main(["pods", "list", *ns]) == 0
        assert '"10.14.0.1"' in capsys.readouterr().out
        assert main(["pods", "remove", "10.14.0.1", *ns]) == 0
        assert wait_until(deployment, lambda c: c.score_tokens(toks, "m") == {}, timeout_s=10)
    finally:
        pub.close()


def test_a_pod_added_while_publishing_is_caught_up_from_its_replay_buffer(
    deployment: Client,
) -> None:
    """Subscribed after its first batches (a replica registered at runtime): the first batch
    kvray sees makes it fetch the earlier ones from the pod's replay socket."""
    pub = SimPublisher("tcp://127.0.0.1:0", "kv@10.15.0.1@m", replay_endpoint="tcp://127.0.0.1:0")
    try:
        pod = SimPod("10.15.0.1", "m", publisher=pub)
        early = [list(range(8000 + 64 * i, 8064 + 64 * i)) for i in range(3)]
        for p in early:
            pod.serve(p)  # nobody listens yet
        deployment.add_pod(pub.endpoint, pub.replay_endpoint, "10.15.0.1", "m")
        assert pub.wait_connected()
        late = list(range(9000, 9032))
        pod.serve(late)
        assert sync(deployment, {"10.15.0.1": pub.seq})
        got = [deployment.score_tokens(p, "m") for p in [*early, late]]
        want = [{"10.15.0.1": float(len(p) // 16)} for p in [*early, late]]
        assert got == want, deployment.stats().ingestors  # replay counters, if it failed
    finally:
        pub.close()
        deployment.remove_pod("10.15.0.1")


def test_a_shard_answers_a_wait_when_its_streams_are_applied(deployment: Client) -> None:
    """``IndexShard.ingest_wait`` (what ``wait_applied`` calls): None after its timeout for a
    stream it does not read, at once for one already applied, and, while it blocks, the shard
    still answers its other calls (the wait has threads of its own)."""
    pub = SimPublisher("tcp://127.0.0.1:0", "")
    deployment.add_pod(pub.endpoint, None, "10.8.0.7", "m")
    assert pub.wait_connected()
    pod = SimPod("10.8.0.7", "m", publisher=pub)
    pod.serve(list(range(300, 364)))
    pod.serve(list(range(400, 432)))
    shard = deployment.shards[deployment.owner("10.8.0.7")]
    blocked = shard.ingest_wait.remote({"10.8.0.99#0": 1}, 2.0)  # nobody reads this pod
    t0 = time.monotonic()
    assert ray.get(shard.ping.remote(), timeout=10) is not None
    assert time.monotonic() - t0 < 1.5  # not queued behind the blocked wait
    got = ray.get(shard.ingest_wait.remote({"10.8.0.7#0": pub.seq}, 10.0), timeout=15)
    assert got == {"10.8.0.7#0": pub.seq}
    assert sync(deployment, {"10.8.0.7": pub.seq})  # applied in the shard; now in the replica
    assert deployment.score_tokens(list(range(300, 364)), "m") == {"10.8.0.7": 4.0}
    assert ray.get(blocked, timeout=10) is None
    pub.close()
