"""A simulated vLLM fleet: pods with a real prefix-cache LRU, real hashing and real event frames."""

from kvray.sim.pod import SimPod
from kvray.sim.publisher import SimPublisher

__all__ = ["SimPod", "SimPublisher"]
