"""A multi-node kvray on ``ray.cluster_utils.Cluster`` (run as a script: it owns its cluster).

Three nodes (head + 2 workers); the 2 shards must land on different nodes (SPREAD) and
scoring must still be exact. Prints ``MULTINODE OK <nodes>`` on success.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import kvray  # noqa: E402
from kvray import runtime  # noqa: E402
from kvray.config import Config, EventsConfig  # noqa: E402
from kvray.sim import SimPod, SimPublisher  # noqa: E402
from kvray.sim.applied import wait_applied as sync  # noqa: E402


def main() -> int:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 128 * 2**20,
            "include_dashboard": False,
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    unclosed = None
    follower = None
    try:
        runtime.start(
            Config(namespace="mn", num_shards=2, events=EventsConfig(bind=["tcp://127.0.0.1:0"]))
        )
        client = kvray.connect("mn")
        # Left open on purpose: its follower must stop by itself once Ray is shut down, and
        # never auto-connect this process to another cluster (which broke cluster.shutdown()).
        unclosed = kvray.connect("mn")
        nodes = ray.get([s.node_id.remote() for s in client.shards])
        assert len(set(nodes)) == 2, f"shards share a node: {nodes}"
        ref = kvray.Indexer()
        pubs = []
        for i in range(6):
            pub = SimPublisher(
                client.endpoints[0][0], f"kv@10.0.1.{i}@m", replay_endpoint="tcp://127.0.0.1:0"
            )
            assert pub.wait_connected()
            pubs.append(pub)
            SimPod(f"10.0.1.{i}", "m", publisher=pub).serve(list(range(i * 16, 160)))
        assert sync(client, {f"10.0.1.{i}": p.seq for i, p in enumerate(pubs)})
        for pub in pubs:
            for frames in pub.history():
                ref.apply(frames)
        for start in range(0, 96, 16):
            prompt = list(range(start, 160))
            got, want = client.score_tokens(prompt, "m"), ref.score_tokens(prompt, "m")
            assert got == want and got, (got, want)
        print(f"MULTINODE OK {len(set(nodes))}", flush=True)

        # Remove a worker node that hosts a shard (and not the controller or the ingestor):
        # the shard's placement-group bundle moves, the shard restarts from the controller's
        # snapshot, and the ingestor replays what came after from the pods.
        ray.get(client.controller.snapshot_now.remote())
        keep = {
            ray.get(client.controller.node_id.remote()),
            ray.get(client.ingestors[0].node_id.remote()),
            cluster.head_node.node_id,
        }
        victims = [n for n in cluster.worker_nodes if n.node_id in set(nodes) - keep]
        if not victims:
            print("NODE REMOVAL SKIPPED: no shard-only worker node")
        else:
            victim = victims[0]
            moving = [i for i, n in enumerate(nodes) if n == victim.node_id]
            before = {i: _incarnation(client.shards[i]) for i in moving}
            pids = {i: _pid(client.shards[i]) for i in moving}
            for i, pub in enumerate(pubs):
                client.register_replay(f"10.0.1.{i}", pub.replay_endpoint or "")
            _lose_node(cluster, victim, list(pids.values()))
            for i, pub in enumerate(pubs):  # traffic continues after the node is gone
                SimPod(f"10.0.1.{i}", "m", publisher=pub).serve(list(range(500 + i * 16, 700)))
            ref = kvray.Indexer()
            for pub in pubs:
                for frames in pub.history():
                    ref.apply(frames)
            checks = [(0, 160), (16, 160), (500, 700), (516, 700)]

            def recovered() -> bool:
                """Every shard answers from a live node, each moved shard is a new
                incarnation restored from its snapshot, and the scores are exact again."""
                try:
                    where = ray.get([s.node_id.remote() for s in client.shards], timeout=10)
                    if victim.node_id in where:
                        return False
                    for i in moving:
                        st = ray.get(client.shards[i].stats.remote(), timeout=10)
                        if _incarnation(client.shards[i]) == before[i]:
                            return False
                        if not st.restored_from_snapshot:
                            raise AssertionError(f"shard {i} restarted without its snapshot")
                    return all(
                        client.score_tokens(list(range(s, e)), "m")
                        == ref.score_tokens(list(range(s, e)), "m")
                        for s, e in checks
                    )
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    return False  # a shard still restarting (or its handle not yet updated)

            assert _wait(recovered, timeout_s=180), (
                "index did not converge on restarted shards after the node was removed"
            )
            print("NODE REMOVAL OK", flush=True)
        for pub in pubs:
            pub.close()
        client.close()
        runtime.stop("mn")
    finally:
        ray.shutdown()
        follower = unclosed.replica._thread if unclosed and unclosed.replica else None
        if follower is not None:
            follower.join(timeout=10)
        cluster.shutdown()
    if follower is not None and follower.is_alive():
        print("an unclosed client's follower outlived ray.shutdown()", flush=True)
        return 1
    if ray.is_initialized():
        print("a background thread re-connected Ray after ray.shutdown()", flush=True)
        return 1
    return 0


def _wait(done: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    """Poll ``done()`` until it holds or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(interval_s)
    return done()


def _incarnation(shard: Any) -> str:
    return str(ray.get(shard.get_positions.remote(), timeout=10)[0])


def _pid(actor: Any) -> int:
    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=10))


def _lose_node(cluster: Cluster, node: Any, pids: list[int]) -> None:
    """Take a worker node away as a machine loss does: its processes go with it.

    ``Cluster.remove_node`` kills the node's raylet without reaping it, and the node's worker
    processes outlive it for seconds while still serving direct actor calls: an orphaned
    shard keeps applying ops and publishing changes until Ray restarts it elsewhere (seen
    here: scores "converged" 1 s after the removal, the shard restarted 11 s later). Killing
    those workers too makes the restart, the snapshot and the replay the path under test.
    """
    cluster.remove_node(node, allow_graceful=False)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
