"""``ray up`` / ``ray down`` with the repository's ``ray_cluster.yaml`` against a local sshd.

The cluster launcher does what it does on real machines: ssh into the head, rsync the repository,
run the setup and start commands (``ray start --head``, then ``kvray serve --config ... --address
auto --detach`` verbatim from ``ray_cluster.yaml``). The test then checks kvray over HTTP
(``/healthz``, then events published to its socket and a ``/score_tokens`` request that sees
them), runs ``ray down`` and checks that the cluster is gone and the test session's own Ray
cluster is not.

Isolation from other Ray clusters on this machine (the session's ``ray_session``, other test runs):

* sshd runs in its own PID and mount namespace (``unshare --pid --fork --mount-proc``), so Ray and
  kvray started over ssh live there. ``ray stop`` (run bare by ``ray down`` and by the head start
  commands) kills every Ray process it can see in ``/proc``: inside the namespace that is this
  cluster only. Killing the namespace's first process at teardown ends anything left behind.
* Ports picked free at test time: GCS, Ray client server, dashboard agent, metrics export,
  Serve's HTTP proxy and kvray's event socket. ``ray_cluster.yaml`` serves HTTP through Serve's
  proxy (``RAY_SERVE_ENABLE_DIRECT_INGRESS=0``), here on the picked port, not 8000 or 30000+.
* Temp dirs: ``RAY_TMPDIR`` for the node (its sessions, and the ``ray_current_cluster`` file that
  ``--address auto`` reads) and for the launcher's local-provider state.
* The ssh sessions' HOME is a temp dir (sshd ``ForceCommand``): its ``~/.bashrc`` puts this
  venv's ``bin`` on the login PATH (``ray down`` runs a bare ``ray stop``), ``~/kvray`` and
  ``~/ray_bootstrap_*`` land there, and root's own dotfiles are untouched.
* Ray has no ssh port setting: the launcher's ``ssh`` (also used by rsync) is a wrapper first on
  its PATH that adds ``-F <ssh_config>`` naming the port.

Needs root, ``openssh-server``, ``openssh-client``, ``rsync`` and ``unshare`` (util-linux); skips
with the reason otherwise. Setup in CI: ``apt-get install -y openssh-server rsync``.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SSHD = Path("/usr/sbin/sshd")
MODEL = "rayup-model"
RAY_UP_TIMEOUT_S = 300.0  # ~20 s here when the machine is quiet
RAY_DOWN_TIMEOUT_S = 120.0


def _missing_prerequisite() -> str | None:
    """Why this test cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (PID namespaces via unshare)"
    if os.geteuid() != 0:
        return "needs root: sshd privilege separation and `unshare --pid` (run as root, as CI does)"
    if not SSHD.exists():
        return "no /usr/sbin/sshd: apt-get install -y openssh-server"
    for tool, pkg in (
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("rsync", "rsync"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH: apt-get install -y {pkg}"
    if not (VENV_BIN / "ray").exists() or not (VENV_BIN / "kvray").exists():
        return f"`ray` and `kvray` must be in {VENV_BIN} (pip install -e . into this venv)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return (
            "cannot create a PID namespace (`unshare --pid --fork --mount-proc true` failed: "
            f"{probe.stderr.strip()}); without one, `ray down`'s bare `ray stop` would stop "
            "every Ray cluster on this machine"
        )
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _poll(pred: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> Any:
    """Call ``pred`` until it returns something truthy (returned) or the timeout (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval_s)
    return None


def _run(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str], cwd: Path = REPO) -> int:
    """Run ``cmd`` (output to ``log``), killing its whole process group on timeout."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\n[test] killed after {timeout_s} s\n".encode())
            return -9


def _tail(log: Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


class LocalNode:
    """A root sshd on 127.0.0.1 in its own PID namespace, with a temp HOME for its sessions."""

    def __init__(self, root: Path, ssh_port: int, node_env: dict[str, str]) -> None:
        self.root = root
        self.port = ssh_port
        self.home = root / "home"
        self.key = root / "id_ed25519"
        self.bin = root / "bin"
        self.log = root / "sshd.log"
        self.home.mkdir()
        self.bin.mkdir()
        for name, args in (("ssh_host_ed25519_key", []), ("id_ed25519", [])):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name), *args],
                check=True,
                timeout=30,
            )
        (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
        exports = "".join(f"export {k}='{v}'\n" for k, v in node_env.items())
        (self.home / ".bashrc").write_text(f'export PATH="{VENV_BIN}:$PATH"\n{exports}')
        (self.home / ".bash_profile").write_text(". ~/.bashrc\n")
        session = root / "session.sh"
        session.write_text(
            textwrap.dedent(
                f"""\
                #!/bin/sh
                # Every ssh session runs here: HOME is the test's, not root's.
                export HOME={self.home}
                cd "$HOME" || exit 1
                if [ -n "$SSH_ORIGINAL_COMMAND" ]; then
                  exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"
                fi
                exec /bin/bash --login
                """
            )
        )
        session.chmod(0o755)
        (root / "sshd_config").write_text(
            textwrap.dedent(
                f"""\
                Port {ssh_port}
                ListenAddress 127.0.0.1
                HostKey {root}/ssh_host_ed25519_key
                PidFile {root}/sshd.pid
                AuthorizedKeysFile {root}/authorized_keys
                PermitRootLogin prohibit-password
                PubkeyAuthentication yes
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                UsePAM no
                StrictModes no
                ForceCommand {session}
                MaxSessions 64
                MaxStartups 64
                PrintMotd no
                X11Forwarding no
                LogLevel ERROR
                """
            )
        )
        (root / "ssh_config").write_text(
            f"Host *\n  Port {ssh_port}\n  BatchMode yes\n  LogLevel ERROR\n"
        )
        wrapper = self.bin / "ssh"
        ssh = shutil.which("ssh")
        wrapper.write_text(f'#!/bin/sh\nexec {ssh} -F {root}/ssh_config "$@"\n')
        wrapper.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # sshd's privilege-separation directory (Debian creates it only when the service runs).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--kill-child=SIGKILL",
                    str(SSHD),
                    "-D",
                    "-e",
                    "-f",
                    str(self.root / "sshd_config"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
            )

    def ssh(self, command: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the node in a login shell, as the cluster launcher does."""
        args = ["ssh", command]
        try:
            return self._ssh(command, timeout_s)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, 255, "", f"timed out after {timeout_s} s")

    def _ssh(self, command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(self.bin / "ssh"),
                "-i",
                str(self.key),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "root@127.0.0.1",
                f"bash --login -c -i 'source ~/.bashrc; {command}'",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """End the namespace: its first process dies, the kernel kills every process in it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # unshare --kill-child: sshd (the namespace's PID 1) gets SIGKILL
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _cluster_config(node: LocalNode, ports: dict[str, int]) -> dict[str, Any]:
    """``ray_cluster.yaml`` pointed at the local node, with this test's ports.

    Kept from the repository's file: the file mounts and rsync excludes, the setup lines that
    write the environment (``~/.kvray_env``, sourced from ``~/.bashrc``), ``ray stop`` and the
    ``kvray serve`` head command. Replaced: the provider/auth (this node, root, the test key),
    the venv and pip setup lines (kvray is already installed in this venv; no network) and the
    ``ray start --head`` line (the test's ports, 127.0.0.1, no dashboard).
    """
    cfg = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    cfg["cluster_name"] = f"kvray-test-{uuid.uuid4().hex[:8]}"
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(node.key)}
    env_lines = [c for c in cfg["setup_commands"] if "pip" not in c and "-m venv" not in c]
    assert any("~/.bashrc" in c for c in env_lines), cfg["setup_commands"]
    check = "python -c 'import kvray, ray; print(kvray.__version__, ray.__version__)'"
    cfg["setup_commands"] = [*env_lines, check]
    ray_start = (
        "ray start --head --node-ip-address=127.0.0.1"
        f" --port={ports['gcs']} --ray-client-server-port={ports['client']}"
        f" --dashboard-agent-listen-port={ports['agent']} --metrics-export-port={ports['metrics']}"
        " --include-dashboard=false --num-cpus=1 --object-store-memory=268435456"
        " --disable-usage-stats --autoscaling-config=~/ray_bootstrap_config.yaml"
    )
    starts = cfg["head_start_ray_commands"]
    idx = [i for i, c in enumerate(starts) if "ray start --head" in c]
    assert len(idx) == 1, f"ray_cluster.yaml: expected one `ray start --head` line in {starts}"
    starts[idx[0]] = ray_start
    assert any(c.startswith("kvray serve ") and "--detach" in c for c in starts), starts
    return cfg


@contextlib.contextmanager
def _local_node(tmp: Path, ports: dict[str, int]) -> Iterator[LocalNode]:
    node_env = {
        "RAY_TMPDIR": str(tmp / "node"),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "KVRAY_NUM_SHARDS": "1",
        "KVRAY_EVENTS__BIND": f'["tcp://127.0.0.1:{ports["events"]}"]',
        "KVRAY_SERVE__HOST": "127.0.0.1",
        "KVRAY_SERVE__PORT": str(ports["http"]),
    }
    (tmp / "node").mkdir()
    node = LocalNode(tmp, ports["ssh"], node_env)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _ssh_control_dir(cluster_name: str) -> Path:
    """Where the launcher keeps its ssh ControlMaster sockets for ``cluster_name`` (fixed /tmp)."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path("/tmp") / f"ray_ssh_{user}" / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


@pytest.mark.timeout(900)
def test_ray_up_serves_kvray_then_ray_down_stops_only_it(request: pytest.FixtureRequest) -> None:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    request.getfixturevalue("ray_session")  # the session's own cluster must survive `ray down`
    import ray

    from kvray.sim import SimPod, SimPublisher

    tmp = Path(tempfile.mkdtemp(prefix="kvray-rayup-", dir="/tmp"))  # short: AF_UNIX path limit
    names = ("ssh", "gcs", "client", "agent", "metrics", "http", "events")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    log = tmp / "launcher.log"
    control_dir: Path | None = None
    try:
        with _local_node(tmp, ports) as node:
            ok = _poll(lambda: node.ssh("true", timeout_s=10).returncode == 0, 30)
            assert ok, f"sshd did not accept the test key:\n{_tail(node.log)}"
            which = node.ssh("command -v ray kvray")
            assert which.stdout.split() == [str(VENV_BIN / "ray"), str(VENV_BIN / "kvray")], (
                f"ray/kvray not on the node's login PATH: {which.stdout!r} {which.stderr!r}"
            )
            cfg = _cluster_config(node, ports)
            control_dir = _ssh_control_dir(cfg["cluster_name"])
            cfg_path = tmp / "cluster.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            env = {
                **os.environ,
                "PATH": f"{node.bin}:{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "RAY_TMPDIR": str(tmp / "launcher"),  # local-provider state and lock
                "TMPDIR": str(tmp / "launcher"),  # the launcher's config cache
                "RAY_USAGE_STATS_ENABLED": "0",
                "AUTOSCALER_NODE_START_WAIT_S": "120",  # the launcher's own ssh wait bound
            }
            (tmp / "launcher").mkdir()
            ray_cli = str(VENV_BIN / "ray")
            flags = ["-y", "--log-style", "record"]
            up = [ray_cli, "up", *flags, "--no-config-cache", str(cfg_path)]
            t0 = time.monotonic()
            rc = _run(up, log, RAY_UP_TIMEOUT_S, env)
            up_s = time.monotonic() - t0
            assert rc == 0, f"ray up failed (rc {rc}) after {up_s:.0f} s:\n{_tail(log)}"
            base = f"http://127.0.0.1:{ports['http']}"

            def healthy() -> bool:
                try:
                    r = httpx.get(f"{base}/healthz", timeout=2)
                    return r.status_code == 200 and r.json().get("app") == "kvray"
                except httpx.HTTPError:
                    return False

            assert _poll(healthy, 60), f"kvray /healthz never answered on {base}:\n{_tail(log)}"

            # Events from a simulated vLLM pod reach the cluster's bound socket and get scored.
            pub = SimPublisher(f"tcp://127.0.0.1:{ports['events']}", f"kv@10.77.0.1@{MODEL}")
            try:
                assert pub.wait_connected(timeout_s=30), "kvray's event socket never connected"
                pod = SimPod("10.77.0.1", MODEL, publisher=pub)
                tokens = list(range(1000, 1000 + 16 * 6 + 5))  # 6 full blocks and a tail
                pod.serve(tokens)

                def scored() -> dict[str, Any] | None:
                    try:
                        r = httpx.post(
                            f"{base}/score_tokens",
                            json={"model": MODEL, "token_ids": tokens},
                            timeout=5,
                        )
                    except httpx.HTTPError:
                        return None
                    body: dict[str, Any] = r.json()
                    return body if r.status_code == 200 and body["scores"] else None

                body = _poll(scored, 30, 0.2)
            finally:
                pub.close()
            assert body == {
                "model": MODEL,
                "scores": {"10.77.0.1": 6.0},
                "blocks": 6,
                "tokens": len(tokens),
            }
            pods = httpx.get(f"{base}/pods", timeout=5).json()["pods"]
            assert [(p["pod"], p["hash_contract"]["status"]) for p in pods] == [("10.77.0.1", "ok")]

            rc = _run([ray_cli, "down", *flags, str(cfg_path)], log, RAY_DOWN_TIMEOUT_S, env)
            assert rc == 0, f"ray down failed (rc {rc}):\n{_tail(log)}"
            gone = _poll(lambda: not _port_open(ports["http"]) and not _port_open(ports["gcs"]), 60)
            assert gone, f"HTTP or GCS port still open after ray down:\n{_tail(log)}"
            left = node.ssh("ps -eo comm=").stdout.split()
            assert not {"raylet", "gcs_server"} & set(left), f"Ray processes left: {left}"
            print(f"ray up took {up_s:.0f} s")
        # The test session's own cluster was not touched by `ray stop`: it still runs tasks.
        assert ray.is_initialized()
        alive = ray.remote(num_cpus=0)(lambda: "still here")
        assert ray.get(alive.remote(), timeout=60) == "still here"
    finally:
        if control_dir is not None:
            shutil.rmtree(control_dir, ignore_errors=True)
        if not os.environ.get("KVRAY_TEST_KEEP_TMP"):  # set it to keep the logs for debugging
            shutil.rmtree(tmp, ignore_errors=True)
