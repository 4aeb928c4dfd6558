"""``pin_malloc_thresholds``: what a burst frees in a thread goes back to the OS."""

from __future__ import annotations

import subprocess
import sys

import pytest

BURST = """
import ctypes, sys, threading
from kvray._proc import pin_malloc_thresholds, release_memory, rss_anon_bytes
if sys.argv[1] == "pin":
    assert pin_malloc_thresholds()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MIB = 1 << 20

def burst():
    # One large buffer freed (glibc then raises its thresholds to 16 MiB / 32 MiB), then a
    # burst of 1 MiB buffers live at once and freed: a thread's arena, like an ingestor's.
    p = libc.malloc(16 * MIB); ctypes.memset(p, 1, 16 * MIB); libc.free(p)
    ps = [libc.malloc(MIB) for _ in range(24)]
    for q in ps:
        ctypes.memset(q, 1, MIB)
    for q in ps:
        libc.free(q)

base = rss_anon_bytes()
t = threading.Thread(target=burst)
t.start()
t.join()
release_memory()  # malloc_trim, as the ingestor does when idle
print((rss_anon_bytes() - base) // MIB)
"""


def _kept_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", BURST, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_threads_burst_is_returned_only_with_pinned_thresholds() -> None:
    assert _kept_mib("default") >= 16  # glibc's default: the arena's top stays resident
    assert _kept_mib("pin") <= 2
