"""Malformed input of every kind (run configs, serve specs, task YAML, dataset rows, command-line flags) gives
exit 2 and one line naming the place, never a traceback, and loses none of the answers of the stored run it
was given as a rerun of.  The CLI runs in-process; every case fails before a server starts.

`python tests/test_bad_inputs.py` prints the table of cases and messages that docs/runner.md lists.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

from flageval_lite.cli import main

REPO = Path(__file__).resolve().parents[1]
STUB = {"engine": "stub", "served_model_name": "stub", "warmup": False, "args": ["--answer-mode", "letter"]}
BASE_CONFIG = {"reference": {"name": "ref", **STUB}, "candidate": {"name": "cand", **STUB}, "tasks": ["demo_mcq"],
               "limit": 4, "perf": {"enabled": False}, "teacher_forced": {"enabled": False}}
PROBE_TASK = {"name": "probe", "title": "Probe", "modality": "text", "dataset": {"path": "data.jsonl"},
              "id_field": "id", "prompt": "{{ question }}", "gold": "answer", "meta": {"options": "options"},
              "scorer": "choice"}
PROBE_ROW = {"id": "q1", "question": "Which?", "options": ["x", "y"], "answer": "A"}
RUN_ID = "stored"


@dataclass(frozen=True)
class Case:
    """One bad input.  kind: config (run.yaml = BASE_CONFIG + body, or raw YAML text), serve (--reference
    ref.yaml), task (--tasks probe.yaml = PROBE_TASK + body), rows (probe's data.jsonl), flags (run + args, on
    BASE_CONFIG + body), command (argv as given).  `where`: what the one-line message must name."""

    id: str
    kind: str
    body: Union[dict[str, Any], str, None]
    where: str
    args: tuple[str, ...] = field(default=())


CASES = [
    # ---------------------------------------------------------------- run config (run.yaml)
    Case("tasks-not-a-list", "config", {"tasks": 42}, "run.yaml: tasks:"),
    Case("tasks-item-not-a-string", "config", {"tasks": ["demo_mcq", 7]}, "run.yaml: tasks[1]:"),
    Case("tasks-empty-string", "config", {"tasks": ",,"}, "run.yaml: tasks:"),
    Case("tasks-unknown", "config", {"tasks": ["no_such_task"]}, "run.yaml: tasks: unknown task 'no_such_task'"),
    Case("suite-unknown", "config", {"suite": "nosuch", "tasks": None}, "run.yaml: suite: unknown suite"),
    Case("suite-empty", "config", {"suite": ""}, "run.yaml: suite:"),
    Case("perf-concurrency-string", "config", {"perf": {"concurrency": "abc"}}, "run.yaml: perf.concurrency:"),
    Case("perf-concurrency-negative", "config", {"perf": {"concurrency": [-1]}}, "run.yaml: perf.concurrency[0]:"),
    Case("perf-concurrency-empty", "config", {"perf": {"concurrency": []}}, "run.yaml: perf.concurrency:"),
    Case("perf-requests-negative", "config", {"perf": {"requests": -3}}, "run.yaml: perf.requests:"),
    Case("perf-prompt-words-zero", "config", {"perf": {"prompt_words": 0}}, "run.yaml: perf.prompt_words:"),
    Case("perf-output-tokens-string", "config", {"perf": {"output_tokens": "x"}}, "run.yaml: perf.output_tokens:"),
    Case("perf-unknown-key", "config", {"perf": {"turbo": True}}, "run.yaml: perf.turbo: unknown field"),
    Case("perf-not-a-mapping", "config", {"perf": 5}, "run.yaml: perf:"),
    Case("margin-negative", "config", {"margin": -2}, "run.yaml: margin:"),
    Case("margin-string", "config", {"margin": "wide"}, "run.yaml: margin:"),
    Case("release-gate-zero", "config", {"release_gate": 0}, "run.yaml: release_gate:"),
    Case("request-timeout-zero", "config", {"request_timeout_s": 0}, "run.yaml: request_timeout_s:"),
    Case("request-timeout-negative", "config", {"request_timeout_s": -1}, "run.yaml: request_timeout_s:"),
    Case("max-tokens-cap-negative", "config", {"max_tokens_cap": -1}, "run.yaml: max_tokens_cap:"),
    Case("concurrency-zero", "config", {"concurrency": 0}, "run.yaml: concurrency:"),
    Case("concurrency-float", "config", {"concurrency": 1.5}, "run.yaml: concurrency:"),
    Case("concurrency-bool", "config", {"concurrency": True}, "run.yaml: concurrency:"),
    Case("limit-zero", "config", {"limit": 0}, "run.yaml: limit:"),
    Case("limit-string", "config", {"limit": "ten"}, "run.yaml: limit:"),
    Case("max-attempts-zero", "config", {"max_attempts": 0}, "run.yaml: max_attempts:"),
    Case("placement-unknown", "config", {"placement": "sideways"}, "run.yaml: placement:"),
    Case("allow-fallback-string", "config", {"allow_fallback": "yes"}, "run.yaml: allow_fallback:"),
    Case("noise-floor-int", "config", {"noise_floor": 1}, "run.yaml: noise_floor:"),
    Case("interleave-string", "config", {"interleave": "no"}, "run.yaml: interleave:"),
    Case("max-image-pixels-negative", "config", {"max_image_pixels": -5}, "run.yaml: max_image_pixels:"),
    Case("unknown-field", "config", {"concurrancy": 4}, "run.yaml: concurrancy: unknown field"),
    Case("judge-unknown-key", "config", {"judge": {"base_url": "http://127.0.0.1:9/v1", "modle": "j"}},
         "run.yaml: judge.modle: unknown field"),
    Case("judge-retries-zero", "config", {"judge": {"max_retries": 0}}, "run.yaml: judge.max_retries:"),
    Case("judge-runs-zero", "config", {"judge": {"runs": 0}}, "run.yaml: judge.runs: must be at least 1, got 0"),
    Case("judge-not-a-mapping", "config", {"judge": "http://127.0.0.1:9/v1"}, "run.yaml: judge:"),
    Case("judge-prompt-unknown", "config", {"judge": {"prompt": "gpt4"}}, "run.yaml: judge.prompt:"),
    Case("teacher-forced-top-k", "config", {"teacher_forced": {"top_k": 99}}, "run.yaml: teacher_forced.top_k:"),
    Case("teacher-forced-items", "config", {"teacher_forced": {"items": 0}}, "run.yaml: teacher_forced.items:"),
    Case("gpus-unknown-role", "config", {"gpus": {"ref": 0}}, "run.yaml: gpus.ref:"),
    Case("gpus-not-a-mapping", "config", {"gpus": "0"}, "run.yaml: gpus:"),
    Case("data-dir-missing", "config", {"data_dir": "/nonexistent/data"}, "run.yaml: data_dir: no such directory"),
    Case("lmeval-include-missing", "config", {"lmeval_include_path": "/nonexistent/t"},
         "run.yaml: lmeval_include_path:"),
    Case("reference-number", "config", {"reference": 42}, "run.yaml: reference:"),
    Case("reference-empty-list", "config", {"reference": []}, "run.yaml: reference: empty list"),
    Case("reference-unknown-name", "config", {"reference": "nosuchspec"}, "nosuchspec: no serve spec named"),
    Case("inline-spec-bad-port", "config", {"candidate": {"name": "c", "engine": "stub", "port": -1}},
         "run.yaml:candidate: port:"),
    Case("top-level-list", "config", "- reference\n- candidate\n", "run.yaml: expected a mapping"),
    Case("invalid-yaml", "config", "tasks: [demo_mcq\nlimit: 3\n", "run.yaml: line 2: invalid YAML"),
    # ---------------------------------------------------------------- serve spec (--reference ref.yaml)
    Case("serve-engine-missing", "serve", {"name": "ref", "engine": None}, "ref.yaml: engine:"),
    Case("serve-engine-unknown", "serve", {"engine": "tgi"}, "ref.yaml: engine:"),
    Case("serve-port-too-big", "serve", {"port": 70000}, "ref.yaml: port:"),
    Case("serve-port-string", "serve", {"port": "80"}, "ref.yaml: port:"),
    Case("serve-dtype-unknown", "serve", {"dtype": "float8"}, "ref.yaml: dtype:"),
    Case("serve-replicas-zero", "serve", {"replicas": 0}, "ref.yaml: replicas:"),
    Case("serve-memory-share", "serve", {"gpu_memory_utilization": 1.5}, "ref.yaml: gpu_memory_utilization:"),
    Case("serve-startup-timeout-zero", "serve", {"startup_timeout_s": 0}, "ref.yaml: startup_timeout_s:"),
    Case("serve-warmup-string", "serve", {"warmup": "yes"}, "ref.yaml: warmup:"),
    Case("serve-args-string", "serve", {"args": "--foo"}, "ref.yaml: args:"),
    Case("serve-env-list", "serve", {"env": ["A", "B"]}, "ref.yaml: env:"),
    Case("serve-route-unknown", "serve", {"flaggems": {"route": "warp"}}, "ref.yaml: flaggems.route:"),
    Case("serve-external-no-url", "serve", {"engine": "external", "args": None}, "ref.yaml: base_url:"),
    Case("serve-external-ftp-url", "serve", {"engine": "external", "args": None, "base_url": "ftp://x"},
         "ref.yaml: base_url:"),
    Case("serve-unknown-field", "serve", {"colour": "red"}, "ref.yaml: colour: unknown field"),
    Case("serve-tp-zero", "serve", {"tensor_parallel_size": 0}, "ref.yaml: tensor_parallel_size:"),
    Case("serve-restarts-negative", "serve", {"max_restarts": -1}, "ref.yaml: max_restarts:"),
    Case("serve-api-key-number", "serve", {"api_key": 123}, "ref.yaml: api_key:"),
    # ---------------------------------------------------------------- task YAML (--tasks probe.yaml)
    Case("task-max-tokens-negative", "task", {"generation": {"max_tokens": -5}}, "probe.yaml: generation.max_tokens:"),
    Case("task-max-tokens-string", "task", {"generation": {"max_tokens": "many"}},
         "probe.yaml: generation.max_tokens:"),
    Case("task-stream-string", "task", {"generation": {"stream": "yes"}}, "probe.yaml: generation.stream:"),
    Case("task-top-logprobs-99", "task", {"generation": {"top_logprobs": 99}}, "probe.yaml: generation.top_logprobs:"),
    Case("task-temperature-negative", "task", {"generation": {"temperature": -1}},
         "probe.yaml: generation.temperature:"),
    Case("task-top-p-zero", "task", {"generation": {"top_p": 0}}, "probe.yaml: generation.top_p:"),
    Case("task-generation-unknown", "task", {"generation": {"bogus": 1}}, "probe.yaml: generation.bogus:"),
    Case("task-modality-unknown", "task", {"modality": "smell"}, "probe.yaml: modality:"),
    Case("task-scorer-unknown", "task", {"scorer": "nosuch"}, "probe.yaml: scorer:"),
    Case("task-prompt-missing", "task", {"prompt": None}, "probe.yaml: prompt:"),
    Case("task-name-not-stem", "task", {"name": "other"}, "probe.yaml: name:"),
    Case("task-prompt-jinja-error", "task", {"prompt": "{{ oops"}, "probe.yaml: prompt: jinja syntax error"),
    Case("task-hub-without-revision", "task", {"dataset": {"hub": "org/x", "split": "test"}},
         "probe.yaml: dataset.revision:"),
    Case("task-format-unknown", "task", {"dataset": {"path": "data.xml"}}, "probe.yaml: dataset.format:"),
    Case("task-metric-unknown", "task", {"metric": "f1"}, "probe.yaml: metric:"),
    Case("task-scorer-args-unknown", "task", {"scorer_args": {"nope": 1}}, "probe.yaml: scorer_args:"),
    # ---------------------------------------------------------------- dataset rows (probe's data.jsonl)
    Case("row-is-a-list", "rows", "[1, 2]\n", "data.jsonl:1: expected a JSON object"),
    Case("row-invalid-json", "rows", '{"id": "q1", \n', "data.jsonl:1: invalid JSON"),
    Case("row-options-string", "rows", json.dumps({**PROBE_ROW, "options": "x, y"}) + "\n",
         "probe.yaml: meta.options: item q1"),
    Case("row-options-empty", "rows", json.dumps({**PROBE_ROW, "options": []}) + "\n",
         "probe.yaml: meta.options: item q1"),
    # ---------------------------------------------------------------- command line
    Case("flag-limit-not-int", "flags", None, "command line: argument --limit", ("--limit", "abc")),
    Case("flag-limit-zero", "flags", None, "command line: --limit:", ("--limit", "0")),
    Case("flag-limit-negative", "flags", None, "command line: --limit:", ("--limit", "-3")),
    Case("flag-concurrency-zero", "flags", None, "command line: --concurrency:", ("--concurrency", "0")),
    Case("flag-margin-negative", "flags", None, "command line: --margin:", ("--margin", "-1")),
    Case("flag-margin-nan", "flags", None, "command line: --margin:", ("--margin", "nan")),
    Case("flag-tasks-only-commas", "flags", None, "command line: --tasks:", ("--tasks", ",,,")),
    Case("flag-tasks-unknown", "flags", None, "command line: --tasks: unknown task", ("--tasks", "no_such")),
    Case("flag-suite-unknown", "flags", {"tasks": None}, "command line: --suite: unknown suite", ("--suite", "nosuch")),
    Case("flag-placement-unknown", "flags", None, "command line: argument --placement", ("--placement", "x")),
    Case("flag-reference-unknown", "flags", None, "nosuch: no serve spec named", ("--reference", "nosuch")),
    Case("flag-data-dir-missing", "flags", None, "command line: --data-dir: no such directory",
         ("--data-dir", "/nonexistent")),
    Case("flag-config-missing", "flags", None, "missing.yaml: no such config file", ("--config", "missing.yaml")),
    Case("flag-unknown", "flags", None, "command line: unrecognized arguments: --bogus", ("--bogus",)),
    Case("run-id-parent", "command", None, "command line: --run-id:", ("run", "--run-id", "../../x")),
    Case("run-id-absolute", "command", None, "command line: --run-id:", ("run", "--run-id", "/tmp/x")),
    Case("run-id-hidden", "command", None, "command line: --run-id:", ("run", "--run-id", ".x")),
    Case("report-run-parent", "command", None, "command line: RUN:", ("report", "../x")),
    Case("report-run-unknown", "command", None, "nosuch: no stored run", ("report", "nosuch")),
    Case("compare-run-unknown", "command", None, "nosuch: no stored run", ("compare", "nosuch", RUN_ID)),
]


def case_argv(case: Case, folder: Path) -> list[str]:
    """Write the case's files into `folder` and return the CLI arguments (a rerun of the stored run)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(BASE_CONFIG))
    if case.kind == "command":
        return list(case.args)
    run = ["run", "--run-id", RUN_ID, "--quiet", "--config", str(config)]
    if case.kind in ("config", "flags") and case.body is not None:
        config.write_text(case.body if isinstance(case.body, str) else
                          yaml.safe_dump({k: v for k, v in {**BASE_CONFIG, **case.body}.items() if v is not None}))
    elif case.kind == "serve":
        spec = {k: v for k, v in {"name": "ref", **STUB, **case.body}.items() if v is not None}
        (folder / "ref.yaml").write_text(yaml.safe_dump(spec))
        run += ["--reference", str(folder / "ref.yaml")]
    elif case.kind in ("task", "rows"):
        task = {k: v for k, v in {**PROBE_TASK, **(case.body if case.kind == "task" else {})}.items()
                if v is not None}
        (folder / "probe.yaml").write_text(yaml.safe_dump(task))
        (folder / "data.jsonl").write_text(case.body if case.kind == "rows" else json.dumps(PROBE_ROW) + "\n")
        run += ["--tasks", str(folder / "probe.yaml")]
    return run + list(case.args)


def run_cli(argv: list[str], runs: Path, reports: Path, cwd: Path) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr).  An exception other than the CLI's own exit propagates,
    so a traceback fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), contextlib.chdir(cwd):
        try:
            code = main([*argv, "--runs-dir", str(runs), "--reports-dir", str(reports)])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def stored_answers(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT cache_key, response_text FROM records WHERE error = '' ORDER BY 1").fetchall()


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory) -> Path:
    """A finished run the bad reruns are given as --run-id."""
    root = tmp_path_factory.mktemp("stored")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(BASE_CONFIG))
    done = subprocess.run([sys.executable, "-m", "flageval_lite.cli", "run", "--config", str(config), "--run-id",
                           RUN_ID, "--quiet", "--runs-dir", str(root / "runs"), "--reports-dir",
                           str(root / "reports")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_at_least_sixty_distinct_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_naming_the_place_and_loses_nothing(case, stored_run, tmp_path):
    db = stored_run / "runs" / RUN_ID / "results.sqlite"
    manifest = (stored_run / "runs" / RUN_ID / "manifest.json").read_text()
    before = stored_answers(db)
    code, err = run_cli(case_argv(case, tmp_path), stored_run / "runs", stored_run / "reports", tmp_path)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert case.where in lines[0], lines[0]
    assert stored_answers(db) == before
    assert (stored_run / "runs" / RUN_ID / "manifest.json").read_text() == manifest
    assert not (tmp_path / "runs").exists()  # nothing was written elsewhere either


def test_stored_run_still_reports_after_all_bad_reruns(stored_run, tmp_path):
    code, err = run_cli(["report", RUN_ID], stored_run / "runs", stored_run / "reports", tmp_path)
    assert code == 0, err


def test_docs_list_every_case():
    docs = (REPO / "docs/runner.md").read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"| {c.id} |" not in docs]
    assert not missing, f"docs/runner.md lacks {missing}; regenerate with `python tests/test_bad_inputs.py`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(root: Path) -> str:
    """Every case's message, paths of the scratch folder left out."""
    stored = root / "stored"
    stored.mkdir(parents=True, exist_ok=True)
    rows = ["| case | input | message |", "|---|---|---|"]
    for case in CASES:
        folder = root / case.id
        code, err = run_cli(case_argv(case, folder), stored / "runs", stored / "reports", folder)
        message = re.sub(re.escape(str(folder)) + "/?", "", err.strip()).replace(str(stored), "")
        message = message.replace(str(REPO), "<repo>")
        shown = " ".join(case.args) if case.args else case.body
        shown = json.dumps(shown) if not isinstance(shown, str) else shown.replace("\n", "\\n")
        rows.append(f"| {case.id} | `{_cell(shown)}` | {_cell(message)} (exit {code}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        print(markdown_table(Path(scratch)))
