"""Starting a throwaway real ``redis-server`` for tests (a helper module, not a conftest).

The server listens on a unix socket in a private directory with TCP disabled (``--port 0``),
so parallel test runs never collide on ports; ``tcp=True`` adds a loopback listener on a port
the OS picked, for the tests that need a TCP URL. Persistence is off (``--save ""``,
``--appendonly no``). Callers skip when :func:`redis_server_binary` returns ``None``::

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_UNIX_PATH_MAX = 100
"""sun_path holds 108 bytes; stay under it with room to spare."""


@dataclass(frozen=True, slots=True)
class RedisServerInfo:
    """A running test server."""

    url: str
    """``unix://`` URL of the server's socket (no password in it)."""
    process: subprocess.Popen[bytes]
    """The server process; tests may kill it to simulate an outage."""
    unix_socket: str
    """Path of the unix socket."""
    password: str | None = None
    """The ``requirepass`` password, if any."""
    port: int | None = None
    """The loopback TCP port, when started with ``tcp=True``."""

    @property
    def tcp_url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (only when started with ``tcp=True``)."""
        if self.port is None:
            raise RuntimeError("server was started without TCP")
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A fresh client on the unix socket (decoding responses), authenticated if needed."""
        return redis.Redis(
            unix_socket_path=self.unix_socket,
            password=self.password,
            decode_responses=True,
            socket_timeout=5.0,
        )


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` executable, or ``None`` when it is not installed."""
    return shutil.which("redis-server")


def _free_port() -> int:
    """A loopback port the OS considers free right now (the server binds it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _socket_dir(tmp_path: Path) -> tuple[Path, bool]:
    """A directory for the socket whose path fits in sun_path; True when we must delete it.

    pytest's ``tmp_path`` embeds the test name and can be too long for a unix socket path.
    """
    if len(str(tmp_path / "redis.sock")) <= _UNIX_PATH_MAX:
        return tmp_path, False
    return Path(tempfile.mkdtemp(prefix="kvr-redis-")), True


def _wait_ready(info: RedisServerInfo, log: Path) -> None:
    """Poll PING until the server answers; raise with its log if it exits or never answers."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    delay = 0.005
    while True:
        if info.process.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {info.process.returncode}:\n{log.read_text()}"
            )
        if os.path.exists(info.unix_socket):
            client = info.client()
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer PING:\n{log.read_text()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server (if still alive) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def start_redis_server(
    tmp_path: Path, *, password: str | None = None, tcp: bool = False
) -> Iterator[RedisServerInfo]:
    """Run a private ``redis-server`` for the duration of the ``with`` block.

    Args:
        tmp_path: directory for the socket (unless its path is too long), log and working dir.
        password: set ``requirepass`` to this.
        tcp: also listen on 127.0.0.1 on a free port (``info.port``/``info.tcp_url``).

    Yields:
        The server's URL, socket, port and process.

    Raises:
        RuntimeError: no ``redis-server`` binary, or the server did not come up.
    """
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server not found on PATH")
    sock_dir, own_dir = _socket_dir(tmp_path)
    sock = str(sock_dir / "redis.sock")
    log = tmp_path / "redis-server.log"
    # A port picked by the OS can be taken by someone else before redis binds it; retry.
    attempts = 3 if tcp else 1
    try:
        for attempt in range(attempts):
            port = _free_port() if tcp else None
            args = [
                binary,
                "--port",
                str(port or 0),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                sock,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ]
            if password is not None:
                args += ["--requirepass", password]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            info = RedisServerInfo(
                url=f"unix://{sock}",
                process=process,
                unix_socket=sock,
                password=password,
                port=port,
            )
            try:
                _wait_ready(info, log)
            except RuntimeError:
                _stop(process)
                if attempt + 1 == attempts:
                    raise
                continue
            break
        try:
            yield info
        finally:
            _stop(info.process)
    finally:
        if own_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)
