"""``wait_applied``: wait until what publishers sent is applied and visible (demo, benchmarks,
tests). It polls the readers' progress through their actor methods; nothing here is part of the
client's serving path.
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
    nap = _Backoff()  # polls are actor calls that compete with the work waited for
    if expect:
        want = {(k if "#" in k else f"{k}#0"): v for k, v in expect.items()}
        while True:
            seen: dict[str, int] = {}
            refs = [i.streams.remote() for i in client.ingestors]
            refs += [s.ingest_streams.remote() for s in client.shards]
            for part in ray.get(refs):
                seen.update(part)
            if all(seen.get(k, 0) >= v for k, v in want.items()):
                break
            if time.monotonic() > deadline:
                return False
            nap()
    # Every reader (ingestor actors, shards reading their own pods): poll until what it had
    # received is applied.
    readers = [i.progress for i in client.ingestors] + [s.ingest_progress for s in client.shards]
    targets = [r for r, _, _ in ray.get([f.remote() for f in readers])]
    nap = _Backoff()
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
