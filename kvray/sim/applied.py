"""``wait_applied``: wait until what publishers sent is applied and visible (demo, benchmarks,
tests). Given what the publishers sent, each reader (ingestor actor, shard reading its own
pods) answers one blocking call when its part is applied; without it, the readers' progress is
polled. Nothing here is part of the client's serving path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from kvray.client import Client


class _Backoff:
    """Sleeps 1 ms, then 1.5× longer each call, up to 50 ms."""

    def __init__(self) -> None:
        self.s = 0.001

    def __call__(self) -> None:
        time.sleep(self.s)
        self.s = min(0.05, self.s * 1.5)


def _wait_streams(client: Client, want: dict[str, int], deadline: float) -> bool:
    """Until every stream of ``want`` is applied: one blocking call per reader
    (``Ingestor.wait_streams``, ``IndexShard.ingest_wait``), each answering when its part is
    complete (or after a second, then asked again for what is left); no polling."""
    calls = [i.wait_streams for i in client.ingestors]
    calls += [s.ingest_wait for s in client.shards]
    left = dict(want)
    pending = {f.remote(dict(left), 1.0): n for n, f in enumerate(calls)}
    while left:
        now = time.monotonic()
        if now > deadline:
            return False
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=deadline - now)
        for ref in ready:
            n = pending.pop(ref)
            got = ray.get(ref)
            for name, seq in (got or {}).items():
                if seq >= left.get(name, seq + 1):
                    del left[name]
            if left:  # a reader that answered is asked briefly: its part is likely done
                pending[calls[n].remote(dict(left), 1.0 if got is None else 0.2)] = n
    return True


def wait_applied(
    client: Client, expect: dict[str, int] | None = None, timeout_s: float = 30.0
) -> bool:
    """Wait until events are applied (and, with a replica, visible in ``client``'s).

    Args:
        expect: pod (stream ``"<pod>#<rank>"`` or bare pod for rank 0) → the next seq its
            publisher will use, i.e. how many batches it sent. Without it, only what the
            readers already received is waited for.
        timeout_s: give up after this long (returns False).
    """
    deadline = time.monotonic() + timeout_s
    if expect:
        want = {(k if "#" in k else f"{k}#0"): v for k, v in expect.items()}
        if not _wait_streams(client, want, deadline):
            return False
    else:
        # Every reader (ingestor actors, shards reading their own pods): poll until what it
        # had received is applied.
        readers = [i.progress for i in client.ingestors]
        readers += [s.ingest_progress for s in client.shards]
        targets = [r for r, _, _ in ray.get([f.remote() for f in readers])]
        nap = _Backoff()  # polls are actor calls that compete with the work waited for
        while True:
            prog = ray.get([f.remote() for f in readers])
            if all(
                shipped >= t and not inflight
                for t, (_, shipped, inflight) in zip(targets, prog, strict=True)
            ):
                break
            if time.monotonic() > deadline:
                return False
            nap()
    if client.replica is None:
        return True
    at = ray.get([s.replica_seq.remote() for s in client.shards], timeout=client.timeout_s)
    left = max(0.1, deadline - time.monotonic())
    return client.replica.wait_for({i: tuple(a) for i, a in enumerate(at)}, left)
