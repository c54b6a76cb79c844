"""The whole pipeline through the real CLI: run -> store -> score -> compare -> report, resume, errors."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers_servers import ServerPool, launch_stub, spawn_group

REPO = Path(__file__).resolve().parents[1]
CARD_ORDER = ["CMMMU", "MMMU", "MMMU_Pro_standard", "MMMU_Pro_vision", "MM-Vet v2", "OCRBench", "MathVision",
              "CII-Bench", "Blink", "AIME", "GPQA", "LiveBench", "MMLU", "MuSR"]
CARD_TASKS = ["cmmmu", "mmmu", "mmmu_pro_standard", "mmmu_pro_vision", "mmvet_v2", "ocrbench", "mathvision",
              "cii_bench", "blink", "aime", "gpqa_diamond", "livebench", "mmlu", "musr"]
# The omni suite's rows after the card's, marked as beyond it (↓: a corpus error rate)
BEYOND_CARD_ROWS = ["LibriSpeech test-clean ↓ †", "FLEURS zh ↓ †", "MMAU test-mini †", "Video-MME (short) †",
                    "OmniBench †"]


def stub_spec(name: str, *args: str) -> dict:
    return {"name": name, "engine": "stub", "served_model_name": "stub", "warmup": False,
            "args": ["--answer-mode", "letter", *args]}


def cli(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flageval_lite.cli", *args, "--runs-dir", str(tmp_path / "runs"),
           "--reports-dir", str(tmp_path / "reports")]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture
def pool(tmp_path):
    servers = ServerPool(tmp_path)
    yield servers
    servers.stop_all()


def score_rows(report_md: str) -> list[str]:
    section = report_md.split("### Scores", 1)[1].split("\n\n")[1]
    return [line.split("|")[1].strip() for line in section.splitlines()[2:]]


def test_omni_suite_on_fixtures_lists_the_14_card_rows_then_the_5_beyond(tmp_path, pool):
    judge = pool.stub("--model", "judge", "--answer-mode", "fixed", "--fixed-text", '{"score": 0.7}')
    config = write_config(tmp_path, reference=stub_spec("stub-ref"),
                          candidate=stub_spec("stub-cand", "--fault-rate", "0.2", "--faults", "500,429"),
                          suite="omni", limit=5, data_dir=str(REPO / "tests/fixtures/hub"),
                          judge={"base_url": judge.base_url, "model": "judge"},
                          # 10 attempts: an item fails for good with chance 0.2^10, not 0.2^4 (~14 % per run
                          # over the ~95 items with the default 4)
                          max_attempts=10)
    done = cli(tmp_path, "run", "--config", str(config), "--run-id", "omni", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "reports/omni/report.md").read_text()
    assert score_rows(report) == CARD_ORDER + BEYOND_CARD_ROWS
    assert "Rows marked † are beyond the model card" in report
    summary = json.loads((tmp_path / "reports/omni/summary.json").read_text())
    tasks = summary["comparison"]["tasks"]
    fixture_items = {"librispeech": 4, "fleurs_zh": 3, "mmau": 4, "video_mme": 2, "omnibench": 3}
    assert len(tasks) == 19 and all(t["n"] == min(5, fixture_items.get(t["task"], 5)) for t in tasks)
    # Injected 500/429 faults were retried: every item has an answer on both sides, none is an error.
    assert all(t["errors_candidate"] == 0 and t["errors_reference"] == 0 for t in tasks)
    mmvet = next(t for t in tasks if t["title"] == "MM-Vet v2")
    assert mmvet["reference_score"] == pytest.approx(70.0)


def test_kill9_mid_run_resumes_to_the_same_report(tmp_path):
    slow = ["--latency-ms", "150"]
    config = write_config(tmp_path, reference=stub_spec("stub-ref", *slow), candidate=stub_spec("stub-cand", *slow),
                          suite="demo", limit=40, concurrency=2)
    base = [sys.executable, "-m", "flageval_lite.cli", "run", "--config", str(config), "--quiet",
            "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]
    proc = spawn_group(base + ["--run-id", "crashed"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "runs/crashed/results.sqlite"
    deadline = time.time() + 120
    stored = 0
    while time.time() < deadline and stored < 30:
        time.sleep(0.3)
        if db.exists():
            with sqlite3.connect(db) as conn:
                try:
                    stored = conn.execute("select count(*) from records where task like 'demo%'").fetchone()[0]
                except sqlite3.OperationalError:
                    stored = 0
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stub servers, all at once
    proc.wait()
    assert 30 <= stored < 240, "the kill must land mid-run"

    resumed = subprocess.run(base + ["--run-id", "crashed"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run(base + ["--run-id", "whole"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("select count(*), count(distinct role || task || item_id) from records "
                            "where task like 'demo%'").fetchone()
    assert rows == (240, 240)  # 3 tasks x 40 items x 2 roles, no duplicate

    def numbers(run_id: str) -> list[dict]:
        tasks = json.loads((tmp_path / f"reports/{run_id}/summary.json").read_text())["comparison"]["tasks"]
        return [{k: t[k] for k in ("task", "n", "reference_score", "candidate_score", "delta", "delta_ci",
                                   "p_value", "verdict")} for t in tasks]

    assert numbers("crashed") == numbers("whole")


def test_report_rerenders_and_stored_runs_compare(tmp_path):
    config = write_config(tmp_path, reference=stub_spec("stub-ref"), candidate=stub_spec("stub-cand"),
                          tasks=["demo_mcq"], limit=12)
    assert cli(tmp_path, "run", "--config", str(config), "--run-id", "one", "--quiet").returncode == 0
    first = (tmp_path / "reports/one/report.md").read_text()
    (tmp_path / "reports/one/report.md").unlink()
    again = cli(tmp_path, "report", "one")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "reports/one/report.md").read_text() == first

    assert cli(tmp_path, "run", "--config", str(config), "--run-id", "two", "--quiet").returncode == 0
    compared = cli(tmp_path, "compare", "one", "two")
    assert compared.returncode == 0, compared.stderr
    summary = json.loads((tmp_path / "reports/one__vs__two/summary.json").read_text())
    [task] = summary["comparison"]["tasks"]
    assert task["n"] == 12 and task["output_agreement"] == 1.0 and task["delta"] == 0.0


@pytest.mark.parametrize("fields, where", [
    ({"reference": {"engine": "stub"}}, "name"),
    ({"reference": {"name": "x", "engine": "tgi"}}, "engine"),
    ({"tasks": ["no_such_task"]}, "no_such_task"),
    ({"placement": "sideways"}, "placement"),
    ({"concurrancy": 4}, "concurrancy"),
    ({"gpus": {"ref": 0}}, "gpus.ref"),
    # only found when the command line is built: before any server starts, not when the candidate's turn comes
    ({"candidate": {"name": "fs", "engine": "flagscale", "model": "qwen3_o", "flaggems": "flagscale",
                    "args": ["--engine-args", '{"tensor_parallel_size": 2}']}}, "not in --engine-args"),
    ({"reference": {"name": "r", "engine": "vllm", "model": "/m", "tensor_parallel_size": 2}}, "tensor_parallel_size"),
])
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, fields, where):
    config = write_config(tmp_path, **fields)
    done = cli(tmp_path, "run", "--config", str(config), "--quiet", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert where in lines[0]
    assert "run.yaml" in lines[0] or "no_such_task" in lines[0]


def test_a_judge_that_never_gives_a_score_is_counted_apart_in_the_report(tmp_path, pool):
    """The official style re-asks warmer, then scores its fallback 0.0: the report's LLM judge table says so per
    side, so a row moved by the judge giving up is told apart from one moved by the answers."""
    judge = pool.stub("--model", "judge", "--answer-mode", "fixed", "--fixed-text", "I cannot grade this.")
    source = REPO / "tests/fixtures/judge_sources/mm-vet-v2_evaluator.py"
    config = write_config(tmp_path, reference=stub_spec("stub-ref"), candidate=stub_spec("stub-cand"),
                          tasks=["mmvet_v2"], limit=3, data_dir=str(REPO / "tests/fixtures/hub"),
                          judge={"base_url": judge.base_url, "model": "judge", "prompt": "official",
                                 "source": str(source)})
    done = cli(tmp_path, "run", "--config", str(config), "--run-id", "judged", "--quiet")
    assert done.returncode in (0, 3), done.stderr[-3000:]
    summary = json.loads((tmp_path / "reports/judged/summary.json").read_text())
    expected = {"graded": 3, "runs": 3, "reasked": 3, "gave_up": 3, "faults": 0, "no_verdict": 0}
    assert summary["judging"] == {"reference": {"mmvet_v2": expected}, "candidate": {"mmvet_v2": expected}}
    task = summary["comparison"]["tasks"][0]
    assert task["reference_score"] == task["candidate_score"] == 0.0 and task["errors_candidate"] == 0
    report = (tmp_path / "reports/judged/report.md").read_text()
    table = report.split("LLM judge", 1)[1]
    assert "| MM-Vet v2 | 3 | 3 | 3 | 3 | 0 | 0 |" in table
    assert "LLM judge" in (tmp_path / "reports/judged/report.html").read_text()
    # Stored with each score: the judge's runs, as the scorer left them.
    store = sqlite3.connect(tmp_path / "runs/judged/results.sqlite")
    details = [json.loads(d) for (d,) in store.execute("select detail from scores where role = 'candidate'")]
    assert [len(d["runs"][0]["temperatures"]) for d in details] == [5, 5, 5]


def test_missing_judge_refused_before_any_server_starts(tmp_path):
    config = write_config(tmp_path, reference=stub_spec("a"), candidate=stub_spec("b"), tasks=["mmvet_v2"],
                          data_dir=str(REPO / "tests/fixtures/hub"))
    done = cli(tmp_path, "run", "--config", str(config), "--quiet", timeout=60)
    assert done.returncode == 2 and "judge" in done.stderr
    assert not list((tmp_path / "runs").glob("*/logs/*.log"))


def test_managed_server_dying_mid_run_is_restarted_and_the_run_completes(tmp_path):
    # The candidate crashes after every 25 answers; ensure_alive restarts it on the same port.
    crashing = {**stub_spec("stub-cand", "--exit-after", "25"), "max_restarts": 3}
    config = write_config(tmp_path, reference=stub_spec("stub-ref"), candidate=crashing, tasks=["demo_arith"],
                          limit=60, concurrency=4, perf={"enabled": False})
    done = cli(tmp_path, "run", "--config", str(config), "--run-id", "crashy", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "reports/crashy/summary.json").read_text())
    [task] = summary["comparison"]["tasks"]
    assert task["n"] == 60 and task["errors_candidate"] == 0
    assert summary["manifest"]["servers"]["candidate"]["restarts"] == 2


def test_native_and_lmeval_tasks_in_one_report(tmp_path):
    config = write_config(tmp_path, reference=stub_spec("stub-ref"), candidate=stub_spec("stub-cand"),
                          tasks=["demo_arith", "lmeval:flageval_arith"], limit=6,
                          lmeval_include_path=str(REPO / "tests/fixtures/lmeval_bridge"))
    done = cli(tmp_path, "run", "--config", str(config), "--run-id", "mixed", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = score_rows((tmp_path / "reports/mixed/report.md").read_text())
    assert rows[0] == "Demo arithmetic" and rows[1].startswith("flageval_arith")
    tasks = json.loads((tmp_path / "reports/mixed/summary.json").read_text())["comparison"]["tasks"]
    assert [t["n"] for t in tasks] == [6, 6]


def test_aa_repeat_order_is_reordered_within_bounded_blocks():
    from flageval_lite.runner.perf_load import block_reversed

    assert list(block_reversed(range(10), block=4)) == [3, 2, 1, 0, 7, 6, 5, 4, 9, 8]
    assert list(block_reversed([], block=4)) == []


def test_tasks_command_lists_every_benchmark_and_suite():
    done = subprocess.run([sys.executable, "-m", "flageval_lite.cli", "tasks"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    titles = {line.split()[0] for line in lines[1:]}
    assert {"mmmu", "gpqa_diamond", "livebench", "musr", "demo_arith"} <= titles
    in_suite = [set(word for column in line.split() for word in column.split(",")) for line in lines[1:]]
    assert sum("omni" in suites for suites in in_suite) == 19 and sum("omni-av" in suites for suites in in_suite) == 5
    assert any(line.startswith("demo_arith") and line.rstrip().endswith("120") for line in lines)


def test_candidate_without_flaggems_is_refused_after_warm_up_before_any_item(tmp_path):
    # An external server that claims the FlagGems plugin route but shows no FlagGems operator: refused as soon as
    # it is up (warm-up on), not after the whole run has been asked of it.
    with launch_stub(tmp_path, "--model", "stub") as claims:
        candidate = {"name": "claims-flaggems", "engine": "external", "base_url": claims.base_url,
                     "served_model_name": "stub", "flaggems": {"route": "plugin"}}
        config = write_config(tmp_path, reference=stub_spec("ref"), candidate=candidate, tasks=["demo_arith"],
                              limit=30, placement="concurrent", perf={"enabled": False})
        done = cli(tmp_path, "run", "--config", str(config), "--quiet", timeout=120)
        asked = claims.get("/stats")
    assert done.returncode == 2, done.stderr
    assert "candidate ran without FlagGems: spec 'claims-flaggems' asks for route 'plugin'" in done.stderr
    assert asked["answered"] <= 1  # the warm-up request only: none of the 30 items


def test_perf_loads_are_warmed_up_before_they_are_measured(tmp_path):
    """The candidate stub pays 1.5 s on the first requests of each prompt length, as a JIT compiling kernels for a
    new shape would: one unmeasured wave per load (the same lengths, other text) pays it, the measured TTFTs do not,
    and the wave's records are no perf samples."""
    perf = {"concurrency": [2], "requests": 4, "prompt_words": 50, "output_tokens": 4}  # no demo prompt is as long
    config = write_config(tmp_path, reference=stub_spec("stub-ref"), candidate=stub_spec("stub-cand", "--compile-ms",
                                                                                          "1500"),
                          tasks=["demo_arith"], limit=2, perf=perf, teacher_forced={"enabled": False})
    done = cli(tmp_path, "run", "--config", str(config), "--run-id", "warm", "--quiet")
    assert done.returncode in (0, 1, 3), done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "runs/warm/results.sqlite") as conn:
        waves = conn.execute("select role, task, count(*), min(latency_s) from records where task like 'perf%' "
                             "group by role, task order by role, task").fetchall()
    assert [row[:3] for row in waves] == [("candidate", "perf-warmup@c2", 2), ("candidate", "perf@c2", 4),
                                          ("reference", "perf-warmup@c2", 2), ("reference", "perf@c2", 4)]
    assert waves[0][3] >= 1.5  # the candidate's warm-up wave compiled
    summary = json.loads((tmp_path / "reports/warm/summary.json").read_text())
    assert set(summary["comparison"]["perf"]) == {"perf@c2"}
    assert summary["comparison"]["perf"]["perf@c2"]["candidate"]["requests"] == 4
    assert summary["comparison"]["perf"]["perf@c2"]["candidate"]["ttft_ms_p99"] < 1500


def test_resume_with_a_changed_candidate_spec_compares_only_its_own_perf_samples(tmp_path):
    """The first run's candidate answers at once; the resumed run's candidate spec adds 150 ms per request.  Its
    perf samples are a new endpoint identity: only they are compared, the earlier ones stay in the store."""
    perf = {"concurrency": [2], "requests": 6, "prompt_words": 8, "output_tokens": 4}
    common = dict(reference=stub_spec("stub-ref"), tasks=["demo_arith"], limit=4, perf=perf)
    for candidate in (stub_spec("stub-cand"), stub_spec("stub-cand", "--latency-ms", "150")):
        config = write_config(tmp_path, candidate=candidate, **common)
        done = cli(tmp_path, "run", "--config", str(config), "--run-id", "changed", "--quiet")
        assert done.returncode in (0, 1), done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "runs/changed/results.sqlite") as conn:
        stored = dict(conn.execute("select role, count(*) from records where task = 'perf@c2' group by role"))
        identities = conn.execute("select count(distinct endpoint_id) from records where task = 'perf@c2' "
                                  "and role = 'candidate'").fetchone()[0]
    assert stored == {"reference": 6, "candidate": 12} and identities == 2  # kept apart, not deleted
    summary = json.loads((tmp_path / "reports/changed/summary.json").read_text())
    compared = summary["comparison"]["perf"]["perf@c2"]
    assert compared["reference"]["requests"] == compared["candidate"]["requests"] == 6
    assert compared["candidate"]["e2el_ms_p50"] >= 150  # pooled with the earlier fast answers it would not be
    assert summary["manifest"]["perf_set_aside"] == {"candidate": 6}
    assert "6 sample(s) of an earlier candidate serve spec" in (tmp_path / "reports/changed/report.md").read_text()
