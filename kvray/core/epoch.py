"""``EpochGuard``: did a shared backend lose a shard's content during an outage?

A shared backend (Redis) can restart empty while the shard writing to it lives on. The shard
writes a random token at start (``EpochMarked.set_epoch``); after an outage (a call raised
``BackendUnavailable``), and about once a second anyway, it reads the token back: a different
one means the content is gone and the shard rebuilds like a restarted shard. Backends without
the capability (in-process memory) are never checked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from kvray.core.index.base import EpochMarked, IndexBackend
from kvray.errors import BackendUnavailable


class EpochGuard:
    def __init__(
        self,
        backend: IndexBackend,
        *,
        every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend if isinstance(backend, EpochMarked) else None
        self.down = False
        """A call failed with ``BackendUnavailable``: check before the next one."""
        self.every_s = every_s
        self.clock = clock
        self.token = uuid.uuid4().hex
        self._checked = clock()

    def mark(self) -> None:
        """Write the token (at start, and after a rebuild)."""
        if self.backend is None:
            return
        try:
            self.backend.set_epoch(self.token)
        except BackendUnavailable:
            self.down = True

    def lost(self) -> bool:
        """Whether the content written since ``mark`` is gone (the caller rebuilds, then calls
        ``rebuilt``). Raises ``BackendUnavailable`` while the backend is still down."""
        now = self.clock()
        if not self.down and (self.backend is None or now - self._checked < self.every_s):
            return False
        self._checked = now
        if self.backend is not None and self.backend.get_epoch() != self.token:
            return True
        self.down = False
        return False

    def rebuilt(self) -> None:
        if self.backend is not None:
            self.backend.set_epoch(self.token)
        self.down = False
