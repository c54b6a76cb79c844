"""LiveBench ground-truth scorers (§11), re-implemented from LiveBench's rules and dispatched like its judge.

Every task keeps LiveBench's extraction order and partial credit.  Departures (docs/scoring.md): replies
are stripped of reasoning and surrounding whitespace first; sympy equivalence (AMPS_Hard,
integrals_with_game) goes through our safe parser, and where LiveBench would ask an OpenAI model to break
a tie we score 0 and say so in the detail; instruction following (IFEval-style releases) is scored by
`livebench_if`; LCB_generation and coding_completion run their tests in a sandbox (`livebench_coding`), and so
do code_generation and code_completion, as unittest suites (`livebench_bigcode`); agentic_coding and
IFBench-style instruction following are refused, item by item.
"""
from __future__ import annotations

from datetime import date, datetime
from typing import Any

from ..errors import UserError
from ..records import ScoreResult
from . import livebench_if, livebench_tables as tables
from .common import UNPARSED, answer_text
from .livebench_bigcode import livebench_bigcode
from .livebench_coding import livebench_coding
from .livebench_common import Outcome
from .livebench_language import connections, connections_before_2024_11_25, plot_unscrambling, typos
from .livebench_math import aime_livebench, amps_hard, integrals_with_game, math_contest, olympiad
from .livebench_reasoning import (house_traversal, logic_with_navigation, spatial, sudoku, theory_of_mind,
                                  web_of_lies_v2, web_of_lies_v3, zebra_puzzle, zebra_puzzle_before_2024_11_25)

IFBENCH_RELEASE = "2025-11-25"  # instruction following switched from IFEval- to IFBench-style checkers
SANDBOXED_CODING_TASKS = {"LCB_generation", "coding_completion"}  # LiveCodeBench-style tests we can run
UNITTEST_CODING_TASKS = {"code_generation", "code_completion"}  # BigCodeBench-style suites (releases >= 2025-04-25)
AGENTIC_CATEGORIES = {"agentic_coding", "agentic_coding_v2"}  # LiveBench's AGENTIC_CODING_CATEGORIES (2025-05-30 on)
AGENTIC_REFUSAL = ("needs Docker, the mini-SWE-agent images and network access to run the repository's tests, "
                   "which we do not run")


def _release_date(meta: dict, task: str, why: str = "its scorer changed over releases") -> str:
    value = meta.get("livebench_release_date")
    if isinstance(value, (datetime, date)):
        return value.strftime("%Y-%m-%d")
    if not value:
        raise UserError(f"livebench scorer: task {task} needs meta['livebench_release_date'] ({why})")
    return str(value)[:10]


def _question_text(meta: dict, task: str) -> str:
    text = meta.get("question_text") or (meta.get("turns") or [""])[0]
    if not text:
        raise UserError(f"livebench scorer: task {task} needs the question text in meta['question_text']")
    return text


def _dispatch(task: str, subtask: str, gold: Any, answer: str, meta: dict) -> tuple[Outcome, dict]:
    parts = subtask.split("_")
    if parts[0] in ("amc", "smc") or (len(parts) > 1 and parts[1] == "amc"):
        return math_contest(str(gold), answer, _question_text(meta, subtask)), {}
    if parts[0] == "aime":
        return aime_livebench(str(gold), answer), {}
    if parts[0] in ("imo", "usamo"):
        return olympiad(str(gold), answer), {}
    simple = {
        "cta": tables.cta, "tablejoin": tables.tablejoin, "consecutive_events": tables.consecutive_events,
        "integrals_with_game": integrals_with_game, "web_of_lies_v2": web_of_lies_v2,
        "web_of_lies_v3": web_of_lies_v3, "house_traversal": house_traversal, "spatial": spatial,
        "theory_of_mind": theory_of_mind, "logic_with_navigation": logic_with_navigation, "sudoku": sudoku,
        "typos": typos, "plot_unscrambling": plot_unscrambling,
    }
    if subtask in simple:
        return simple[subtask](gold, answer), {}
    if subtask == "tablereformat":
        version = "v2" if _release_date(meta, subtask) >= "2025-04-25" else "v1"
        return tables.tablereformat(str(gold), answer, _question_text(meta, subtask), version), {"version": version}
    if "amps_hard" in subtask.lower() or "amps_hard" in task.lower():
        return amps_hard(gold, answer)
    if "zebra_puzzle" in subtask:
        old = _release_date(meta, subtask) < "2024-11-25"
        return (zebra_puzzle_before_2024_11_25 if old else zebra_puzzle)(str(gold), answer), {}
    if subtask == "connections":
        old = _release_date(meta, subtask) < "2024-11-25"
        return (connections_before_2024_11_25 if old else connections)(str(gold), answer), {}
    raise UserError(f"livebench scorer: task {subtask!r} is not a LiveBench task we can score")


def _if_instructions(task: str, meta: dict) -> list[tuple[str, dict]]:
    if _release_date(meta, task, "it picks the IFEval- or IFBench-style checkers") >= IFBENCH_RELEASE:
        raise UserError(
            f"livebench scorer: task {task} (instruction_following, release >= {IFBENCH_RELEASE}) needs the IFBench "
            "checkers, which we do not implement"
        )
    return livebench_if.instructions_of(meta)


def livebench(response: str, gold: Any, meta: dict, compat: bool = False) -> ScoreResult:
    """Dispatch on meta["category"]/meta["task"]/meta["subtask"]; refuses agentic_coding and IFBench-style
    questions (a UserError: the scoring stage makes it that item's error)."""
    task = str(meta.get("task") or "")
    if not task:
        raise UserError("livebench scorer: meta has no 'task'")
    subtask = str(meta.get("subtask") or task)
    category = str(meta.get("category") or "")
    if task in SANDBOXED_CODING_TASKS:
        return livebench_coding(response, gold, meta)
    if task in UNITTEST_CODING_TASKS:
        return livebench_bigcode(response, gold, meta)
    if category in AGENTIC_CATEGORIES or "agentic_coding" in (task, subtask):
        raise UserError(f"livebench scorer: task {task} (agentic coding) {AGENTIC_REFUSAL}")
    if category == "coding":
        raise UserError(f"livebench scorer: coding task {task!r} is not one LiveBench scores (LCB_generation, "
                        "coding_completion, code_generation, code_completion, agentic_coding)")
    # Bad rows fail whatever the reply, so both checks come before the empty-reply shortcut.
    if category == "instruction_following":
        instructions = _if_instructions(task, meta)
    elif gold is None or (isinstance(gold, str) and not gold.strip()):
        raise UserError(f"livebench scorer: task {task} item has no ground_truth")
    text = answer_text(response)
    if not text:
        return UNPARSED
    if category == "instruction_following":
        outcome, detail = livebench_if.instruction_following(text, instructions)
    else:
        outcome, detail = _dispatch(task, subtask, gold, text, meta)
    return ScoreResult(
        float(outcome.value), outcome.extracted, parsed=outcome.parsed, detail={"task": subtask, **detail}
    )
