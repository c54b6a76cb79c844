"""Start real server subprocesses for tests: own process group, free port, wait for /health, kill at teardown.

Every child is spawned by the harness's own spawner (PR_SET_PDEATHSIG), so a killed pytest takes its servers
with it, and stopped by process group.

    port = free_port()
    server = launch_server([sys.executable, "-m", "flageval_lite.serving.stub", "--port", str(port)],
                           port, tmp_path / "stub.log", timeout_s=30)
    ...
    server.stop()          # or: with launch_server(...) as server:
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from flageval_lite.serving.processes import free_port, spawn  # free_port: the tests take it from here


def spawn_group(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """`argv` in a process group of its own, dying with pytest as the harness's servers die with the harness."""
    return spawn(argv, start_new_session=True, **kwargs)


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group led by `proc`, SIGKILL whatever is left after `grace_s`."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:  # children may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


class ServerHandle:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, host: str = "127.0.0.1"):
        self.proc, self.port, self.log_path, self.host = proc, port, Path(log_path), host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def get(self, path: str) -> Any:
        return get_json(self.url + path)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace_s: float = 5.0) -> None:
        stop_group(self.proc, grace_s)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch_server(argv: list[str], port: int, log_path: str | Path, timeout_s: float = 60.0,
                  env: Optional[dict[str, str]] = None, host: str = "127.0.0.1") -> ServerHandle:
    """Start `argv` in its own process group (stdout+stderr to `log_path`) and wait until
    GET http://host:port/health answers 200; raise RuntimeError with the log tail if it doesn't."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = spawn_group(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    handle = ServerHandle(proc, port, log_path, host)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[:4]} exited with {proc.returncode} before /health:\n{handle.log_tail()}")
        if handle.healthy():
            return handle
        time.sleep(0.05)
    handle.stop()
    raise RuntimeError(f"{argv[:4]} not healthy within {timeout_s}s:\n{handle.log_tail()}")


def stub_argv(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "flageval_lite.serving.stub", "--port", str(port), *args]


def launch_stub(log_dir: str | Path, *args: str, port: Optional[int] = None, timeout_s: float = 30.0) -> ServerHandle:
    """The stub server with extra CLI `args`, on `port` or a free one."""
    port = port or free_port()
    return launch_server(stub_argv(port, *args), port, Path(log_dir) / f"stub-{port}.log", timeout_s)


class ServerPool:
    """Servers started by one test, all stopped at teardown (use from a fixture)."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.handles: list[ServerHandle] = []

    def stub(self, *args: str, port: Optional[int] = None) -> ServerHandle:
        handle = launch_stub(self.log_dir, *args, port=port)
        self.handles.append(handle)
        return handle

    def stop_all(self) -> None:
        for handle in self.handles:
            handle.stop()
