"""The vLLM-default topology: pods BIND their PUB socket and kvray connects, incl. an empty
topic (pod id from config) and a data-parallel rank ≥ 1 as a distinct holder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

import kvray
from kvray import runtime
from kvray.client import Client
from kvray.config import Config
from kvray.sim import SimPod, SimPublisher

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
    assert deployment.sync({"10.8.0.1#0": pubs[0].seq, "10.8.0.1#1": pubs[1].seq})
    assert deployment.score_tokens(toks_a, "m") == {"10.8.0.1": 4.0, "10.8.0.1#dp1": 4.0}
    assert deployment.score_tokens(toks_b, "m") == {"10.8.0.1#dp1": 2.0}
    holders = {p["pod"] for p in deployment.pods()}
    assert {"10.8.0.1", "10.8.0.1#dp1"} <= holders
    for pub in pubs:
        pub.close()


def test_unparseable_topic_is_counted_not_fatal(deployment: Client) -> None:
    ing = deployment.ingestors[0]
    before = deployment.stats()["ingestors"][0]["malformed"].get("topic", 0)
    pub = SimPublisher("tcp://127.0.0.1:0", "not-a-kv-topic")
    ray.get(ing.add_pod.remote(pub.endpoint))  # no pod id configured for it
    assert pub.wait_connected()
    SimPod("x", "m", publisher=pub).serve(list(range(32)))
    assert deployment.wait_until(
        lambda c: c.stats()["ingestors"][0]["malformed"].get("topic", 0) > before
    )
    good = SimPublisher("tcp://127.0.0.1:0", "kv@10.8.0.9@m")
    ray.get(ing.add_pod.remote(good.endpoint))
    assert good.wait_connected()
    SimPod("10.8.0.9", "m", publisher=good).serve(list(range(32)))
    assert deployment.sync({"10.8.0.9": good.seq})
    assert deployment.score_tokens(list(range(32)), "m") == {"10.8.0.9": 2.0}
    pub.close()
    good.close()
