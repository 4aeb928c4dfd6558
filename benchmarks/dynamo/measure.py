"""What both sides measure with: /proc CPU and memory of process trees, the other people's
CPU on a shared machine, timing loops and one keep-alive HTTP client (Linux only)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._util import pct

_TICK = os.sysconf("SC_CLK_TCK")


class Proc:
    """The few facts about a process the benchmark needs, read from /proc (Linux only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def stat(self) -> list[str]:
        """/proc/<pid>/stat fields from field 3 (state) on: field N is at index N - 3."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        return raw[raw.rindex(")") + 2 :].split()

    def cpu_s(self) -> float:
        f = self.stat()
        return (int(f[11]) + int(f[12])) / _TICK  # utime + stime

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def cmdline(self) -> str:
        return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> list[Proc]:
    """Every process below ``root`` (children, their children, ...)."""
    kids: dict[int, list[int]] = {}
    for pid in _all_pids():
        with contextlib.suppress(OSError, ValueError, IndexError):
            kids.setdefault(int(Proc(pid).stat()[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(Proc(c))
            todo.append(c)
    return out


def cpu_s(procs: list[Proc]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += p.cpu_s()
    return total


def _status_bytes(procs: list[Proc], key: str) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            total += p.status(key) * 1024
    return total


def rss(procs: list[Proc]) -> int:
    return _status_bytes(procs, "VmRSS")


def rss_anon(procs: list[Proc]) -> int:
    """Private anonymous resident memory (``RssAnon``): the heap, without shared pages such as
    Ray's plasma store mapped into a worker, which plain RSS counts too."""
    return _status_bytes(procs, "RssAnon")


def trimmed_self_anon() -> int:
    """This process's ``RssAnon`` after a collection and ``malloc_trim``: what it still
    holds (here, a ``kvray.connect()`` client's read replica), not freed buffers."""
    import gc

    from kvray._proc import release_memory

    gc.collect()
    release_memory()
    return rss_anon([Proc(os.getpid())])


def foreign_cpu(root: int) -> dict[tuple[int, str], float]:
    """CPU seconds so far of every process outside ``root``'s tree (other people's work)."""
    mine = {root} | {p.pid for p in descendants(root)}
    out: dict[tuple[int, str], float] = {}
    for pid in _all_pids():
        if pid in mine:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = Proc(pid).stat()
            out[(pid, f[19])] = (int(f[11]) + int(f[12])) / _TICK  # key: pid + start time
    return out


def foreign_delta(before: dict[tuple[int, str], float], root: int) -> float:
    """CPU seconds used outside ``root``'s tree since ``before`` (processes that started and
    ended in between are missed)."""
    after = foreign_cpu(root)
    return sum(max(0.0, v - before.get(k, 0.0)) for k, v in after.items())


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_wait_s: float, limit: float = 0.15, window_s: float = 3.0) -> str:
    """Wait (up to ``max_wait_s``) until other people's processes use < ``limit`` cores over a
    ``window_s`` window, so they do not distort the next phase; returns what happened."""
    t0 = time.monotonic()
    while True:
        before = foreign_cpu(os.getpid())
        time.sleep(window_s)
        used = foreign_delta(before, os.getpid()) / window_s
        waited = time.monotonic() - t0
        if used < limit:
            return (
                f"quiet after {waited:.0f} s ({used:.2f} cores used by others, 1-minute "
                f"load {load1():.2f})"
            )
        if waited >= max_wait_s:
            return f"NOT quiet after {waited:.0f} s ({used:.2f} cores used by others)"
        print(f"waiting for a quiet machine: others use {used:.2f} cores", flush=True)
        time.sleep(10)


def measured(
    run: Callable[[], dict[str, Any]], quiet_wait: float, retries: int, name: str
) -> dict[str, Any]:
    """Run a system's phase on a quiet machine; redo it (up to ``retries`` times) when other
    people's processes used more than 0.25 cores during it, keeping the least disturbed."""
    best: dict[str, Any] | None = None
    for attempt in range(1 + retries):
        quiet = wait_quiet(quiet_wait) if quiet_wait else "not checked"
        res = run()
        res["quiet"] = quiet
        res["attempt"] = attempt + 1
        share = res["foreign_cpu_s"] / max(res["phase_wall_s"], 1e-9)
        if best is None or share < best["foreign_cpu_s"] / max(best["phase_wall_s"], 1e-9):
            best = res
        if share <= 0.25:
            break
        again = "again" if attempt < retries else "no retries left, kept the least disturbed"
        print(f"{name} phase disturbed (others used {share:.2f} cores): {again}", flush=True)
    assert best is not None
    return best


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ingest time (the tables report it whole), with every run's
    ingest time attached."""
    chosen = dict(sorted(runs, key=lambda r: r["ingest_s"])[len(runs) // 2])
    chosen["ingest_runs"] = [r["ingest_s"] for r in runs]
    return chosen


class Http:
    """One keep-alive HTTP/1.1 connection; the same client for both systems."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, body: bytes) -> Any:
        self.conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if not 200 <= r.status < 300:
            raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
        return json.loads(data)

    def get(self, path: str) -> str:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Callable[[Any], object], items: list[Any], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for it in items:
            t = time.perf_counter()
            fn(it)
            out.append(time.perf_counter() - t)
    return out


def ms(xs: list[float], p: float) -> float:
    return pct(xs, p) * 1e3
