"""This process as the OS sees it: resident memory, freed heap back to the OS, the node's IP."""

from __future__ import annotations

import contextlib
import ctypes
import os


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def rss_anon_bytes() -> int:
    """Private (anonymous) resident memory: the heap, without mapped files or Ray's shared
    object-store pages, which plain RSS also counts once touched (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024


def pin_malloc_thresholds() -> bool:
    """Keep glibc's mmap and trim thresholds at their defaults (128 KiB) in this process, so
    that memory freed after a burst goes back to the OS. Returns whether glibc took them.

    By default glibc raises the mmap threshold to the size of any mmapped chunk freed (up to
    32 MiB) and the trim threshold to twice that. After a burst of large buffers (ZMQ
    messages, Ray's 256 KiB-1 MiB msgpack buffers per call) such chunks come from the heap
    instead, and in a thread's arena the freed space stays at the arena's top: ``malloc_trim``
    returns only the main heap's top and the free chunks inside the heaps. An ingestor kept
    20-47 MiB that way after a 1 M-block-event burst (``benchmarks/bench_scale.py``, 16 pods);
    with pinned thresholds, 1 MiB. Call it in kvray's own actors, never in a user's process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        )
    except (OSError, AttributeError):  # not glibc
        return False


def release_memory() -> int:
    """Return freed heap pages to the OS (glibc ``malloc_trim``): bursts of buffered
    messages leave freed-but-resident arenas behind. Returns the RSS change in bytes."""
    before = rss_bytes()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes() - before


def node_ip() -> str:
    """This Ray node's IP (127.0.0.1 outside Ray)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"
