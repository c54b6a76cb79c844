"""LiveBench coding of releases from 2025-04-25 (code_generation, code_completion): BigCodeBench-style unittest
suites, run in the sandbox with the harness environment's libraries.

LiveBench's rule (`code_generation_process_results`, BigCodeBench's `untrusted_check`): the code is the last
```-fenced block (LiveCodeBench `extract_code`); a completion question's `partial_solution` goes in front unless
the code starts with it, else, when the code does not define `entry_point`, the row's `code_prompt` does; the
program and the row's `tests` (a unittest `TestCases` class) run together, the whole suite under max(1,
expected_time + 3) + 1 seconds; 1 when every test passes, else 0.

Faults that are not the answer's: a sandbox that could not start is detail["sandbox_error"]; a library that
LiveBench's scoring environment installs (its requirements_eval.txt) but ours lacks is detail["environment_error"]
naming it.  Both make the item's outcome "error", never a 0.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..records import ScoreResult
from .livebench_coding import extract_code
from .sandbox import Limits, SandboxError, run_python

HARNESS = Path(__file__).with_name("livebench_bigcode_harness.py")
DEFAULT_GT_TIME_S = 20.0  # untrusted_check's gt_time_limit for a row without expected_time
STARTUP_S = 5.0  # the sandbox's start and the harness's imports, which upstream's forked process does not pay
MEMORY_BYTES = 8 << 30  # address space; upstream allows 30 GiB (see docs/scoring.md)

# Import names of what LiveBench installs to score these tasks (livebench/code_runner/requirements_eval.txt):
# a program failing on one of these being absent here would have run there.
UPSTREAM_LIBRARIES = frozenset({
    "bs4", "blake3", "chardet", "cryptography", "DateTime", "django", "dns", "docxtpl", "faker", "flask_login",
    "flask_restful", "flask_wtf", "flask_mail", "flask", "folium", "gensim", "geopandas", "geopy", "holidays",
    "keras", "Levenshtein", "librosa", "lxml", "matplotlib", "mechanize", "natsort", "networkx", "nltk", "numba",
    "numpy", "cv2", "openpyxl", "pandas", "PIL", "prettytable", "psutil", "Crypto", "pyfakefs", "pyquery",
    "pytesseract", "pytest", "python_http_client", "dateutil", "docx", "pytz", "yaml", "requests_mock", "requests",
    "rsa", "skimage", "sklearn", "scipy", "seaborn", "selenium", "sendgrid", "shapely", "soundfile", "statsmodels",
    "sympy", "tensorflow", "textblob", "texttable", "werkzeug", "wikipedia", "wordcloud", "wordninja", "wtforms",
    "xlrd", "xlwt", "xmltodict",
})


def full_program(code: str, partial_solution: Optional[str], entry_point: Optional[str],
                 code_prompt: Optional[str]) -> str:
    """The extracted code with what LiveBench puts in front of it: the partial solution of a completion question
    (unless the code starts with it), else the code prompt when the code does not define the entry point."""
    if partial_solution and not code.startswith(partial_solution):
        return partial_solution + "\n" + code
    if entry_point and f"def {entry_point}" not in code:
        return (code_prompt or "") + "\n" + code
    return code


def suite_time_limit(expected_time: Any) -> float:
    """untrusted_check's limit for the whole suite: max(min_time_limit 1, gt_time_limit) + 1 seconds."""
    if expected_time in (None, ""):
        return DEFAULT_GT_TIME_S + 1
    try:
        gt_time = float(expected_time) + 3
    except (TypeError, ValueError):
        raise UserError(f"livebench coding: meta['expected_time'] {expected_time!r} is not a number") from None
    if not math.isfinite(gt_time):
        raise UserError(f"livebench coding: meta['expected_time'] {expected_time!r} is not a number")
    return max(1.0, gt_time) + 1


def run_suite(program: str, test_code: str, time_limit_s: float) -> dict:
    """The harness's verdict, or the reason the program never reported one (status "timeout" when the sandbox
    was killed at its wall-clock limit).  Raises SandboxError when the sandbox itself could not run."""
    payload = json.dumps({"code": program, "test_code": test_code, "time_limit_s": time_limit_s})
    # untrusted_check joins the process 1 s past the suite's limit
    wall = time_limit_s + 1 + STARTUP_S
    finished = run_python(HARNESS.read_text(encoding="utf-8"), payload.encode("utf-8"),
                          Limits(cpu_s=math.ceil(wall), wall_s=wall, memory_bytes=MEMORY_BYTES), libraries=True)
    lines = finished.stdout.decode("utf-8", errors="replace").strip().split("\n")
    try:
        verdict = json.loads(lines[-1])
        if isinstance(verdict, dict) and verdict.get("status") in ("pass", "fail", "timeout"):
            return verdict
    except ValueError:
        pass
    if finished.timed_out:
        return {"status": "timeout", "exception": f"killed at the {wall:g} s wall-clock limit"}
    if finished.signal_name:
        reason = f"killed by {finished.signal_name} (CPU {math.ceil(wall)} s / memory limit or crash)"
    else:
        stderr = finished.stderr.decode("utf-8", errors="replace").strip()
        reason = f"exited {finished.returncode} without a verdict: {stderr[-200:]}"
    return {"status": "fail", "exception": reason}


def _missing_here(verdict: dict) -> list[str]:
    """Libraries the run lacked that LiveBench's environment has; a module outside that list (one the reply made
    up) is the answer's own failure, as it would be upstream."""
    return [name for name in verdict.get("missing_modules") or () if name in UPSTREAM_LIBRARIES]


def livebench_bigcode(response: str, gold: Any, meta: dict, compat: bool = False) -> ScoreResult:
    """1 when the program passes its whole unittest suite in time, else 0 (LiveBench code_generation rule)."""
    del gold, compat  # the reference solution is not used; there are no upstream quirks to choose between
    task = str(meta.get("task") or "coding")
    test_code = meta.get("tests")
    if not isinstance(test_code, str) or "TestCases" not in test_code:
        raise UserError(f"livebench coding: task {task} item has no unittest `TestCases` in meta['tests']")
    entry_point = meta.get("entry_point")
    if not meta.get("partial_solution") and not entry_point:
        raise UserError(f"livebench coding: task {task} item has neither meta['entry_point'] nor "
                        "meta['partial_solution']")
    time_limit_s = suite_time_limit(meta.get("expected_time"))
    extracted = extract_code(response)
    if not extracted.strip():
        return ScoreResult(0.0, "", parsed=False, detail={"task": task})
    program = full_program(extracted, meta.get("partial_solution"), entry_point, meta.get("code_prompt"))
    try:
        verdict = run_suite(program, test_code, time_limit_s)
    except SandboxError as exc:
        return ScoreResult(0.0, extracted, detail={"task": task, "sandbox_error": str(exc)})
    detail: dict[str, Any] = {"task": task, "verdict": verdict["status"], "time_limit_s": time_limit_s}
    if verdict["status"] == "pass":
        return ScoreResult(1.0, extracted, detail={**detail, "tests": verdict.get("tests_run", 0)})
    missing = _missing_here(verdict)
    if missing:
        detail["missing_library"] = missing
        detail["environment_error"] = (f"{', '.join(missing)} not installed in the scoring environment "
                                       f"({sys.prefix})")
    failures = verdict.get("failures") or {}
    if failures:
        detail["failed_tests"] = sorted(failures)
        detail["reason"] = str(next(iter(failures.values())))[-300:]
    if verdict.get("exception"):
        detail["reason"] = str(verdict["exception"])[:300]
    return ScoreResult(0.0, extracted, detail=detail)
