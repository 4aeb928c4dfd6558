"""``OwnPods``: a shard reading the pods it owns itself (no ingestor hop, no Ray call).

``Controller.add_pod`` sends a named pod that binds its PUB socket to the shard owning it, and
the shard reads ``events.connect`` entries with a pod name it owns. It runs the ingestor's code
(``Ingestor`` with a ``LocalShard``) in its own process, created on first use; the batches of
its own holders are decoded once and applied by a direct call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from kvray.actors.naming import ask_controller
from kvray.config import Config, PodEndpoint
from kvray.core.events import EventBatch, FrameHead
from kvray.core.messages import ApplyReply, IngestorStats, Op
from kvray.core.ordering import OrderedApplier

if TYPE_CHECKING:
    from kvray.actors.ingestor import Ingestor


class OwnPods:
    """The shard's in-process pod reader (an ``Ingestor`` with a ``LocalShard``)."""

    def __init__(
        self,
        shard_id: int,
        config: Config,
        apply: Callable[[list[Op]], ApplyReply],
        get_positions: Callable[[], tuple[str, dict[str, int]]],
        new_decoder: Callable[[], Callable[[bytes], EventBatch | FrameHead]],
    ) -> None:
        self.shard_id = shard_id
        self.config = config
        self._apply = apply
        self._get_positions = get_positions
        self._new_decoder = new_decoder
        self.replay_hints: dict[str, str] = {}
        self.reader: Ingestor | None = None

    def start(
        self, applier: OrderedApplier | None = None, resume: list[dict[str, Any]] | None = None
    ) -> Ingestor:
        """The reader, started on first use; ``resume``: pods (``PodEndpoint`` documents)
        whose streams continue from ``applier``'s positions (after a restart: catch up by
        replay from where each holder stopped)."""
        if self.reader is None:
            from kvray.actors.ingestor import Ingestor, LocalShard
            from kvray.actors.naming import shard_name

            positions: dict[str, int] = {}
            models: dict[str, str] = {}
            if applier is not None and resume:
                positions, models = applier.mine(p["pod"] for p in resume)
            local = LocalShard(
                self.shard_id, self._apply, self._get_positions, positions, models,
                list(resume or ()), dict(self.replay_hints), self._new_decoder(),
            )  # fmt: skip
            names = [shard_name(i) for i in range(self.config.num_shards)]
            self.reader = Ingestor(-1 - self.shard_id, self.config.model_dump(), names, local=local)
        return self.reader

    def add(self, pod: PodEndpoint) -> None:
        self.start().add_pod(pod)

    def register_replay(self, pod: str, replay_endpoint: str) -> None:
        self.replay_hints[pod] = replay_endpoint
        if self.reader is not None:
            self.reader.register_replay(pod, replay_endpoint)

    def forget(self, pod: str) -> int:
        return self.reader.forget_pod(pod) if self.reader is not None else 0

    def progress(self) -> tuple[int, int, int]:
        return self.reader.progress() if self.reader is not None else (0, 0, 0)

    def wait_streams(self, want: dict[str, int], timeout_s: float) -> dict[str, int] | None:
        if self.reader is None:  # reads nothing (yet): nothing of ``want`` will complete here
            time.sleep(timeout_s)
            return None
        got: dict[str, int] | None = self.reader.wait_streams(want, timeout_s)
        return got

    def stats(self) -> IngestorStats | None:
        """The reader's stats, named ``shard<i>``."""
        if self.reader is None:
            return None
        return msgspec.structs.replace(self.reader.stats(), ingestor=f"shard{self.shard_id}")

    def stop(self) -> None:
        """Stop the reader (tests simulate a dead reader with it)."""
        if self.reader is not None:
            self.reader.stop()
            self.reader = None

    def resubscribe(self, applier: OrderedApplier, restarted: bool) -> None:
        """Read the named pods of ``events.connect`` this shard owns and, after a restart,
        again the pods the controller sent here (they continue from the restored positions)."""
        ev = self.config.events
        if not ev.shard_reads_named_pods:
            return
        placement = self.config.placement()
        pods = [
            spec.model_dump()
            for spec in ev.connect
            if spec.pod and placement.owner(spec.pod) == self.shard_id
        ]
        if restarted:  # (no controller: a standalone shard)
            got = ask_controller(self.config.namespace, "shard_memory", self.shard_id)
            if got is not None:
                pods += got["pods"]
                self.replay_hints.update(got["replay"])
        if pods:
            self.start(applier, resume=pods)
