"""Server lifecycle against a real stand-in process (tests/fake_vllm/vllm_standin.py) on loopback ports."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import openai
import pytest

from flageval_lite.errors import UserError
from flageval_lite.records import FlagGemsSpec, ServeSpec
from flageval_lite.serving.engines import Launch, build_launch
from flageval_lite.serving.evidence import check_candidate, check_reference
from flageval_lite.serving.external import ExternalServer
from flageval_lite.serving.lifecycle import ManagedServer, ServerGroup
from flageval_lite.serving.processes import free_port, group_state, spawn

STANDIN = str(Path(__file__).parent / "fake_vllm" / "vllm_standin.py")
FAKE_GEMS_DIR = str(Path(__file__).parent / "fake_vllm" / "fake_flag_gems")
PY = sys.executable


def standin_launcher(spec: ServeSpec, role: str, run_dir: Optional[Path], port: int) -> Launch:
    """Our real command line for the spec, with `vllm`/`flagscale` replaced by the stand-in executable."""
    launch = build_launch(spec, role, run_dir, port)
    if spec.engine == "vllm":
        assert launch.argv[:3] == [PY, "-m", "vllm.entrypoints.cli.main"]
        argv = [PY, STANDIN, *launch.argv[3:]]
    else:
        assert launch.argv[0] == "flagscale"
        argv = [PY, STANDIN, *launch.argv[1:]]
    return dataclasses.replace(launch, argv=argv)


def spec(*args: str, route: str = "off", **kw) -> ServeSpec:
    fields = dict(name=f"standin-{route}", engine="vllm", model="/models/tiny", served_model_name="tiny",
                  flaggems=FlagGemsSpec(route=route), ops="aten" if route == "off" else "flaggems", args=args,
                  startup_timeout_s=20.0, max_restarts=1)
    fields.update(kw)
    return ServeSpec(**fields)


def server(s: ServeSpec, tmp_path: Path, role: str = "reference", **kw) -> ManagedServer:
    return ManagedServer(s, role, tmp_path / "run", launcher=standin_launcher, poll_interval_s=0.05, **kw)


def assert_group_gone(pgid: int, within_s: float = 5.0) -> None:
    """No process of the group is left: killpg(pgid, 0) raises ProcessLookupError."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"process group {pgid} still exists ({group_state(pgid)})")


def wait_dead(srv: ManagedServer) -> None:
    """alive() also reaps the killed child, which otherwise stays a zombie of this process."""
    deadline = time.monotonic() + 5
    while srv.alive():
        assert time.monotonic() < deadline, "server survived SIGKILL"
        time.sleep(0.05)


def ask(endpoint) -> str:
    client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=10)
    reply = client.chat.completions.create(model=endpoint.model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=8, temperature=0)
    return reply.choices[0].message.content


def test_start_ready_answers_records_evidence_and_stops_clean(tmp_path: Path) -> None:
    srv = server(spec(), tmp_path)
    with srv:
        endpoint = srv.endpoint
        pgid = srv.pgid
        assert srv.alive()
        assert endpoint.model == "tiny" and endpoint.server_version == "0.20.2-fake"
        assert endpoint.base_url == f"http://127.0.0.1:{srv.port}/v1"
        assert ask(endpoint) == "This is the stand-in answer."
        ev = srv.evidence
        assert ev.command[:2] == [PY, STANDIN] and ev.command[2:4] == ["serve", "/models/tiny"]
        assert ev.env_switches["USE_FLAGGEMS"] == "0" and ev.models == ["tiny"]
        assert ev.version == {"version": "0.20.2-fake"} and ev.packages["vllm"] == "0.20.2-fake"
        # The stand-in loads general plugins like vLLM: our evidence plugin reported from inside the server.
        assert ev.packages["flageval-lite"] and "flag_gems" not in ev.packages
        assert ev.warmup_s > 0 and ev.startup_s > 0 and ev.ops_called == []
        check_reference(ev)
    assert not srv.alive()
    assert_group_gone(pgid)
    log = (tmp_path / "run" / "logs" / "reference.log").read_text()
    assert "Application startup complete" in log and "POST /v1/chat/completions" in log


def test_slow_start_within_timeout(tmp_path: Path) -> None:
    with server(spec("--startup-delay", "1.5"), tmp_path) as srv:
        assert srv.evidence.startup_s >= 1.5


def test_startup_timeout_quotes_the_log_and_leaves_nothing(tmp_path: Path) -> None:
    srv = server(spec("--startup-delay", "60", startup_timeout_s=1.5), tmp_path)
    with pytest.raises(UserError) as info:
        srv.start()
    message = str(info.value)
    assert "did not become ready within 1.5 s" in message and "reference.log" in message
    assert "INFO stand-in vLLM 0.20.2-fake: serve /models/tiny" in message  # the log tail
    assert not srv.alive()


def test_early_crash_quotes_the_log(tmp_path: Path) -> None:
    srv = server(spec("--startup-delay", "30", "--crash-after", "0.5"), tmp_path)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"exited with code 3 before it was ready") as info:
        srv.start()
    assert time.monotonic() - started < 10  # noticed at once, not at the 20 s startup timeout
    assert "engine core died (simulated crash)" in str(info.value)


def test_sigterm_ignored_gets_sigkill_and_the_grandchild_goes_too(tmp_path: Path) -> None:
    srv = server(spec("--ignore-sigterm", "--spawn-grandchild"), tmp_path, stop_timeout_s=1.0)
    srv.start()
    pgid = srv.pgid
    grandchild = int(re.search(r"grandchild pid (\d+)", srv.log_path.read_text()).group(1))
    assert os.getpgid(grandchild) == pgid
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started >= 1.0  # waited for SIGTERM to work before SIGKILL
    assert_group_gone(pgid)


def test_group_kill_reaches_a_grandchild(tmp_path: Path) -> None:
    srv = server(spec("--spawn-grandchild"), tmp_path)
    srv.start()
    pgid = srv.pgid
    grandchild = int(re.search(r"grandchild pid (\d+)", srv.log_path.read_text()).group(1))
    srv.stop()
    assert_group_gone(pgid)
    with pytest.raises(ProcessLookupError):
        os.kill(grandchild, 0)


def test_foreign_process_on_the_port_is_reported_and_left_alone(tmp_path: Path) -> None:
    holder_code = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
                   "print(s.getsockname()[1], flush=True); time.sleep(60)")
    foreign = spawn([PY, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(foreign.stdout.readline())
        srv = server(spec(port=port), tmp_path)
        with pytest.raises(UserError, match=rf"port {port} on 127.0.0.1 is already in use by a process this run "
                                            r"did not start \(left untouched\)"):
            srv.start()
        assert foreign.poll() is None
        assert not (tmp_path / "run" / "logs" / "reference.log").exists()  # nothing was launched
    finally:
        foreign.kill()
        foreign.wait()


def test_ensure_alive_restarts_a_dead_server_on_the_same_port(tmp_path: Path) -> None:
    srv = server(spec(), tmp_path)
    with srv:
        first_pgid, port = srv.pgid, srv.port
        assert srv.ensure_alive() == srv.endpoint  # alive: nothing happens
        os.killpg(first_pgid, signal.SIGKILL)
        wait_dead(srv)
        assert_group_gone(first_pgid)
        endpoint = srv.ensure_alive()
        assert srv.pgid != first_pgid and srv.port == port and srv.restarts == 1
        assert srv.evidence.restarts == 1
        assert ask(endpoint) == "This is the stand-in answer."
        os.killpg(srv.pgid, signal.SIGKILL)
        wait_dead(srv)
        with pytest.raises(UserError, match=r"died \(exit code -9\) and its 1 restart\(s\) are used up"):
            srv.ensure_alive()


def test_server_group_stops_everything_on_error(tmp_path: Path) -> None:
    pgids = []
    with pytest.raises(RuntimeError, match="boom"):
        with ServerGroup(tmp_path / "run") as group:
            for role in ("reference", "candidate"):
                srv = ManagedServer(spec(), role, tmp_path / "run", launcher=standin_launcher, poll_interval_s=0.05)
                group.servers.append(srv)
                srv.start()
                pgids.append(srv.pgid)
            raise RuntimeError("boom")
    for pgid in pgids:
        assert_group_gone(pgid)


def test_server_group_turns_sigterm_into_a_clean_exit(tmp_path: Path) -> None:
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        with ServerGroup(tmp_path / "run") as group:
            srv = ManagedServer(spec(), "reference", tmp_path / "run", launcher=standin_launcher)
            group.servers.append(srv)
            srv.start()
            pgid = srv.pgid
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert info.value.code == 128 + signal.SIGTERM
    assert_group_gone(pgid)
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_flaggems_plugin_runs_inside_the_candidate_and_is_proven(tmp_path: Path) -> None:
    fake_gems_env = (("PYTHONPATH", FAKE_GEMS_DIR),)
    with server(spec(route="plugin", env=fake_gems_env), tmp_path, role="candidate") as cand, \
            server(spec(env=fake_gems_env), tmp_path, role="reference") as ref:
        cand_ev, ref_ev = cand.evidence, ref.evidence
    assert cand_ev.packages["flag_gems"] == "5.0.2-fake"
    assert cand_ev.ops_registered == ["argmax", "cat", "embedding", "index", "mm", "softmax"]
    assert cand_ev.ops_called == ["embedding", "mm", "softmax"]  # called by the warm-up request
    check_candidate(cand_ev)
    assert (ref_ev.ops_called, ref_ev.ops_registered) == ([], [])
    check_reference(ref_ev)
    check_candidate(ref_ev)  # route off: nothing to prove
    assert "loading general plugin flageval_lite_flaggems" in cand.log_path.read_text()
    assert "flageval_lite_flaggems" not in ref.log_path.read_text()
    with pytest.raises(UserError, match="reference ran with FlagGems operators"):
        check_reference(cand_ev)


def test_candidate_without_flaggems_is_refused(tmp_path: Path) -> None:
    def plugin_not_loaded(s, role, run_dir, port):  # e.g. the entry point is not installed in the server's env
        launch = standin_launcher(s, role, run_dir, port)
        return dataclasses.replace(launch, env={**launch.env, "VLLM_PLUGINS": ""})

    cand = ManagedServer(spec(route="plugin"), "candidate", tmp_path / "run", launcher=plugin_not_loaded)
    with cand:
        evidence = cand.evidence
    with pytest.raises(UserError, match=r"candidate ran without FlagGems: spec 'standin-plugin' asks for route "
                                        r"'plugin', but no registered FlagGems operators .* refusing a "
                                        r"native-vs-native comparison"):
        check_candidate(evidence)


@pytest.mark.parametrize("new_session", [False, True])
def test_detached_flagscale_launcher_is_followed_and_stopped(tmp_path: Path, new_session: bool) -> None:
    args = ("--detach", "--detach-new-session") if new_session else ("--detach",)
    s = ServeSpec(name="fs", engine="flagscale", model="qwen3_o", served_model_name="Qwen3-Omni-flagos",
                  flaggems=FlagGemsSpec(route="flagscale"), ops="flaggems", args=args, startup_timeout_s=20.0)
    srv = server(s, tmp_path, role="candidate")
    endpoint = srv.start()
    pid_file = tmp_path / "run" / "flagscale" / "candidate" / "outputs" / "standin" / "serve_logs" / "pids" / \
        "host_0_localhost.pid"
    server_pid = int(pid_file.read_text())
    assert srv.alive() and ask(endpoint) == "This is the stand-in answer."
    launcher_group, server_group = srv.pgid, os.getpgid(server_pid)
    assert (server_group == launcher_group) is not new_session
    srv.stop()
    assert_group_gone(launcher_group)
    assert_group_gone(server_group)


def test_external_endpoint_is_checked_used_and_never_stopped(tmp_path: Path) -> None:
    with server(spec(), tmp_path) as other:  # "someone else's" server
        url = other.endpoint.base_url
        external = ExternalServer(ServeSpec(name="ext", engine="external", base_url=url, startup_timeout_s=5), "reference")
        endpoint = external.start()
        assert endpoint.model == "tiny" and endpoint.server_version == "0.20.2-fake"
        assert external.evidence.models == ["tiny"] and external.evidence.warmup_s > 0
        external.stop()
        assert other.alive()
        wrong = ExternalServer(ServeSpec(name="ext", engine="external", base_url=url, served_model_name="other",
                                         startup_timeout_s=1), "reference", poll_interval_s=0.2)
        with pytest.raises(UserError, match=r"does not list model 'other' \(it lists \['tiny'\]\)"):
            wrong.start()
    with pytest.raises(UserError, match=rf"external endpoint {re.escape(url)} \(reference\) went away"):
        external.ensure_alive()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
