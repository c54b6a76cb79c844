"""Golden cases for the LiveBench scorers: one row per task rule, the refused categories, and coding run in the
real bubblewrap sandbox (LiveCodeBench stdin and call-based tests, completion, limits, sandbox faults)."""
import base64
import importlib.util
import json
import pickle
import zlib
from pathlib import Path

import pytest

from flageval_lite.errors import UserError
from flageval_lite.records import BAD_ITEM, Record
from flageval_lite.scoring import get_scorer
from flageval_lite.scoring.apply import score_record
from flageval_lite.scoring.livebench_coding import extract_code, livebench_coding
from flageval_lite.tasks import iter_items, load_task

_builder = importlib.util.spec_from_file_location("build_fixtures",
                                                  Path(__file__).parent / "fixtures/build_fixtures.py")
fixtures = importlib.util.module_from_spec(_builder)
_builder.loader.exec_module(fixtures)
HUB = str(fixtures.HUB)
lcb_private_tests = fixtures.lcb_private_tests

livebench = get_scorer("livebench")

NEW = "2024-11-25"
OLD = "2024-07-26"
AMC_QUESTION = (
    "What is 1+2? $\\textbf{(A) }1\\qquad\\textbf{(B) }2\\qquad\\textbf{(C) }3\\qquad\\textbf{(D) }4\\qquad"
    "\\textbf{(E) }5$ If you cannot determine the answer, guess; then write the letter five times."
)
JSON_TO_CSV = "Please convert the Input Table from JSON format to CSV format. Please respond only with the table."
V2_TO_MARKDOWN = "Source Format: csv\nTarget Format: markdown\nConvert the table."
CSV_TABLE = "name,age\nann,3\nbob,4"

# (meta, gold, reply, extracted, value, parsed)
CASES = [
    # reasoning
    ({"task": "web_of_lies_v2"}, "yes, no, unknown", "So: **yes**, **no**, **unknown**.", "yes, no, unknown", 1.0, True),
    ({"task": "web_of_lies_v2"}, "no, yes, yes", "<solution>no, yes, yes</solution>", "no, yes, yes", 1.0, True),
    ({"task": "web_of_lies_v2"}, "no, yes, yes", "I conclude yes, no, no. Actually no, yes, yes", "no, yes, yes", 1.0, True),
    ({"task": "web_of_lies_v2"}, "no, yes, yes", "\\boxed{no, yes, no}", "no, yes, no", 0.0, True),
    ({"task": "web_of_lies_v3"}, "yes,no,no", "<solution>yes,no,yes</solution>", "yes,no,yes", 1 / 3, True),
    ({"task": "web_of_lies_v3"}, "yes,no,no", "nothing useful", "", 0.0, False),
    ({"task": "zebra_puzzle", "livebench_release_date": NEW}, "red,3,dog", "<solution>red, 3, cat</solution>",
     "red, 3, cat", 1 / 3, True),
    ({"task": "zebra_puzzle", "livebench_release_date": NEW}, "red,3", "<solution>Red, position 3</solution>",
     "Red, position 3", 1.0, True),
    ({"task": "zebra_puzzle", "livebench_release_date": OLD}, "three", "It is ***3***", "3", 1.0, True),
    ({"task": "spatial"}, "tetrahedra", "The pieces are **two tetrahedra**", "two tetrahedra", 1.0, True),
    ({"task": "spatial"}, "3", "There are **three** of them", "three", 1.0, True),
    ({"task": "spatial"}, "triangle", "**circle square triangle pentagon hexagon**", "circle square triangle pentagon hexagon", 0.0, True),
    ({"task": "house_traversal"}, "alice bob", "Path: **alice** then **bob**", "bob", 1.0, True),
    ({"task": "theory_of_mind"}, "blue_container", "Answer: blue_container.", "blue_container", 1.0, True),
    ({"task": "logic_with_navigation"}, [3, -2], "<solution>(3, -2)</solution>", "(3, -2)", 1.0, True),
    ({"task": "sudoku"}, "1234", "<solution>12\n34</solution>", "1234", 1.0, True),
    # language
    ({"task": "connections", "livebench_release_date": NEW}, "a,b,c,d,e,f,g,h",
     "<solution>e, f, g, h, a, b, c, d</solution>", "e, f, g, h, a, b, c, d", 1.0, True),
    ({"task": "connections", "livebench_release_date": NEW}, "a,b,c,d,e,f,g,h",
     "<solution>a, b, c, e, d, f, g, h</solution>", "a, b, c, e, d, f, g, h", 0.0, True),
    ({"task": "connections", "livebench_release_date": OLD}, "a,b,c,d,e,f,g,h",
     "**a, b, c, d**\n**e, f, h, x**", "e, f, h, x", 0.5, True),
    ({"task": "typos"}, "The quick brown fox.", "Corrected: <solution>The quick brown fox.</solution>",
     "The quick brown fox.", 1.0, True),
    ({"task": "plot_unscrambling"}, "A happens. B happens. C happens.",
     "<PLOT_SUMMARY>B happens. A happens. C happens.</PLOT_SUMMARY>", "1 0 2", 1 / 3, True),
    # math
    ({"task": "math_comp", "subtask": "amc_12a_2023", "question_text": AMC_QUESTION}, "C", "So CCCCC", "C", 1.0, True),
    ({"task": "math_comp", "subtask": "amc_12a_2023", "question_text": AMC_QUESTION}, "C", "the sum is 3", "C", 1.0, True),
    ({"task": "math_comp", "subtask": "amc_12a_2023", "question_text": AMC_QUESTION}, "C", "\\boxed{B}", "B", 0.0, True),
    ({"task": "math_comp", "subtask": "aime_2024_I"}, "204", "thus the answer is 204", "thus the answer is 204", 1.0, True),
    ({"task": "olympiad", "subtask": "usamo_2023"}, "3,1,2,4", "Answer: 3, 2, 1, 4", "3,2,1,4", 0.5, True),
    ({"task": "olympiad", "subtask": "imo_2023"}, "3,1,2,4", "The order is\n\\boxed{3,1,2,4}", "3,1,2,4", 1.0, True),
    ({"task": "AMPS_Hard"}, "-\\frac{2 x}{\\left(x^2+1\\right)^2}", "$\\boxed{\\frac{-2x}{(x^2+1)^2}}$",
     "\\frac{-2x}{(x^2+1)^2}", 1.0, True),
    ({"task": "AMPS_Hard"}, "\\sin (x)", "The integral is $\\boxed{\\sin(x) + C}$", "\\sin(x)", 1.0, True),
    ({"task": "AMPS_Hard"}, "x^3", "$\\boxed{x^2}$", "x^2", 0.0, True),
    ({"task": "integrals_with_game"}, "11326/3", "<solution>\\frac{22652}{6}</solution>", "\\frac{22652}{6}", 1.0, True),
    # data analysis
    ({"task": "cta"}, "birthDate", "The class is \\boxed{\\text{birthDate}}", "birthDate", 1.0, True),
    ({"task": "tablejoin"}, "{'a': 'b', 'c': 'd'}", '<solution>{"a": "b", "c": "x"}</solution>',
     '{"a": "b", "c": "x"}', 0.5, True),
    ({"task": "tablejoin"}, "{'a': 'b'}", "I could not find a mapping.", "", 0.0, False),
    ({"task": "tablereformat", "livebench_release_date": OLD, "question_text": JSON_TO_CSV}, CSV_TABLE,
     "```csv\nname,age\nann,3\nbob,4\n```", CSV_TABLE, 1.0, True),
    ({"task": "tablereformat", "livebench_release_date": OLD, "question_text": JSON_TO_CSV}, CSV_TABLE,
     "name,age\nann,3\nbob,5", "name,age\nann,3\nbob,5", 0.0, True),
    ({"task": "tablereformat", "livebench_release_date": "2025-04-25", "question_text": V2_TO_MARKDOWN},
     "| name | age |\n|---|---|\n| ann | 3 |", "| name | age |\n|:--|--:|\n| ann | 3 |",
     "| name | age |\n|:--|--:|\n| ann | 3 |", 1.0, True),
    ({"task": "consecutive_events"}, '[{"user_id": 1, "max_consecutive_growth_months": 3}, '
     '{"user_id": 2, "max_consecutive_growth_months": 1}]',
     '<solution>[{"user_id": 1, "max_consecutive_growth_months": 3}]</solution>',
     '[{"user_id": 1, "max_consecutive_growth_months": 3}]', 0.5, True),
    # reasoning stripped before scoring
    ({"task": "typos"}, "Fixed text.", "<think>Maybe: Fixed text.</think>Fxed text.", "Fxed text.", 0.0, True),
    ({"task": "typos"}, "Fixed text.", "", "", 0.0, False),
]


@pytest.mark.parametrize("meta,gold,reply,extracted,value,parsed", CASES)
def test_livebench(meta, gold, reply, extracted, value, parsed):
    result = livebench(reply, gold, meta)
    assert (result.extracted, result.parsed) == (extracted, parsed)
    assert result.value == pytest.approx(value)


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"task": "code_generation", "category": "coding"}, "no unittest `TestCases`"),
        ({"task": "agentic_coding"}, "needs Docker, the mini-SWE-agent images and network access"),
        ({"task": "python", "category": "agentic_coding_v2"}, "task python \\(agentic coding\\) needs Docker"),
        ({"task": "code_review", "category": "coding"}, "not one LiveBench scores"),
        ({"task": "story_generation", "category": "instruction_following"}, "IFEval"),
        ({"task": "zebra_puzzle"}, "livebench_release_date"),
        ({"task": "math_comp", "subtask": "amc_12a_2023"}, "question_text"),
        ({"task": "math_comp", "subtask": "amc12_2023"}, "not a LiveBench task"),
        ({}, "no 'task'"),
    ],
)
def test_livebench_refusals_name_the_task(meta, message):
    with pytest.raises(UserError, match=message):
        livebench("<solution>x</solution>", "C", meta)


def test_amps_hard_unreadable_answer_is_flagged_not_sent_to_an_llm():
    result = livebench("$\\boxed{\\mathcal{F}(x)}$", "x^2", {"task": "AMPS_Hard"})
    assert (result.value, result.parsed, result.detail["equivalence"]) == (0.0, True, "unreadable")


def test_compat_is_accepted_and_changes_nothing():
    meta = {"task": "web_of_lies_v3"}
    assert livebench("<solution>yes,no,yes</solution>", "yes,no,no", meta, compat=True) == livebench(
        "<solution>yes,no,yes</solution>", "yes,no,no", meta
    )


# --------------------------------------------------------------------------- coding (real sandbox runs)

STDIN_TESTS = json.dumps([{"input": "3 4\n", "output": "7\n", "testtype": "stdin"},
                          {"input": "10 -2\n", "output": "8\n", "testtype": "stdin"}])
SUM_META = {"task": "LCB_generation", "category": "coding", "public_test_cases": STDIN_TESTS,
            "private_test_cases": "[]", "lcb_metadata": "{}"}
PARTIAL = "class Solution:\n    def addToEach(self, nums: List[int], k: int) -> List[int]:\n        out = []"
CALL_META = {"task": "coding_completion", "category": "coding", "partial_solution": PARTIAL,
             "public_test_cases": json.dumps([{"input": "[1, 2]\n3", "output": "[4, 5]", "testtype": "functional"}]),
             "private_test_cases": lcb_private_tests([{"input": "[]\n7", "output": "[]", "testtype": "functional"}]),
             "lcb_metadata": json.dumps({"func_name": "addToEach"})}
REMAINDER = "        for n in nums:\n            out.append(n + k)\n        return out"


def fenced(code: str, prose: str = "Here it is:") -> str:
    return f"{prose}\n```python\n{code}\n```\nDone."


@pytest.mark.parametrize("code,value,verdict", [
    ("a, b = map(int, input().split())\nprint(a + b)", 1.0, None),
    # stdin read through the names LiveCodeBench patches, and a __main__ guard that must still run
    ("import sys\ndef main():\n    a, b = map(int, sys.stdin.readline().split())\n    print(a + b)\n"
     "if __name__ == '__main__':\n    main()", 1.0, None),
    ("from sys import stdin\nprint(sum(map(int, stdin.read().split())))", 1.0, None),
    # upstream patches builtins.open, but the prelude's `from builtins import *` bound the real one first
    ("print(sum(map(int, open('input.txt').read().split())))", 0.0, "runtime error"),
    ("a, b = map(int, input().split())\nprint(f'{a + b}.000')", 1.0, None),  # numbers compare as Decimals
    ("print(7)", 0.0, "wrong answer"),
    ("print(7)\nprint(7)", 0.0, "wrong answer"),
    ("raise ValueError('boom')", 0.0, "runtime error"),
    ("def broken(:\n    pass", 0.0, "runtime error"),
])
def test_coding_stdin_tests(code, value, verdict):
    result = livebench(fenced(code), None, SUM_META)
    assert result.value == value and result.extracted == code
    assert result.detail.get("verdict") == verdict and result.detail["tests"] == 2


@pytest.mark.parametrize("reply,value", [
    (fenced(REMAINDER), 1.0),
    (fenced(PARTIAL + "\n" + REMAINDER), 1.0),  # the whole program: the partial solution is not added twice
    (fenced("        return tuple(n + k for n in nums)"), 1.0),  # a tuple counts as a list
    (fenced("        return nums"), 0.0),
])
def test_coding_completion_call_based(reply, value):
    assert livebench(reply, None, CALL_META).value == value


def test_coding_generation_call_based_needs_the_named_method():
    meta = {**CALL_META, "task": "LCB_generation", "partial_solution": None}
    good = "class Solution:\n    def addToEach(self, nums, k):\n        return [n + k for n in nums]"
    assert livebench(fenced(good), None, meta).value == 1.0
    wrong_name = livebench(fenced(good.replace("addToEach", "add")), None, meta)
    assert (wrong_name.value, wrong_name.detail["verdict"]) == (0.0, "runtime error")


@pytest.mark.parametrize("reply,code", [
    ("```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```", "print(2)"),  # the last block
    ("`print(3)`", "print(3)"),
    ("print(4)\n```", "print(4)"),
    ("print(5)\n", "print(5)"),
])
def test_coding_extracts_code_like_livecodebench(reply, code):
    assert extract_code(reply) == code


def test_coding_empty_reply_is_unparsed_without_running_anything():
    result = livebench("", None, SUM_META)
    assert (result.value, result.parsed) == (0.0, False)


@pytest.mark.parametrize("code,verdict,reason", [
    ("while True:\n    pass", "time limit exceeded", "Time Limit Exceeded"),
    ("block = bytearray(16 << 30)", "runtime error", "Runtime Error"),
    ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "time limit exceeded",
     "Time Limit Exceeded"),
    ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint(7)", "runtime error",
     "Runtime Error"),
    # swallowing the per-test alarm leaves the wall-clock limit: the sandbox is killed without a verdict
    ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass", "no verdict",
     "wall-clock limit"),
])
def test_coding_hostile_programs_score_zero_with_a_reason(code, verdict, reason):
    result = livebench_coding(fenced(code), None, SUM_META, test_timeout_s=1)
    assert result.value == 0.0 and result.detail["verdict"] == verdict
    assert reason in result.detail["reason"]


def test_coding_sandbox_fault_is_an_error_not_a_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap to be found
    item = {"gold": None, "meta": SUM_META}
    record = Record(run_id="r", role="reference", endpoint_id="e", task="livebench", item_id="q1", prompt_hash="h",
                    params={}, response_text=fenced("print(7)"))
    score = score_record(record, item, livebench, {})
    assert (score.outcome, score.value) == ("error", 0.0)
    assert score.error.startswith("sandbox: bubblewrap (bwrap) is not installed")
    assert not score.error.startswith(BAD_ITEM)


@pytest.mark.parametrize("field,raw,message", [
    ("public_test_cases", None, "not a string"),
    ("public_test_cases", "{not json", "neither JSON nor compressed"),
    ("public_test_cases", json.dumps([{"input": "1"}]), "input, output, testtype"),
    # a pickle that names a callable is refused before anything is unpickled into the harness
    ("private_test_cases", base64.b64encode(zlib.compress(pickle.dumps(print))).decode(), "neither JSON"),
])
def test_coding_bad_test_cases_are_the_items_fault(field, raw, message):
    with pytest.raises(UserError, match=message):
        livebench(fenced("print(7)"), None, {**SUM_META, field: raw})


def test_coding_fixture_rows_score_through_the_task():
    items = {item.item_id: item for item in iter_items(load_task("livebench"), data_dir=HUB)
             if item.meta["category"] == "coding"}
    assert {i.meta["task"] for i in items.values()} == {"LCB_generation", "coding_completion"}
    generation, completion = items["e5f6a7"], items["e5f6a8"]
    solve = fenced("a, b = map(int, input().split())\nprint(a + b)")
    assert livebench(solve, generation.gold, generation.meta).detail == {"task": "LCB_generation", "tests": 3,
                                                                        "passed": 3}
    # -5 + 2 is a private (compressed) test: a program right on the public one only still fails
    public_only = fenced("a, b = map(int, input().split())\nprint(7 if a == 3 else 101)")
    assert livebench(public_only, generation.gold, generation.meta).value == 0.0
    assert livebench(fenced(REMAINDER), completion.gold, completion.meta).value == 1.0
