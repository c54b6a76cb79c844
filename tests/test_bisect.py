"""Bisection: the search against simulated candidates, and `bisect RUN` end to end against stand-in servers."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Union

import pytest

from flageval_lite.diagnose.bisect import (STATE_NAME, askable_tasks, bisect_command, bisect_run, check_bisectable,
                                           disagreements, load_items, spec_from_stored)
from flageval_lite.diagnose.rounds import restrict, root_cause_lines
from flageval_lite.diagnose.search import CRASH_RUN, CRASH_START, ERRORS, STRATEGIES, chunks, find_culprits, halves
from flageval_lite.errors import UserError
from flageval_lite.pipeline import spec_identity, task_params
from flageval_lite.records import FlagGemsSpec, Record, Score, ServeSpec
from flageval_lite.report.facts import _diagnosis_facts
from flageval_lite.runner.jobs import Job
from flageval_lite.runner.runner import Runner
from flageval_lite.runner.store import Store
from flageval_lite.scoring.apply import score_run
from flageval_lite.serving.engines import Launch, build_launch
from flageval_lite.serving.lifecycle import ManagedServer
from flageval_lite.serving.processes import spawn
from flageval_lite.tasks import iter_items, load_task

STANDIN = str(Path(__file__).parent / "bisect_standin.py")
OPS = [f"op{i:02d}" for i in range(64)]


# --------------------------------------------------------------------------- the search on a simulated candidate


class Simulated:
    """A candidate that diverges when any culprit group is wholly enabled; counts restarts.  `crashes` maps an
    outcome to the groups that cause it; a group's "!op" must be off (a crash that only some subsets show)."""

    def __init__(self, *groups: set[str], crashes: Optional[dict[str, list[set[str]]]] = None):
        self.groups = [set(g) for g in groups]
        self.crashes = crashes or {}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, ops: tuple[str, ...]) -> Union[bool, str]:
        assert ops, "the empty set is never started"
        self.calls.append(ops)
        for outcome, groups in self.crashes.items():  # a crashed server gives no answers to compare
            for group in groups:
                on, off = {op for op in group if op[0] != "!"}, {op[1:] for op in group if op[0] == "!"}
                if on <= set(ops) and not off & set(ops):
                    return outcome
        return any(group <= set(ops) for group in self.groups)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [8, 26, 64])
def test_single_culprit_found_within_log2_plus_two_restarts(n: int, strategy: str) -> None:
    universe = OPS[:n]
    bound = math.ceil(math.log2(n)) + 2
    worst = 0
    for culprit in universe:
        simulated = Simulated({culprit})
        result = find_culprits(universe, simulated, strategy=strategy)
        assert result.culprits == (culprit,) and result.reproduced and result.minimal and result.complete
        assert len(result.rounds) == len(simulated.calls) <= bound
        worst = max(worst, len(result.rounds))
    assert worst == bound  # the bound is tight: some position needs the confirming restart


@pytest.mark.parametrize("n, pair", [(8, ("op00", "op07")), (8, ("op01", "op02")), (26, ("op03", "op20")),
                                     (26, ("op24", "op25")), (64, ("op10", "op50"))])
def test_ddmin_variant_finds_two_interacting_operators(n: int, pair: tuple[str, str]) -> None:
    simulated = Simulated(set(pair))
    result = find_culprits(OPS[:n], simulated, strategy="ddmin")
    assert result.culprits == pair and result.minimal and result.complete
    assert any(r.phase.startswith("ddmin") for r in result.rounds)  # halving alone cannot split a pair
    assert len(set(simulated.calls)) == len(simulated.calls)  # no subset is started twice


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_interacting_pair_among_eight(strategy: str) -> None:
    for pair in itertools.combinations(OPS[:8], 2):
        assert find_culprits(OPS[:8], Simulated(set(pair)), strategy=strategy).culprits == pair


@pytest.mark.parametrize("n", [8, 26, 64])
def test_binary_search_costs_about_log2_per_interacting_operator(n: int) -> None:
    bound = 2 * (math.ceil(math.log2(n)) + 1) + 1
    for pair in itertools.combinations(OPS[:n:max(1, n // 8)], 2):
        result = find_culprits(OPS[:n], Simulated(set(pair)))
        assert result.culprits == pair and len(result.rounds) <= bound


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_three_way_interaction_and_alternative_culprits(strategy: str) -> None:
    triple = ("op02", "op09", "op17")
    assert find_culprits(OPS[:20], Simulated(set(triple)), strategy=strategy).culprits == triple
    either = find_culprits(OPS[:16], Simulated({"op03"}, {"op12"}), strategy=strategy)  # two causes: one is named
    assert either.culprits in (("op03",), ("op12",)) and either.minimal


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_search_is_deterministic(strategy: str) -> None:
    runs = [find_culprits(OPS[:26], Simulated({"op04", "op19"}), strategy=strategy) for _ in range(2)]
    assert [[(r.phase, r.ops, r.outcome) for r in run.rounds] for run in runs][0] == \
        [(r.phase, r.ops, r.outcome) for r in runs[1].rounds]
    for r in runs[0].rounds:  # subsets reach the evaluator in the universe's order
        assert list(r.ops) == sorted(r.ops)


def test_divergence_that_does_not_reproduce_stops_after_one_restart() -> None:
    result = find_culprits(OPS[:8], Simulated())
    assert not result.reproduced and result.culprits == () and len(result.rounds) == 1
    assert result.rounds[0].phase == "all operators" and result.rounds[0].ops == tuple(OPS[:8])


def test_round_budget_returns_the_smallest_set_seen() -> None:
    result = find_culprits(OPS[:64], Simulated({"op40", "op41"}), max_rounds=3)
    assert not result.complete and not result.minimal and len(result.rounds) == 3
    assert {"op40", "op41"} <= set(result.culprits) and len(result.culprits) < 64
    with pytest.raises(ValueError, match="unknown strategy"):
        find_culprits(OPS[:4], Simulated(), strategy="random")


def test_without_verification_the_full_set_is_assumed() -> None:
    simulated = Simulated({"op05"})
    result = find_culprits(OPS[:8], simulated, verify_full=False)
    assert result.culprits == ("op05",) and tuple(OPS[:8]) not in simulated.calls
    assert len(result.rounds) <= math.ceil(math.log2(8)) + 1


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", [CRASH_START, CRASH_RUN, ERRORS])
def test_a_crashing_operator_does_not_hide_the_culprit(strategy: str, kind: str) -> None:
    """Every position of the culprit and of an operator that crashes the candidate, also one that crashes only
    while another operator is off (the full set answers, as the stored run did): both are named, each by kind."""
    universe = OPS[:12]
    seen = 0
    for culprit, crasher in itertools.permutations(universe[::2], 2):
        for group in ({crasher}, {crasher, f"!{universe[-1]}"}):
            simulated = Simulated({culprit}, crashes={kind: [group]})
            # A crash of the full set would have stopped the stored run: that candidate's run is assumed.
            result = find_culprits(universe, simulated, strategy=strategy, verify_full=len(group) > 1)
            assert result.culprits == (culprit,) and result.complete and result.minimal, (culprit, group)
            assert len(set(simulated.calls)) == len(simulated.calls)
            assert len(result.rounds) <= 2 * (math.ceil(math.log2(len(universe))) + 2) + 1
            if any(r.outcome == kind for r in result.rounds):  # a crash no restart ran into cannot be named
                seen += 1
                assert result.of_class("crashes") == (crasher,), (culprit, group)
                assert [c.outcome for c in result.causes if c.ops == (crasher,)] == [kind]
                assert crasher in result.in_every_round()[kind]
    assert seen >= 20


def test_a_full_set_that_crashes_is_not_blamed_on_an_operator() -> None:
    result = find_culprits(OPS[:8], Simulated({"op01"}, crashes={CRASH_START: [{"op00"}]}))
    assert not result.reproduced and result.causes == [] and len(result.rounds) == 1
    assert result.rounds[0].outcome == CRASH_START


def test_a_search_resumed_from_its_finished_rounds_asks_only_the_rest() -> None:
    full = find_culprits(OPS[:26], Simulated({"op04", "op19"}, crashes={ERRORS: [{"op11"}]}))
    for cut in range(len(full.rounds) + 1):
        simulated = Simulated({"op04", "op19"}, crashes={ERRORS: [{"op11"}]})
        resumed = find_culprits(OPS[:26], simulated, finished=full.rounds[:cut])
        assert [(r.phase, r.ops, r.outcome) for r in resumed.rounds] == [(r.phase, r.ops, r.outcome)
                                                                         for r in full.rounds]
        assert simulated.calls == [r.ops for r in full.rounds[cut:]] and resumed.causes == full.causes


def test_splitting_helpers() -> None:
    assert halves(["a", "b", "c"]) == (("a", "b"), ("c",))
    assert chunks(list("abcdefg"), 3) == [("a", "b"), ("c", "d", "e"), ("f", "g")]
    assert chunks(list("ab"), 4) == [("a",), ("b",)]
    with pytest.raises(ValueError):
        find_culprits([], Simulated())


# --------------------------------------------------------------------------- stored-run helpers


def test_spec_round_trip_and_restriction() -> None:
    spec = ServeSpec(name="cand", engine="vllm", model="/m", flaggems=FlagGemsSpec(route="plugin", exclude=("cat",)),
                     args=("--enforce-eager",), env=(("A", "1"),), ops="flaggems")
    stored = json.loads(json.dumps(spec.to_dict()))
    assert spec_from_stored(stored) == spec
    narrowed = restrict(spec, ["mm", "softmax"])
    assert narrowed.flaggems.include == ("mm", "softmax") and narrowed.args == spec.args and narrowed.env == spec.env


@pytest.mark.parametrize("route, engine, message", [("off", "vllm", "runs without FlagGems"),
                                                     ("flagscale", "flagscale", "cannot be limited"),
                                                     ("plugin", "external", "external endpoint")])
def test_candidates_that_cannot_be_bisected(route: str, engine: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_bisectable(ServeSpec(name="c", engine=engine, flaggems=FlagGemsSpec(route=route)))


def _record(role: str, item_id: str, text: str, error: str = "") -> Record:
    return Record(run_id="r", role=role, endpoint_id=role, task="t", item_id=item_id, prompt_hash="h",
                  params={"temperature": 0.0}, response_text=text, error=error)


def _score(role: str, item_id: str, extracted: str, outcome: str = "wrong") -> Score:
    return Score(role=role, task="t", item_id=item_id, value=0.0, outcome=outcome, extracted=extracted)


def test_disagreements_by_text_and_by_answer(tmp_path: Path) -> None:
    store = Store(tmp_path / "results.sqlite")
    for role, texts in {"reference": ["A.", "B.", "C.", "D."], "candidate": ["A.", "B!", "X.", ""]}.items():
        for k, text in enumerate(texts):
            store.put_record(_record(role, f"i{k}", text, error="boom" if role == "candidate" and k == 3 else ""))
    store.put_scores("r", [_score(role, f"i{k}", answer) for role, answers in
                           {"reference": "ABC", "candidate": "ABX"}.items() for k, answer in enumerate(answers)])
    by_text = disagreements(store, "r", "text")
    assert [(d.item_id, d.reference, d.candidate) for d in by_text] == [("i1", "B.", "B!"), ("i2", "C.", "X.")]
    assert [d.item_id for d in disagreements(store, "r", "answer")] == ["i2"]  # i1 differs in text only
    assert disagreements(store, "r", "text", tasks=["other"]) == []
    with pytest.raises(UserError, match="--by must be one of"):
        disagreements(store, "r", "logits")
    store.close()
    assert askable_tasks({"demo_facts", "lmeval:gsm8k", "t"}) == {"demo_facts"}  # only native task specs


# --------------------------------------------------------------------------- end to end against stand-in servers


def standin_launch(spec: ServeSpec, role: str, run_dir: Optional[Path], port: int) -> Launch:
    """Our real vLLM command line and environment for the spec, with `vllm` replaced by the stand-in."""
    launch = build_launch(spec, role, run_dir, port)
    assert launch.argv[1:3] == ["-m", "vllm.entrypoints.cli.main"]
    return dataclasses.replace(launch, argv=[sys.executable, STANDIN, *launch.argv[3:]])


def standin_server(spec: ServeSpec, role: str, run_dir: Path) -> ManagedServer:
    return ManagedServer(spec, role, run_dir, launcher=standin_launch, poll_interval_s=0.05)


def standin_spec(route: str, ops: list[str], culprits: str, **failures: str) -> ServeSpec:
    """`failures`: STANDIN_CRASH_START / _CRASH_RUN / _ERRORS groups, as crash_start="a+!b" and so on."""
    env = [("STANDIN_OPS", ",".join(ops)), ("STANDIN_CULPRITS", culprits)]
    env += [(f"STANDIN_{name.upper()}", groups) for name, groups in failures.items()]
    return ServeSpec(name=f"standin-{route}", engine="vllm", model="/models/standin", served_model_name="standin",
                     ops="aten" if route == "off" else "flaggems", flaggems=FlagGemsSpec(route=route),
                     env=tuple(env), warmup=False, startup_timeout_s=30.0, max_restarts=0)


def make_run(runs: Path, run_id: str, ops: list[str], culprits: str, limit: int = 8, task: str = "demo_facts",
             **failures: str) -> Path:
    """A stored run made the way the pipeline makes one: both servers asked the task, answers scored."""
    run_dir = runs / run_id
    store = Store(run_dir / "results.sqlite")
    task = load_task(task)
    specs = {"reference": standin_spec("off", ops, culprits, **failures),
             "candidate": standin_spec("plugin", ops, culprits, **failures)}
    store.set_meta("config", {"run_id": run_id, "tasks": [task.name], "limit": limit, "concurrency": 4, "source": ""})
    store.set_meta("specs", {role: spec.to_dict() for role, spec in specs.items()})
    store.set_meta("task_specs", {task.name: {"title": task.title, "scorer": task.scorer,
                                              "scorer_args": dict(task.scorer_args or {}), "metric": task.metric,
                                              "group_by": task.group_by or ""}})
    runner = Runner(store, run_id, concurrency=4, progress=False)
    servers = {}
    for role, spec in specs.items():
        with standin_server(spec, role, run_dir) as server:
            endpoint = dataclasses.replace(server.endpoint, spec_id=spec_identity(spec))
            asyncio.run(runner.run_jobs([Job(endpoint, task.name, list(iter_items(task, limit=limit)),
                                             task_params(task))]))
            servers[role] = server.evidence.to_dict()
    store.set_meta("servers", servers)
    score_run(store, run_id)
    store.close()
    return run_dir


def test_bisect_run_names_the_culprit_against_standin_servers(tmp_path: Path, capsys) -> None:
    ops = ["cat", "embedding", "index", "mm", "rsqrt", "silu", "softmax", "to_copy"]
    run_dir = make_run(tmp_path / "runs", "r1", ops, culprits="mm")
    code = bisect_command("r1", tmp_path / "runs", tmp_path / "reports", start_server=standin_server, quiet=True)
    assert code == 0
    assert "culprit: mm" in capsys.readouterr().out

    summary = json.loads((tmp_path / "reports" / "r1" / "bisect.json").read_text())
    assert summary["culprits"] == ["mm"] and summary["universe"] == sorted(ops)
    assert summary["ops_source"] == "calls log"  # registration names from the candidate's calls-<pid>.jsonl
    assert len(summary["rounds"]) <= math.ceil(math.log2(len(ops))) + 2
    assert 0 < len(summary["items"]) == summary["disagreeing_items"] < 8
    # Every restart: logged with its operator set; the server really ran with exactly that set (its op log).
    lines = [json.loads(line) for line in (run_dir / "bisect.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == list(range(1, len(summary["rounds"]) + 1))
    for line in lines:
        assert sorted(line["ops_called"]) == sorted(line["ops"])
        assert line["outcome"] == ("diverges" if "mm" in line["ops"] else "agrees")
        assert ("mm" in line["ops"]) == bool(line["items_diverged"])
        assert line["role"] == f"bisect-{line['round']}" and (run_dir / "logs" / f"{line['role']}.log").is_file()
    report = (tmp_path / "reports" / "r1" / "bisect.md").read_text()
    assert "**culprit: mm" in report and "| 1 | all operators |" in report
    meta = Store(run_dir / "results.sqlite").get_meta("bisect")
    assert meta["culprits"] == ["mm"] and meta["rounds"] == len(lines) and meta["complete"]
    # What `report RUN` shows once the manifest carries the run's `bisect` meta.
    (fact,) = _diagnosis_facts({"bisect": meta})
    assert fact == ("FlagGems bisection", f"mm ({len(lines)} restarts over 8 operators); {meta['report']}")


STANDIN_OPS = ["cat", "embedding", "fill_scalar_", "index", "mm", "mul", "rsqrt", "softmax"]


@pytest.mark.parametrize("failure, outcome, cause", [
    ("crash_start", CRASH_START, "illegal memory access"),
    ("crash_run", CRASH_RUN, "EngineDeadError"),
    ("errors", ERRORS, "Out of range float values are not JSON compliant")])
def test_bisect_goes_on_past_a_candidate_that_crashes(tmp_path: Path, failure: str, outcome: str, cause: str) -> None:
    """As FlagGems' fill_scalar_ under vLLM: the run with all operators answered, a subset without softmax
    crashes.  The search names that crash with its kind and root cause, and still names the culprit, mul."""
    run_dir = make_run(tmp_path / "runs", "r7", STANDIN_OPS, culprits="mul", limit=4,
                       **{failure: "fill_scalar_+!softmax"})
    summary = bisect_run("r7", tmp_path / "runs", tmp_path / "reports", start_server=standin_server, quiet=True)
    assert summary["culprits"] == ["mul"] and summary["complete"] and summary["minimal"]
    assert summary["culprits_by_kind"] == {"diverges": ["mul"], "crashes": ["fill_scalar_"]}
    assert [(c["outcome"], c["ops"]) for c in summary["causes"]] == [(outcome, ["fill_scalar_"]), ("diverges", ["mul"])]
    failed = [r for r in summary["rounds"] if r["outcome"] == outcome]
    assert failed and all("fill_scalar_" in r["ops"] and "softmax" not in r["ops"] for r in failed)
    for r in failed:  # root cause from this restart's own log, bounded
        assert any(cause in line for line in r["detail"]["root_cause"]) and len(r["detail"]["root_cause"]) <= 8
    assert summary["ops_in_every_failing_round"][outcome] == ["fill_scalar_"]
    # Every restart used one Triton cache, in the run's directory.
    assert summary["triton_cache"] == str((run_dir / "triton-cache").resolve())
    report = (tmp_path / "reports" / "r7" / "bisect.md").read_text()
    assert f"**culprit: mul; crashes: fill_scalar_ ({outcome})" in report and cause in report
    assert "culprits per kind: diverges: mul; crashes: fill_scalar_" in report
    meta = Store(run_dir / "results.sqlite").get_meta("bisect")
    (fact,) = _diagnosis_facts({"bisect": meta})
    assert fact[1].startswith("mul; crashes: fill_scalar_")


RESUMABLE = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_bisect import standin_server
from flageval_lite.diagnose.bisect import bisect_command
sys.exit(bisect_command("r8", Path({runs!r}), Path({reports!r}), start_server=standin_server, resume=True, quiet=True))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_killed_bisection_resumes_without_repeating_a_finished_restart(tmp_path: Path, sig: int) -> None:
    """SIGTERM or SIGINT mid-restart, as `timeout` before a device call's limit sends: the candidate's process
    group is stopped, the finished restarts are kept, and `--resume` ends with the uninterrupted search's result."""
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    run_dir = make_run(runs, "r8", STANDIN_OPS, culprits="mul", limit=4, crash_start="fill_scalar_+!softmax")
    shutil.copytree(run_dir, tmp_path / "fresh" / "r8")
    fresh = bisect_run("r8", tmp_path / "fresh", reports, start_server=standin_server, quiet=True)

    script = RESUMABLE.format(tests=str(Path(__file__).parent), runs=str(runs), reports=str(reports))
    env = {**os.environ, "STANDIN_STARTUP_DELAY": "1"}  # slow starts: the signal lands inside a restart
    proc = spawn([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_path = run_dir / STATE_NAME
    deadline = time.monotonic() + 60
    while not (state_path.is_file() and len(json.loads(state_path.read_text())["rounds"]) >= 3
               and list((run_dir / "oplogs" / "bisect-4").glob("calls-*.jsonl"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    (calls,) = (run_dir / "oplogs" / "bisect-4").glob("calls-*.jsonl")
    candidate_pid = int(calls.stem.split("-")[1])
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == (128 + sig if sig == signal.SIGTERM else -sig)  # SystemExit, KeyboardInterrupt
    time.sleep(0.5)
    assert not _alive(candidate_pid)  # stopped with its process group, not left holding the GPU
    kept = json.loads(state_path.read_text())["rounds"]
    assert len(kept) == 3

    started: list[tuple[str, ...]] = []

    def counting(spec: ServeSpec, role: str, run_dir: Path) -> ManagedServer:
        started.append(spec.flaggems.include)
        return standin_server(spec, role, run_dir)

    resumed = bisect_run("r8", runs, reports, start_server=counting, resume=True, quiet=True)
    same = ("culprits", "culprits_by_kind", "causes", "reproduced", "minimal", "complete")
    assert {k: resumed[k] for k in same} == {k: fresh[k] for k in same}
    assert [(r["phase"], r["ops"], r["outcome"]) for r in resumed["rounds"]] == [
        (r["phase"], r["ops"], r["outcome"]) for r in fresh["rounds"]]
    assert [list(ops) for ops in started] == [r["ops"] for r in resumed["rounds"][3:]]  # none of the 3 again
    assert resumed["rounds_resumed"] == 3 and resumed["bisect_run_id"] == json.loads(
        state_path.read_text())["bisect_run_id"]
    logged = [json.loads(line) for line in (run_dir / "bisect.jsonl").read_text().splitlines()]
    assert [line["round"] for line in logged] == list(range(1, len(fresh["rounds"]) + 1))
    assert "3 restart(s) kept from an earlier, interrupted call" in (reports / "r8" / "bisect.md").read_text()
    # Another search over the same run must say so to be resumed from this state.
    with pytest.raises(UserError, match="holds a search with strategy 'binary', not 'ddmin'"):
        bisect_run("r8", runs, reports, start_server=standin_server, resume=True, strategy="ddmin", quiet=True)


def test_a_candidate_failing_with_all_operators_stops_the_search(tmp_path: Path, monkeypatch) -> None:
    """The stored run answered with all operators: a restart with all of them that is not ready within
    --startup-timeout says the machine differs, and no operator is blamed."""
    make_run(tmp_path / "runs", "r9", ["mm", "cat"], culprits="mm", limit=4)
    monkeypatch.setenv("STANDIN_STARTUP_DELAY", "30")
    summary = bisect_run("r9", tmp_path / "runs", tmp_path / "reports", start_server=standin_server,
                         startup_timeout_s=0.5, quiet=True)
    assert not summary["reproduced"] and summary["causes"] == [] and summary["culprits"] == []
    (first,) = summary["rounds"]
    assert first["outcome"] == CRASH_START and "did not become ready within 0.5 s" in first["detail"]["error"]
    assert "failed (crash at start) although the stored run answered" in (
        tmp_path / "reports" / "r9" / "bisect.md").read_text()


def test_root_cause_lines_are_bounded_and_from_this_start(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("RuntimeError: an earlier start\n")
    offset = log.stat().st_size
    with open(log, "a") as fh:
        fh.write("=== flageval-lite: starting\nINFO loading\n" + "".join(f"ValueError: {i} {'x' * 400}\n"
                                                                        for i in range(20)) + "INFO shutting down\n")
    lines = root_cause_lines(log, offset)
    assert len(lines) == 8 and lines[-1].startswith("ValueError: 19") and all(len(x) <= 300 for x in lines)
    (tmp_path / "quiet.log").write_text("INFO one\nINFO two\n")
    assert root_cause_lines(tmp_path / "quiet.log") == ["INFO one", "INFO two"]  # nothing matched: the last lines
    assert root_cause_lines(tmp_path / "missing.log") == []


def test_bisect_run_finds_an_interaction_and_honours_max_items(tmp_path: Path) -> None:
    ops = ["add", "cat", "exp", "mm", "mul", "softmax"]
    make_run(tmp_path / "runs", "r2", ops, culprits="cat+softmax")
    summary = bisect_run("r2", tmp_path / "runs", tmp_path / "reports", start_server=standin_server, quiet=True,
                         max_items=1)
    assert summary["culprits"] == ["cat", "softmax"] and summary["minimal"]
    assert len(summary["items"]) == 1 < summary["disagreeing_items"]
    assert len(summary["rounds"]) <= 2 * (math.ceil(math.log2(len(ops))) + 1) + 1


def test_bisect_by_extracted_answer(tmp_path: Path) -> None:
    ops = ["cat", "mm", "softmax"]
    make_run(tmp_path / "runs", "r5", ops, culprits="softmax", limit=16, task="demo_arith")
    by_text = disagreements(Store(tmp_path / "runs" / "r5" / "results.sqlite"), "r5", "text")
    summary = bisect_run("r5", tmp_path / "runs", tmp_path / "reports", by="answer", strategy="ddmin",
                         start_server=standin_server, quiet=True)
    assert summary["culprits"] == ["softmax"] and summary["by"] == "answer" and summary["strategy"] == "ddmin"
    assert 0 < len(summary["items"]) < len(by_text)  # some items differ in punctuation only
    assert "extracted answer differed" in (tmp_path / "reports" / "r5" / "bisect.md").read_text()


def test_bisect_refuses_a_run_without_disagreements(tmp_path: Path) -> None:
    make_run(tmp_path / "runs", "r3", ["mm", "cat"], culprits="", limit=3)
    with pytest.raises(UserError, match="nothing to bisect"):
        bisect_run("r3", tmp_path / "runs", tmp_path / "reports", start_server=standin_server, quiet=True)


def test_items_must_be_greedy_and_unchanged(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "runs", "r4", ["mm"], culprits="mm", limit=4)
    store = Store(run_dir / "results.sqlite")
    found = disagreements(store, "r4")
    items, params = load_items(store, "r4", found)
    assert [i.item_id for i in items["demo_facts"]] == [d.item_id for d in found]
    assert params["demo_facts"].temperature == 0 and params["demo_facts"].logprobs
    db = store._db  # what an edited dataset or a sampled run would have left in the store
    db.execute("UPDATE records SET prompt_hash = 'changed' WHERE role = 'reference' AND item_id = ?",
               (found[0].item_id,))
    with pytest.raises(UserError, match=f"item {found[0].item_id}: its prompt changed"):
        load_items(store, "r4", found)
    db.execute("UPDATE records SET params = ? WHERE role = 'reference'",
               (json.dumps({**dataclasses.asdict(params["demo_facts"]), "temperature": 0.7}),))
    with pytest.raises(UserError, match="temperature 0.7"):
        load_items(store, "r4", found)
    store.close()


# --------------------------------------------------------------------------- the GPU script's CPU-side parts


def _gpu_script():
    path = Path(__file__).parent.parent / "benchmarks" / "gpu" / "bisect_check.py"
    spec = importlib.util.spec_from_file_location("bisect_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_config_is_a_valid_run_config(tmp_path: Path) -> None:
    import yaml

    from flageval_lite.config.run import load_run_config

    script = _gpu_script()
    args = script.parse_args(["--out", str(tmp_path), "--perturb-op", "mm", "--include", "embedding, mm"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(script.run_config(args)))
    config = load_run_config(path)
    cand = config.candidate
    assert config.tasks == ("demo_facts",) and config.limit == 8 and config.placement == "concurrent"
    assert (config.reference.ops, config.reference.flaggems.route) == ("aten", "off")
    assert (cand.ops, cand.flaggems.route, cand.device, cand.dtype) == ("flaggems", "embedded", "cuda", "bfloat16")
    assert cand.flaggems.include == ("embedding", "mm")
    launch = build_launch(cand, "candidate", tmp_path / "run", 8000)
    assert launch.argv[launch.argv.index("--flaggems-include") + 1] == "embedding,mm"
    assert {k: launch.env[k] for k in ("FLAGEVAL_RECORD_SHAPES", "FLAGEVAL_PERTURB_OP", "FLAGEVAL_PERTURB_SCALE")} == {
        "FLAGEVAL_RECORD_SHAPES": "1", "FLAGEVAL_PERTURB_OP": "mm", "FLAGEVAL_PERTURB_SCALE": "0.05"}
    # Step 5 replays every recipe with the model's sizes.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"hidden_size": 128, "intermediate_size": 384,
                                                                 "vocab_size": 1000, "num_attention_heads": 4}))
    calls = script.recipe_calls(str(tmp_path / "model"))
    mm = next(c for c in calls if c.op == "mm")
    assert mm.args[0]["tensor"][1] == 128 and {c.source for c in calls} == {"model config"}


def test_gpu_script_judges_its_outcome() -> None:
    script = _gpu_script()
    found = {"reproduced": True, "culprits": ["mm"]}
    assert script.check_outcome(found, {"failed": ["mm"]}, "mm") == []
    assert script.check_outcome({"reproduced": True, "culprits": ["cat"]}, {"failed": []}, "mm") == [
        "bisect named ['cat'] instead of ['mm']", "ops did not flag mm (failed: [])"]
    assert script.check_outcome(found, {"error": "no GPU"}, "mm") == ["ops failed: no GPU"]
    assert script.check_outcome({"error": "nothing to bisect"}, {"failed": ["mm"]}, "mm") == [
        "bisect failed: nothing to bisect"]
