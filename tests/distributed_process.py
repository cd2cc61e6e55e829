"""Two swan-serve ranks on loopback under the real `mlx.launch` (ring backend), for tests
and benches: `mlx.launch --hostfile hosts.json -- swan-serve MODEL ...`, as a user runs it
across machines.

    with LaunchedServer(model_dir, tmp_path, "--dtype", "float32") as server:
        ...  # rank 0 serves HTTP on server.base_url
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server_process import SWAN_SERVE, ServerProcess

# The launcher run by this interpreter (its script's own shebang may name another venv).
MLX_LAUNCH = [sys.executable, str(Path(sys.executable).with_name("mlx.launch"))]


def free_port_pair() -> int:
    """A port p with p and p + 1 free: the ring backend listens on one port per rank."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports on loopback")


def write_hostfile(folder: Path, ranks: int = 2) -> Path:
    """mlx.launch's hostfile: `ranks` processes on this machine, ring over loopback."""
    hosts = [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]} for _ in range(ranks)]
    path = folder / "hosts.json"
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}, indent=2))
    return path


class LaunchedServer(ServerProcess):
    """`mlx.launch` with its ranks in a session of their own, so that stop() can Ctrl-C
    all of them as a terminal would, and check that none is left behind."""

    def __init__(self, model_dir: Path, folder: Path, *args: str, ranks: int = 2,
                 quantize: bool = False):
        hostfile = write_hostfile(folder, ranks)
        command = [*MLX_LAUNCH, "--hostfile", str(hostfile),
                   "--starting-port", str(free_port_pair()), "--",
                   str(SWAN_SERVE), str(model_dir), *([] if quantize else ["--no-quantize"])]
        super().__init__(None, *args, command=command)
        self.popen_options = {"start_new_session": True}

    def rank_pid(self, rank: int) -> int:
        """The process id of rank `rank` (mlx.launch exports MLX_RANK to each)."""
        assert self.process is not None
        for pid in self.group_pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"swan-serve" in cmdline and f"MLX_RANK={rank}".encode() in environ:
                return pid
        raise LookupError(f"rank {rank} is not running")

    def group_pids(self) -> list[int]:
        assert self.process is not None
        found = subprocess.run(["pgrep", "-s", str(self.process.pid)], capture_output=True,
                               text=True)
        return [int(pid) for pid in found.stdout.split()]

    def wait_until_gone(self, timeout: float) -> bool:
        """Whether the launcher and every rank have exited within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None \
                    and not self.group_pids():
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.group_pids():
            os.killpg(self.process.pid, signal.SIGINT)  # Ctrl-C reaches the whole session
            if not self.wait_until_gone(timeout):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return self.process.returncode


class DirectRanks(ServerProcess):
    """The ranks started the way mlx.launch starts them (MLX_RANK, MLX_HOSTFILE), without
    the launcher process, whose output-forwarding loop polls and would take CPU from the
    ranks on a 2-core machine (benches)."""

    def __init__(self, model_dir: Path, folder: Path, *args: str, ranks: int = 2):
        port = free_port_pair() if ranks == 2 else 0
        if ranks != 2:
            raise ValueError("free_port_pair gives two ports")
        ring = folder / "ring.json"
        ring.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(ranks)]))
        super().__init__(model_dir, *args, env={"MLX_RANK": "0", "MLX_HOSTFILE": str(ring)})
        self.ranks = ranks
        self.followers: list[subprocess.Popen] = []

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.followers = [
            subprocess.Popen(self.command, env={**self.env, "MLX_RANK": str(rank)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for rank in range(1, self.ranks)]
        return super().start(timeout)

    def rank_pid(self, rank: int) -> int:
        assert self.process is not None
        return self.process.pid if rank == 0 else self.followers[rank - 1].pid

    def stop(self, timeout: float = 15.0) -> int | None:
        code = super().stop(timeout)
        for follower in self.followers:
            try:
                follower.wait(timeout)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        return code
