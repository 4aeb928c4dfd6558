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
