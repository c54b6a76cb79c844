"""LiveBench code_generation / code_completion (releases from 2025-04-25): BigCodeBench-style unittest suites run
in the real bubblewrap sandbox, on made-up rows in the livebench/coding schema loaded through tasks/livebench.yaml."""
import dataclasses
import datetime as dt
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Features, Sequence, Value

from flageval_lite.errors import UserError
from flageval_lite.records import BAD_ITEM, Record
from flageval_lite.scoring import get_scorer
from flageval_lite.scoring.apply import score_record
from flageval_lite.scoring.livebench_bigcode import UPSTREAM_LIBRARIES, full_program, suite_time_limit
from flageval_lite.tasks import iter_items, load_task

_builder = importlib.util.spec_from_file_location("build_fixtures",
                                                  Path(__file__).parent / "fixtures/build_fixtures.py")
fixtures = importlib.util.module_from_spec(_builder)
_builder.loader.exec_module(fixtures)

REPO = Path(__file__).resolve().parents[1]
livebench = get_scorer("livebench")
RELEASE = "2025-04-25"

MEAN_PROMPT = "import numpy as np\ndef task_func(values):\n"
MEAN_TESTS = '''import unittest
class TestCases(unittest.TestCase):
    def test_mean(self):
        self.assertAlmostEqual(task_func([1, 2, 3, 6]), 3.0)
    def test_empty(self):
        """An empty list has mean 0."""
        self.assertEqual(task_func([]), 0.0)
    def test_type(self):
        self.assertIsInstance(task_func([2]), float)
'''
MEAN_SOLUTION = MEAN_PROMPT + "    if not values:\n        return 0.0\n    return float(np.mean(values))"

# docxtpl is in LiveBench's scoring environment (requirements_eval.txt) and not in ours
LETTER_PROMPT = "from docxtpl import DocxTemplate\ndef task_func(template_path, name):\n"
LETTER_TESTS = '''import unittest
from unittest import mock
class TestCases(unittest.TestCase):
    def test_renders_the_name(self):
        with mock.patch("__test__.DocxTemplate") as template:
            task_func("letter.docx", "Ada")
            template.return_value.render.assert_called_once_with({"name": "Ada"})
'''
LETTER_SOLUTION = LETTER_PROMPT + ("    doc = DocxTemplate(template_path)\n    doc.render({'name': name})\n"
                                   "    doc.save('out.docx')\n    return 'out.docx'")

WORDS_PROMPT = "import collections\ndef task_func(text):\n"
WORDS_SOLUTION = WORDS_PROMPT + ("    words = text.lower().split()\n    counts = collections.Counter(words)\n"
                                 "    return counts.most_common(1)[0][0] if counts else None")
WORDS_PARTIAL = WORDS_PROMPT + "    words = text.lower().split()"
WORDS_TESTS = '''import unittest
class TestCases(unittest.TestCase):
    def test_most_common(self):
        self.assertEqual(task_func("a b B c b"), "b")
    def test_empty(self):
        self.assertIsNone(task_func(""))
'''


def _day(text):
    return dt.datetime.strptime(text, "%Y-%m-%d")


def _row(qid, task, title, prompt, tests, solution, code_prompt, expected_time, partial=None):
    """A livebench/coding row of the 2025-04-25 release: the LiveCodeBench columns empty, the BigCodeBench ones
    (tests, code_prompt, entry_point, expected_time) set; a completion row also has partial_solution/remainder."""
    return {"question_id": qid, "category": "coding", "task": task, "turns": [prompt], "question_title": title,
            "ground_truth": solution, "tests": tests, "code_prompt": code_prompt, "entry_point": "task_func",
            "expected_time": expected_time, "partial_solution": partial,
            "remainder": solution[len(partial) + 1:] if partial else None,
            "public_test_cases": None, "private_test_cases": None, "original_json": None, "solution": None,
            "release_date": None, "citation": "invented for flageval-lite",
            "livebench_release_date": _day(RELEASE), "livebench_removal_date": ""}


ROWS = [
    _row("bc01", "code_generation", "Mean", "Write task_func(values): the mean of a list, 0.0 when empty.",
         MEAN_TESTS, MEAN_SOLUTION, MEAN_PROMPT, 0.0),
    _row("bc02", "code_generation", "Letter", "Write task_func(template_path, name): fill a docx template.",
         LETTER_TESTS, LETTER_SOLUTION, LETTER_PROMPT, 0.5),
    _row("bc03", "code_completion", "Top Word", "Finish task_func(text): the most common word, or None.",
         WORDS_TESTS, WORDS_SOLUTION, WORDS_PROMPT, 0.0, partial=WORDS_PARTIAL),
]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    text = Value("string")
    features = Features({
        "question_id": text, "category": text, "task": text, "turns": Sequence(text), "question_title": text,
        "ground_truth": text, "tests": text, "code_prompt": text, "entry_point": text,
        "expected_time": Value("float64"), "partial_solution": text, "remainder": text,
        "public_test_cases": text, "private_test_cases": text,
        "original_json": {"question_title": text, "metadata": text}, "solution": text,
        "release_date": Value("timestamp[s]"), "citation": text,
        "livebench_release_date": Value("timestamp[s]"), "livebench_removal_date": text})
    saved, fixtures.HUB = fixtures.HUB, root
    try:
        fixtures.write_parquet_repo("livebench/coding", features, {"default": {"test": ROWS}},
                                    folder={"default": "data"})
    finally:
        fixtures.HUB = saved
    spec = load_task("livebench")
    spec = dataclasses.replace(
        spec, sources=tuple(s for s in spec.sources if s.hub == "livebench/coding"),
        where=f"livebench_live(livebench_release_date, livebench_removal_date, '{RELEASE}')")
    return {item.item_id: item for item in iter_items(spec, data_dir=str(root))}


def fenced(code: str) -> str:
    return f"Here is the code:\n```python\n{code}\n```\nDone."


def scored(item, reply):
    record = Record(run_id="r", role="reference", endpoint_id="e", task="livebench", item_id=item.item_id,
                    prompt_hash="h", params={}, response_text=reply)
    return score_record(record, {"gold": item.gold, "meta": item.meta}, livebench, {})


def test_the_task_carries_what_the_suites_need(items):
    assert sorted(items) == ["bc01", "bc02", "bc03"]
    meta = items["bc03"].meta
    assert (meta["tests"], meta["entry_point"], meta["code_prompt"]) == (WORDS_TESTS, "task_func", WORDS_PROMPT)
    assert (meta["partial_solution"], meta["expected_time"], meta["cell"]) == (WORDS_PARTIAL, 0.0,
                                                                                "coding/code_completion")


def test_a_correct_program_using_numpy_passes(items):
    result = livebench(fenced(MEAN_SOLUTION), items["bc01"].gold, items["bc01"].meta)
    assert result.value == 1.0
    assert result.detail == {"task": "code_generation", "verdict": "pass", "time_limit_s": 4.0, "tests": 3}


def test_the_code_prompt_goes_in_front_of_a_reply_without_the_entry_point(items):
    body = "    return float(np.mean(values)) if values else 0.0"
    assert livebench(fenced(body), None, items["bc01"].meta).value == 1.0


def test_a_wrong_program_fails_naming_the_failing_tests(items):
    result = scored(items["bc01"], fenced(MEAN_PROMPT + "    return float(np.median(values)) if values else 0"))
    assert (result.outcome, result.value) == ("wrong", 0.0)
    detail = livebench(fenced(MEAN_PROMPT + "    return sum(values) / len(values)"), None, items["bc01"].meta).detail
    assert (detail["verdict"], detail["failed_tests"]) == ("fail", ["test_empty"])
    assert "ZeroDivisionError" in detail["reason"]


def test_a_program_past_the_suite_limit_times_out(items):
    # expected_time 0: untrusted_check's limit is max(1, 0 + 3) + 1 = 4 s for the whole suite
    result = livebench(fenced(MEAN_PROMPT + "    while True:\n        pass"), None, items["bc01"].meta)
    assert (result.value, result.detail["verdict"]) == (0.0, "timeout")
    assert "Timed out" in result.detail["reason"]


def test_a_library_our_environment_lacks_is_an_error_of_that_item_not_a_zero(items):
    assert importlib.util.find_spec("docxtpl") is None and "docxtpl" in UPSTREAM_LIBRARIES
    score = scored(items["bc02"], fenced(LETTER_SOLUTION))
    assert (score.outcome, score.value) == ("error", 0.0)
    assert score.error.startswith("environment: docxtpl not installed in the scoring environment")
    assert livebench(fenced(LETTER_SOLUTION), None, items["bc02"].meta).detail["missing_library"] == ["docxtpl"]


def test_a_module_the_reply_made_up_is_the_answers_failure(items):
    reply = fenced("import meanutils_fast\n" + MEAN_SOLUTION)
    score = scored(items["bc01"], reply)
    assert (score.outcome, score.error) == ("wrong", "")
    assert "meanutils_fast" in livebench(reply, None, items["bc01"].meta).detail["reason"]


@pytest.mark.parametrize("reply,value", [
    (WORDS_SOLUTION[len(WORDS_PARTIAL) + 1:], 1.0),  # only the missing lines: the partial solution goes in front
    (WORDS_SOLUTION, 1.0),  # the whole program, starting with the partial solution: used as is
    ("    return words[0] if words else None", 0.0),
])
def test_completion_joins_the_partial_solution(items, reply, value):
    assert livebench(fenced(reply), None, items["bc03"].meta).value == value


def test_program_assembly_and_time_limits_follow_livebench():
    assert full_program("x = 1", "def f():", None, None) == "def f():\nx = 1"
    assert full_program("def f():\n    pass", "def f():", "f", "import os") == "def f():\n    pass"
    assert full_program("helper = 1", None, "f", "def f():") == "def f():\nhelper = 1"
    assert full_program("def f(): pass", None, "f", "import os") == "def f(): pass"
    assert (suite_time_limit(None), suite_time_limit(0.1), suite_time_limit(7)) == (21.0, 4.1, 11.0)
    with pytest.raises(UserError, match="expected_time"):
        suite_time_limit("soon")


def test_unusable_rows_and_agentic_coding_are_errors_of_their_item():
    base = {"task": "code_generation", "category": "coding", "tests": MEAN_TESTS}
    with pytest.raises(UserError, match="neither meta\\['entry_point'\\] nor"):
        livebench(fenced(MEAN_SOLUTION), None, base)
    item = dataclasses.make_dataclass("I", ["item_id", "gold", "meta"])
    agentic = scored(item("ag1", None, {"task": "agentic_coding", "category": "coding"}), "diff --git a/x b/x")
    assert agentic.outcome == "error"
    assert agentic.error.startswith(f"{BAD_ITEM}: livebench scorer: task agentic_coding (agentic coding) needs Docker")


def test_an_empty_reply_is_unparsed_without_running_anything(items):
    assert scored(items["bc01"], "").outcome == "unparsed"


def test_a_run_counts_and_shows_environment_errors_and_the_unscored_agentic_task(tmp_path):
    """Through the command line with stub servers that echo the prompt (on one line): each prompt is its reply."""
    def row(item_id, task, tests, reply):
        return {"id": item_id, "category": "coding", "task": task, "tests": tests, "entry_point": "task_func",
                "code_prompt": "", "expected_time": 0.0, "prompt": reply}
    rows = [
        row("ok", "code_generation", MEAN_TESTS,
            "task_func = lambda values: float(sum(values) / len(values)) if values else 0.0"),
        row("env", "code_generation", LETTER_TESTS, "from docxtpl import DocxTemplate; "
            "task_func = lambda template_path, name: DocxTemplate(template_path).render({'name': name})"),
        row("agent", "agentic_coding", None, "Fix the issue in the repository."),
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    fields = ("category", "task", "tests", "entry_point", "code_prompt", "expected_time")
    (tmp_path / "bc.yaml").write_text(yaml.safe_dump({
        "name": "bc", "title": "BC", "modality": "text", "dataset": {"path": "rows.jsonl"}, "id_field": "id",
        "prompt": "{{ prompt }}", "gold": "None", "scorer": "livebench", "metric": "livebench", "group_by": "cell",
        "meta": {**{f: f"row['{f}']" for f in fields}, "cell": "category ~ '/' ~ task"}}))
    stub = {"engine": "stub", "served_model_name": "stub", "warmup": False}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"reference": {"name": "ref", **stub}, "candidate": {"name": "cand", **stub},
                                      "tasks": [str(tmp_path / "bc.yaml")], "max_error_rate": 0.9}))
    done = subprocess.run([sys.executable, "-m", "flageval_lite.cli", "run", "--config", str(config), "--run-id", "b",
                           "--quiet", "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    manifest = json.loads((tmp_path / "runs/b/manifest.json").read_text())
    assert manifest["errors"] == {f"{role}/bc/{kind}": 1 for role in ("reference", "candidate")
                                  for kind in ("environment", "bad_item")}
    [row] = json.loads((tmp_path / "reports/b/summary.json").read_text())["comparison"]["tasks"]
    assert (row["n"], row["errors_reference"], row["reference_score"]) == (1, 2, 100.0)
    assert row["unscored_groups"] == ["coding/agentic_coding"]
    report = (tmp_path / "reports/b/report.md").read_text()
    assert "reference/bc/environment ×1" in report
    assert "Not LiveBench's official average: coding/agentic_coding went unscored" in report
