"""Run the embedded server as a child process in its own process group, for tests and benchmarks.

The harness proper starts servers through `servers/lifecycle.py`; this is the minimal launcher that the embedded
server's own tests and throughput benchmark need.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedServerProcess:
    """`with EmbeddedServerProcess([...flags]) as server:` starts the server, waits for /health, stops the group."""

    def __init__(self, flags: list[str], log_path: Path, host: str = "127.0.0.1", timeout_s: float = 300.0):
        self.port = free_port(host)
        self.base_url = f"http://{host}:{self.port}/v1"
        self.command = [sys.executable, "-m", "flageval_lite.servers.embedded", *flags,
                        "--host", host, "--port", str(self.port)]
        self.log_path, self.timeout_s = Path(log_path), timeout_s
        self.process: Optional[subprocess.Popen] = None
        self.startup_s = 0.0

    def __enter__(self) -> "EmbeddedServerProcess":
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        health = self.base_url.removesuffix("/v1") + "/health"
        while time.monotonic() - started < self.timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        self.startup_s = time.monotonic() - started
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"embedded server not healthy after {self.timeout_s:.0f} s: {self.log_tail()}")

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def rss_mib(self) -> float:
        """Resident memory of the server process now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
