"""Run the real `swan-serve` process on a free loopback port (for tests and benches).

    with ServerProcess(model_dir, "--max-concurrency", "4") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

SWAN_SERVE = Path(sys.executable).with_name("swan-serve")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None
             ) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def eos_token_ids(model_dir: str | Path) -> list[int]:
    """End-of-sequence ids from config.json and generation_config.json (to ban them with
    logit_bias when a test needs an exact number of generated tokens)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_dir) / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return sorted(ids)


class ServerProcess:
    """A swan-serve subprocess; `start()` returns once /health answers 200."""

    def __init__(self, model_dir: str | Path | None, *args: str, env: dict[str, str] | None = None,
                 command: list[str] | None = None, health_path: str = "/health",
                 quantize: bool = False):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        base = command or [str(SWAN_SERVE), *([str(model_dir)] if model_dir else [])]
        # Server tests serve the fixture's float weights unless they test the first-load
        # quantization itself (quantize=True).
        as_is = ["--no-quantize"] if command is None and not quantize else []
        self.command = [*base, "--port", str(self.port), *as_is, *args]
        self.env = {**os.environ, **(env or {})}
        self.health_path = health_path
        self.process: subprocess.Popen | None = None
        # Every /health answer seen while waiting for the server: [(status, body), ...].
        self.health_seen: list[tuple[int, bytes]] = []
        self._log = tempfile.TemporaryFile()
        # Extra subprocess.Popen arguments (a launcher's own session: distributed_process.py).
        self.popen_options: dict = {}

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            **self.popen_options,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                status, body = http_get(self.base_url + self.health_path, timeout=2)
            except OSError:  # not listening yet
                pass
            else:
                self.health_seen.append((status, body))
                if status == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def health(self) -> tuple[int, dict]:
        status, body = http_get(self.base_url + "/health")
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics as {name: value}; labelled ones keep their labels."""
        _, body = http_get(self.base_url + "/metrics")
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def wait_for_metric(self, name: str, predicate: Callable[[float], bool],
                        timeout: float) -> float:
        """Polls /metrics until predicate(value of `name`) holds; returns the last value."""
        deadline = time.monotonic() + timeout
        value = self.metrics().get(name, 0.0)
        while not predicate(value) and time.monotonic() < deadline:
            time.sleep(0.02)
            value = self.metrics().get(name, 0.0)
        return value

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
