"""Faults never score (issue 13): the whole pipeline through the CLI, two stub servers with identical answers, one
of them failing 20 % of its requests with 500, 429, connection resets and answers from the wrong model."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from test_pipeline import cli, stub_spec, write_config

FAULTS = ("500", "429", "reset", "wrong_model")
ROW_NUMBERS = ("task", "n", "reference_score", "candidate_score", "delta", "delta_ci", "errors_reference",
               "errors_candidate")


def run(tmp_path: Path, run_id: str, candidate: dict, **fields) -> dict:
    config = write_config(tmp_path, reference=stub_spec("stub-ref"), candidate=candidate, suite="demo", limit=30,
                          perf={"enabled": False}, teacher_forced={"enabled": False}, **fields)
    done = cli(tmp_path, "run", "--config", str(config), "--run-id", run_id, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / f"reports/{run_id}/summary.json").read_text())
    assert summary["verdict"] != "regression" and all(t["verdict"] != "regression"
                                                      for t in summary["comparison"]["tasks"])
    return summary


def rows(summary: dict) -> list[dict]:
    return [{k: t[k] for k in ROW_NUMBERS} for t in summary["comparison"]["tasks"]]


def faulty(tmp_path: Path, seed: int) -> dict:
    return stub_spec("stub-cand", "--fault-rate", "0.2", "--faults", ",".join(FAULTS), "--seed", str(seed),
                     "--stats-file", str(tmp_path / "candidate-stats.json"))


def test_injected_faults_on_one_side_move_no_row_and_show_in_the_report(tmp_path):
    clean = run(tmp_path, "clean", stub_spec("stub-cand"))
    # Eight attempts: an item fails for good with odds 0.2**8, so every item ends with its answer.
    faults = run(tmp_path, "faults", faulty(tmp_path, seed=5), max_attempts=8)

    assert rows(faults) == rows(clean)  # retried to the same answers: every row's numbers are the fault-free ones
    assert faults["verdict"] != "regression"
    assert all(t["delta"] == 0 for t in faults["comparison"]["tasks"])
    candidate = faults["faults"]["candidate"]
    failed = {kind: sum(task["failed_attempts"].get(kind, 0) for task in candidate.values())
              for kind in ("http_5xx", "rate_limit", "connection", "wrong_model")}
    assert all(failed.values()), failed  # every injected kind was met, retried and counted under its own name
    retries = sum(task["retries"] for task in candidate.values())
    served = json.loads((tmp_path / "candidate-stats.json").read_text())
    assert retries == sum(served["faults"].values()) == sum(sum(t["failed_attempts"].values())
                                                            for t in candidate.values())
    assert all(sum(task["failed_attempts"].values()) == 0 for task in faults["faults"]["reference"].values())

    md = (tmp_path / "reports/faults/report.md").read_text()
    html = (tmp_path / "reports/faults/report.html").read_text()
    section = md.split("### Faults and retries", 1)[1].split("\n### ", 1)[0]
    assert "wrong_model ×" in section and "connection ×" in section
    assert sum(int(line.split("|")[5]) for line in section.splitlines() if line.startswith("| stub-cand")) == retries
    assert "Faults and retries" in html and "wrong_model ×" in html
    assert "Faults and retries" not in (tmp_path / "reports/clean/report.md").read_text()

    # Two stored runs compared: the candidate side's faults come from its own run.
    assert cli(tmp_path, "compare", "clean", "faults").returncode == 0
    compared = json.loads((tmp_path / "reports/clean__vs__faults/summary.json").read_text())
    assert compared["faults"]["candidate"] == candidate and rows(compared) == rows(clean)
    assert "### Faults and retries" in (tmp_path / "reports/clean__vs__faults/report.md").read_text()


def test_items_failing_for_good_are_left_out_and_a_rerun_asks_exactly_them(tmp_path):
    clean = run(tmp_path, "clean", stub_spec("stub-cand"))
    first = run(tmp_path, "retry", faulty(tmp_path, seed=7), max_attempts=1)  # no retry: 20 % fail for good

    db = tmp_path / "runs/retry/results.sqlite"
    with sqlite3.connect(db) as conn:
        errored = set(conn.execute("SELECT prompt_hash FROM records WHERE error != ''"))
        assert conn.execute("SELECT DISTINCT role FROM records WHERE error != ''").fetchall() == [("candidate",)]
    errors = sum(t["errors_candidate"] for t in first["comparison"]["tasks"])
    assert errors == len(errored) > 0
    for row, clean_row in zip(first["comparison"]["tasks"], clean["comparison"]["tasks"]):
        # An errored item is no answer: left out of the pairs (not scored 0), so Δ stays 0 and n shrinks.
        assert row["n"] == clean_row["n"] - row["errors_candidate"] and row["delta"] == 0
        assert row["verdict"] != "regression"
        assert first["comparison"]["drilldown"][row["task"]] == []  # an errored item is no disagreement either

    for attempt in range(6):  # each rerun sends exactly the items still failed, nothing else, on either side
        stats_file = tmp_path / "candidate-stats.json"
        stats_file.unlink()
        again = run(tmp_path, "retry", faulty(tmp_path, seed=7), max_attempts=1)
        asked = json.loads(stats_file.read_text())["requests"]["/v1/chat/completions"]
        assert {(digest,) for digest in asked} == errored and set(asked.values()) == {1}
        with sqlite3.connect(db) as conn:
            errored = set(conn.execute("SELECT prompt_hash FROM records WHERE error != ''"))
        if not errored:
            break
    assert not errored
    assert rows(again) == rows(clean)
