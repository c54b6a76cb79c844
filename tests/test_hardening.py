"""Issue 14: secrets stay in memory, run ids stay in their roots, a failed rerun keeps the stored run, one process
per run, servers die with a SIGKILLed harness, report cells are escaped, unchecked external evidence says so."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import yaml
from test_report import synthetic_inputs

from flageval_lite.errors import ConfigError, UserError
from flageval_lite.report.render import render_report
from flageval_lite.runner.run_dir import check_run_id, inside
from flageval_lite.runner.store import RunLock
from flageval_lite.schema import build, checked
from flageval_lite.secrets import REDACTED, redact
from flageval_lite.serving.processes import spawn

REPO = Path(__file__).resolve().parents[1]
PLANTED = ("sk-PLANTED-reference-key-0001", "hf_PLANTEDtokenvalue0002", "sk-PLANTED-candidate-key-0003",
           "sk-PLANTED-judge-key-0004", "PLANTED-password-0005")
QUICK = {"perf": {"enabled": False}, "teacher_forced": {"enabled": False}}


def stub(name: str, *args: str, **fields) -> dict:
    return {"name": name, "engine": "stub", "served_model_name": "stub", "warmup": False,
            "args": ["--answer-mode", "letter", *args], **fields}


def cli(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flageval_lite.cli", *args, "--runs-dir", str(tmp_path / "runs"),
           "--reports-dir", str(tmp_path / "reports")]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def config(tmp_path: Path, name: str = "run.yaml", **fields) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**QUICK, **fields}))
    return path


def test_planted_secrets_reach_no_file_and_no_log(tmp_path):
    ref_key, token, cand_key, judge_key, password = PLANTED
    cfg = config(tmp_path, tasks=["demo_mcq"], limit=4,
                 reference=stub("ref", api_key=ref_key, env={"HF_TOKEN": token, "PLAIN_SETTING": "visible"}),
                 candidate=stub("cand", api_key=cand_key, env={"DB_PASSWORD": password}),
                 judge={"base_url": "http://127.0.0.1:9/v1", "model": "judge", "api_key": judge_key})
    done = cli(tmp_path, "-v", "run", "--config", str(cfg), "--run-id", "secret", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli(tmp_path, "report", "secret").returncode == 0

    artefacts = [p for root in ("runs", "reports") for p in (tmp_path / root).rglob("*") if p.is_file()]
    assert {"manifest.json", "results.sqlite", "summary.json", "report.md", "report.html"} <= {p.name for p in artefacts}
    assert any(p.suffix == ".log" for p in artefacts)
    for path in artefacts:  # bytes: SQLite pages and its WAL included
        blob = path.read_bytes()
        assert not any(key.encode() in blob for key in PLANTED), path
    assert not any(key in done.stdout + done.stderr for key in PLANTED)
    manifest = json.loads((tmp_path / "runs/secret/manifest.json").read_text())
    reference = manifest["specs"]["reference"]
    assert reference["api_key"] == REDACTED and dict(reference["env"]) == {"HF_TOKEN": REDACTED,
                                                                          "PLAIN_SETTING": "visible"}


@dataclasses.dataclass
class Section:
    share: float = checked(0.5, low=0, below=1)
    levels: tuple[int, ...] = checked((1,), low=1, nonempty=True)
    mode: str = checked("a", choices=("a", "b"))
    cap: Optional[int] = checked(None, above=0)
    on: bool = True


@dataclasses.dataclass
class Top:
    section: Section = dataclasses.field(default_factory=Section)
    name: str = ""


@pytest.mark.parametrize("raw, where, words", [
    ({"section": {"share": 1}}, "section.share", "must lie in [0, 1), got 1"),
    ({"section": {"share": "half"}}, "section.share", "expected a number, got 'half'"),
    ({"section": {"levels": [2, 0]}}, "section.levels[1]", "must be at least 1, got 0"),
    ({"section": {"levels": []}}, "section.levels", "must not be empty"),
    ({"section": {"levels": 3}}, "section.levels", "expected a list of integers, got 3"),
    ({"section": {"mode": "c"}}, "section.mode", "must be one of a, b, got 'c'"),
    ({"section": {"cap": 0}}, "section.cap", "must be greater than 0, got 0"),
    ({"section": {"on": "yes"}}, "section.on", "expected true or false, got 'yes'"),
    ({"section": {"colour": 1}}, "section.colour", "unknown field (known: cap, levels, mode, on, share)"),
    ({"section": []}, "section", "expected a mapping, got []"),
    ({"name": None}, "name", "expected a string, got nothing"),
])
def test_schema_validates_any_declared_field_by_its_annotation(raw, where, words):
    with pytest.raises(ConfigError) as info:
        build(Top, raw, "x.yaml")
    assert (info.value.field, str(info.value)) == (where, f"x.yaml: {where}: {words}")


def test_schema_builds_nested_defaults_and_keeps_ints():
    values = build(Top, {"section": {"share": 0, "cap": None, "levels": [3, 4]}, "name": "n"}, "x.yaml")
    assert Top(**values) == Top(Section(share=0, levels=(3, 4)), name="n")
    assert type(values["section"].share) is int  # 0 stays 0: cache keys hash params as given
    assert build(Top, {"section": None}, "x.yaml")["section"] == Section()


def test_redaction_covers_flags_env_words_and_nested_values():
    value = {"args": ["--api-key", "k1", "--hf-token=k2", "--port", "8000"], "command": ["AUTH_TOKEN=k3", "serve"],
             "nested": [{"secret_key": "k4", "api_key": "EMPTY"}], "env": [["OPENAI_API_KEY", "k5"], ["X", "1"]]}
    assert redact(value) == {"args": ["--api-key", REDACTED, f"--hf-token={REDACTED}", "--port", "8000"],
                             "command": [f"AUTH_TOKEN={REDACTED}", "serve"],
                             "nested": [{"secret_key": REDACTED, "api_key": "EMPTY"}],
                             "env": [["OPENAI_API_KEY", REDACTED], ["X", "1"]]}
    harmless = {"max_tokens": 256, "prompt_token_ids": [1, 2], "tokenizer": "/m", "author": "someone",
                "completion_tokens": 3, "api_key": "EMPTY", "token_count": 7}
    assert redact(harmless) == {**harmless, "token_count": 7}


@pytest.mark.parametrize("run_id", ["../x", "../../x", "/abs/run", "a/b", "..", ".", ".hidden", "", "a" * 129,
                                    "run id", "run\nid", "ünïcode"])
def test_run_ids_are_one_safe_path_segment(run_id):
    with pytest.raises(UserError, match="--run-id"):
        check_run_id(run_id)


def test_run_folder_symlinked_out_of_its_root_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs/out").symlink_to(tmp_path / "elsewhere")
    assert inside(tmp_path / "runs", "fine-1.2_x", "--run-id") == (tmp_path / "runs/fine-1.2_x").resolve()
    with pytest.raises(UserError, match="outside"):
        inside(tmp_path / "runs", "out", "--run-id")


def test_failed_rerun_keeps_the_stored_run_and_a_changed_rerun_keeps_history(tmp_path):
    good = config(tmp_path, "good.yaml", tasks=["demo_mcq"], limit=6, reference=stub("ref"), candidate=stub("cand"))
    assert cli(tmp_path, "run", "--config", str(good), "--run-id", "kept", "--quiet").returncode == 0
    db = tmp_path / "runs/kept/results.sqlite"
    manifest = (tmp_path / "runs/kept/manifest.json").read_text()
    answers = sqlite3.connect(db).execute("SELECT COUNT(*) FROM records WHERE error = ''").fetchone()[0]

    down = {"name": "down", "engine": "external", "base_url": "http://127.0.0.1:9/v1", "startup_timeout_s": 1}
    bad = config(tmp_path, "bad.yaml", tasks=["demo_mcq", "demo_arith"], limit=6, reference=down,
                 candidate=stub("cand"))
    failed = cli(tmp_path, "run", "--config", str(bad), "--run-id", "kept", "--quiet")
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert (tmp_path / "runs/kept/manifest.json").read_text() == manifest
    again = cli(tmp_path, "report", "kept")
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM records WHERE error = ''").fetchone()[0] == answers
        assert json.loads(conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])["tasks"] == [
            "demo_mcq"]

    more = config(tmp_path, "more.yaml", tasks=["demo_mcq"], limit=8, reference=stub("ref"), candidate=stub("cand"))
    assert cli(tmp_path, "run", "--config", str(more), "--run-id", "kept", "--quiet").returncode == 0
    [old] = (tmp_path / "runs/kept/manifests").glob("manifest-*.json")
    assert old.read_text() == manifest
    with sqlite3.connect(db) as conn:
        history = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'history'").fetchone()[0])
    assert [h["config"]["limit"] for h in history] == [6]


def test_second_process_on_a_run_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs/busy"
    run_dir.mkdir(parents=True)
    cfg = config(tmp_path, tasks=["demo_mcq"], limit=2, reference=stub("ref"), candidate=stub("cand"))
    with RunLock(run_dir, "busy"):
        done = cli(tmp_path, "run", "--config", str(cfg), "--run-id", "busy", "--quiet")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: run busy is in use by process {os.getpid()} ({run_dir / 'run.lock'}); "
                                   "wait for it to end, or stop it and rerun with --run-id busy to resume")
    assert not (run_dir / "logs").exists()  # refused before any server started

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "run.lock").write_text(f"{dead.pid}\n")  # left behind by a holder that died
    with RunLock(run_dir, "busy"):
        assert (run_dir / "run.lock").read_text() == f"{os.getpid()}\n"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # dead, waiting for whichever process adopted it to reap it


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_harness_leaves_no_server_behind(tmp_path):
    slow = ["--latency-ms", "200"]
    cfg = config(tmp_path, tasks=["demo_mcq"], limit=40, concurrency=1, placement="concurrent",
                 reference=stub("ref", *slow), candidate=stub("cand", *slow))
    harness = spawn([sys.executable, "-m", "flageval_lite.cli", "run", "--config", str(cfg), "--quiet",
                     "--run-id", "orphans", "--runs-dir", str(tmp_path / "runs"),
                     "--reports-dir", str(tmp_path / "reports")],
                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "runs/orphans/results.sqlite"
    deadline = time.time() + 90
    servers: list[int] = []
    while time.time() < deadline and harness.poll() is None:
        servers = _children(harness.pid)
        if len(servers) == 2 and db.is_file():
            with sqlite3.connect(db) as conn:
                if conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] >= 2:
                    break
        time.sleep(0.2)
    assert harness.poll() is None and len(servers) == 2, "both servers should be up mid-run"
    harness.send_signal(signal.SIGKILL)
    harness.wait()
    deadline = time.time() + 15
    while time.time() < deadline and not all(_gone(pid) for pid in servers):
        time.sleep(0.2)
    left = [pid for pid in servers if not _gone(pid)]
    for pid in left:  # don't leak them into other tests, but fail
        os.killpg(pid, signal.SIGKILL)
    assert not left, f"servers {left} outlived the SIGKILLed harness"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_server_restarted_from_a_short_lived_thread_outlives_that_thread():
    procs = []
    worker = threading.Thread(target=lambda: procs.append(
        spawn([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)))
    worker.start()
    worker.join()
    time.sleep(1.0)  # PDEATHSIG, had the child been forked from that thread, would have fired by now
    try:
        assert procs[0].poll() is None
    finally:
        procs[0].kill()
        procs[0].wait()



@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkilled_test_process_leaves_no_fixture_server_behind(tmp_path):
    """A server of tests/helpers_servers.py dies with the test process that started it, as a killed pytest's do."""
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from helpers_servers import launch_stub; "
              "print(launch_stub(sys.argv[2]).proc.pid, flush=True); time.sleep(60)")
    tester = spawn([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path)], cwd=REPO,
                   stdout=subprocess.PIPE, text=True)
    server = int(tester.stdout.readline())
    assert not _gone(server)
    tester.kill()
    tester.wait()
    deadline = time.time() + 15
    while time.time() < deadline and not _gone(server):
        time.sleep(0.1)
    if not _gone(server):
        os.killpg(server, signal.SIGKILL)  # its own group: don't leak it into other tests, but fail
        pytest.fail(f"stub server {server} outlived the SIGKILLed test process")

def test_report_cells_are_escaped(tmp_path):
    comparison, manifest = synthetic_inputs()
    hostile = '<img src=x onerror=alert(1)> *bold* `code` [link](http://x) a|b'
    comparison = dataclasses.replace(comparison, tasks=[dataclasses.replace(comparison.tasks[0], title=hostile)]
                                     + comparison.tasks[1:])
    manifest["specs"]["reference"]["name"] = "<b>ref</b>"
    md = render_report(comparison, manifest, tmp_path)["md"].read_text()
    assert "<img" not in md and "<b>" not in md
    assert r"&lt;img src=x onerror=alert(1)> \*bold\* \`code\` [link\](http://x) a\|b" in md
    assert "&lt;b>ref&lt;/b>" in md


def test_external_endpoint_without_our_evidence_reads_not_checked(tmp_path):
    comparison, manifest = synthetic_inputs()
    manifest["specs"]["reference"] = {**manifest["specs"]["reference"], "engine": "external"}
    manifest["servers"]["reference"] = {"role": "reference", "models": ["m"], "version": {"version": "0.9"}}
    md = render_report(comparison, manifest, tmp_path)["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| FlagGems ops registered / called"))
    assert row.split("|")[2].strip() == "not checked (external)"
    assert "not checked (external)" not in row.split("|")[3]  # the managed candidate's evidence was checked
    operators = next(line for line in md.splitlines() if line.startswith("| operators"))
    assert "not checked (external)" in operators.split("|")[2]
