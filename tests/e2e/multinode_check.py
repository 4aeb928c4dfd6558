"""A multi-node kvray on ``ray.cluster_utils.Cluster`` (run as a script: it owns its cluster).

Three nodes (head + 2 workers); the 2 shards must land on different nodes (SPREAD) and
scoring must still be exact. Prints ``MULTINODE OK <nodes>`` on success.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import kvray  # noqa: E402
from kvray import runtime  # noqa: E402
from kvray.config import Config, EventsConfig  # noqa: E402
from kvray.sim import SimPod, SimPublisher  # noqa: E402


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
    try:
        runtime.start(
            Config(namespace="mn", num_shards=2, events=EventsConfig(bind=["tcp://127.0.0.1:0"]))
        )
        client = kvray.connect("mn")
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
        assert client.sync({f"10.0.1.{i}": p.seq for i, p in enumerate(pubs)})
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
            for i, pub in enumerate(pubs):
                client.register_replay(f"10.0.1.{i}", pub.replay_endpoint or "")
            cluster.remove_node(victims[0])
            for i, pub in enumerate(pubs):  # traffic continues after the node is gone
                SimPod(f"10.0.1.{i}", "m", publisher=pub).serve(list(range(500 + i * 16, 700)))
            ref = kvray.Indexer()
            for pub in pubs:
                for frames in pub.history():
                    ref.apply(frames)
            deadline = time.monotonic() + 120
            ok = False
            while time.monotonic() < deadline and not ok:
                try:
                    ok = all(
                        client.score_tokens(list(range(s, e)), "m")
                        == ref.score_tokens(list(range(s, e)), "m")
                        for s, e in [(0, 160), (16, 160), (500, 700), (516, 700)]
                    )
                except ray.exceptions.RayError:
                    ok = False
                time.sleep(0.5)
            assert ok, "index did not converge after the node was removed"
            moved = ray.get([s.node_id.remote() for s in client.shards])
            assert victims[0].node_id not in moved
            print("NODE REMOVAL OK", flush=True)
        for pub in pubs:
            pub.close()
        runtime.stop("mn")
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
