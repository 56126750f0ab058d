"""Start a real ``clora serve`` process on a free loopback port for HTTP tests (bounded waits)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The device the tests' servers run on (CLORA_DEVICE): cpu by default, so that the suite runs anywhere; set
# CLORA_TEST_DEVICE=cuda to run the same HTTP tests against the GPU path (the references stay float32 on the CPU).
TEST_DEVICE = os.environ.get("CLORA_TEST_DEVICE", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(env) as srv: httpx.get(srv.url + "/ready")``. Stops the server on exit."""

    def __init__(self, env: dict[str, str], log_path: Path, ready_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CLORA_HOST": "127.0.0.1", "CLORA_PORT": str(self.port),
                    "CLORA_NUM_THREADS": os.environ.get("CLORA_NUM_THREADS", "2"), "CLORA_LOG_LEVEL": "warning",
                    **env}
        self.log_path, self.ready_timeout = log_path, ready_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early; log:\n{self.log_path.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    return self
                if "failed to load" in r.text:
                    self.stop()
                    raise RuntimeError(f"server start-up failed: {r.text}; log:\n{self.log_path.read_text()[-3000:]}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {self.ready_timeout}s; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if hasattr(self, "_log"):
            self._log.close()

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str, labels: dict[str, str] | None = None, default: float | None = None) -> float:
        """Sum of the samples of ``name`` matching ``labels`` in /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            total += float(value)
            found = True
        if not found:
            if default is not None:
                return default
            raise KeyError(name)
        return total

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
