"""MM-Vet v2 LLM judge (§4): an OpenAI-compatible judge, its verdicts cached in SQLite.

Two kinds of asking again, kept apart:
- a request that fails (HTTP error status, timeout, connection lost) is an infrastructure fault: sent again
  unchanged, up to `max_retries` times with a growing pause, and if it never succeeds the item is a judge failure,
  never a score;
- a reply that arrives but holds no score is the judge's answer: asked again as the prompt style's evaluator does
  (`judge_prompts.ReaskRule`: warmer each time, the official evaluator with its re-ask appended), and once every
  reply was unusable the upstream styles score 0.0 as their evaluators do, ours reports a judge failure.

`runs: k` grades every item k times independently (the official evaluator's `--num_run`), the score their mean.
The same (question, ground truth, prediction) asked of the same judge (base URL + model) under the same prompt and
re-ask rule is answered from the cache, run by run, so both backends of a comparison — and reruns — see identical
verdicts for identical replies.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import openai

from ..errors import UserError
from ..records import JUDGING_COUNTS, ScoreResult
from .common import UNPARSED, answer_text
from .judge_prompts import resolve_prompt


class JudgeError(Exception):
    """No verdict: the judge could not be reached, or (our prompt) gave no usable reply at any temperature."""


@dataclass(frozen=True)
class Verdict:
    """One grading run of one item: `temperatures` of the requests that got a reply (one per attempt), `replies`
    their texts, `gave_up` when none held a score and `score` is the style's fallback, `faults` the failed
    requests that were sent again on the way."""

    score: float
    cached: bool
    replies: tuple[str, ...]
    temperatures: tuple[float, ...]
    gave_up: bool = False
    faults: int = 0

    @property
    def attempts(self) -> int:
        return len(self.temperatures)

    def detail(self) -> dict[str, Any]:
        return {"score": self.score, "attempts": self.attempts, "temperatures": list(self.temperatures),
                "gave_up": self.gave_up, "faults": self.faults, "cached": self.cached}


@dataclass(frozen=True)
class Grading:
    """An item's verdicts, one per run; its score is their mean."""

    runs: tuple[Verdict, ...]

    @property
    def score(self) -> float:
        return sum(verdict.score for verdict in self.runs) / len(self.runs)

    @property
    def cached(self) -> bool:
        return all(verdict.cached for verdict in self.runs)


class JudgeClient:
    """An OpenAI-compatible judge with a SQLite verdict cache keyed by (item hash, judge identity, run)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        cache_path: Union[str, Path, None] = None,
        max_retries: int = 3,
        timeout_s: float = 120.0,
        max_tokens: int = 256,
        retry_backoff_s: float = 0.5,
        prompt_file: Union[str, Path, None] = None,
        prompt: str = "",
        source: Union[str, Path, None] = None,
        runs: int = 1,
    ):
        if not base_url or not model:
            raise UserError("judge: base_url and model are both required")
        if max_retries < 1:
            raise UserError(f"judge: max_retries must be at least 1, got {max_retries}")
        if runs < 1:
            raise UserError(f"judge: runs must be at least 1, got {runs}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.identity = f"{self.base_url}|{model}"
        self.max_retries, self.max_tokens, self.retry_backoff_s = max_retries, max_tokens, retry_backoff_s
        self.runs = runs
        self.prompt = resolve_prompt(prompt, source, prompt_file)
        self._client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.cache_path = Path(cache_path) if cache_path else None
        if self.cache_path:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS judge_runs (item_key TEXT NOT NULL, judge TEXT NOT NULL, "
                    "run INTEGER NOT NULL, score REAL NOT NULL, replies TEXT NOT NULL, temperatures TEXT NOT NULL, "
                    "gave_up INTEGER NOT NULL, faults INTEGER NOT NULL, created_at REAL NOT NULL, "
                    "PRIMARY KEY (item_key, judge, run))"
                )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.cache_path, timeout=30)
        try:
            with db:  # commits on success
                yield db
        finally:
            db.close()

    def item_key(self, question: str, gold: str, prediction: str) -> str:
        """The item under this prompt and its re-ask rule (temperatures, re-ask text, fallback); the run index is
        the cache's other key, so every run is asked of the judge and kept on its own."""
        blob = json.dumps([self.prompt.version, self.prompt.rule.key(), question, gold, prediction],
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cached(self, key: str, run: int) -> Optional[Verdict]:
        if not self.cache_path:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT score, replies, temperatures, gave_up, faults FROM judge_runs "
                "WHERE item_key = ? AND judge = ? AND run = ?", (key, self.identity, run)
            ).fetchone()
        if not row:
            return None
        return Verdict(row[0], True, tuple(json.loads(row[1])), tuple(json.loads(row[2])), bool(row[3]), row[4])

    def _store(self, key: str, run: int, verdict: Verdict) -> None:
        if not self.cache_path:
            return
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO judge_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, self.identity, run, verdict.score, json.dumps(verdict.replies, ensure_ascii=False),
                 json.dumps(verdict.temperatures), int(verdict.gave_up), verdict.faults, time.time()),
            )

    def _ask(self, content: str, temperature: float) -> tuple[str, int]:
        """One reply to `content` at `temperature`, the request sent again on an infrastructure fault ->
        (reply text, failed requests before it); JudgeError when all `max_retries` requests failed."""
        problems = []
        for attempt in range(self.max_retries):
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": content}], temperature=temperature,
                    max_tokens=self.max_tokens,
                )
            except openai.OpenAIError as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
                if attempt + 1 < self.max_retries:
                    time.sleep(self.retry_backoff_s * (attempt + 1))
                continue
            return ((reply.choices[0].message.content or "") if reply.choices else ""), attempt
        raise JudgeError(f"judge {self.identity}: {self.max_retries} failed requests (an infrastructure fault, "
                         f"not a verdict): {problems[-1]}")

    def _grade_once(self, question: str, gold: str, prediction: str) -> Verdict:
        base, rule = self.prompt.build(question, gold, prediction), self.prompt.rule
        replies: list[str] = []
        faults = 0
        for attempt, temperature in enumerate(rule.temperatures):
            content, failed = self._ask(rule.prompt(base, attempt), temperature)
            replies.append(content)
            faults += failed
            value = self.prompt.parse(content)
            if value is not None:
                return Verdict(value, False, tuple(replies), rule.temperatures[:attempt + 1], faults=faults)
        if rule.fallback is None:
            raise JudgeError(f"judge {self.identity} gave no usable score at temperatures "
                             f"{', '.join(f'{t:g}' for t in rule.temperatures)}: last reply {replies[-1][:80]!r}")
        return Verdict(rule.fallback, False, tuple(replies), rule.temperatures, gave_up=True, faults=faults)

    def grade(self, question: str, gold: str, prediction: str) -> Grading:
        """Every run's verdict, each from the cache or the judge; raises JudgeError on a run without one (the runs
        graded before it stay cached)."""
        key = self.item_key(question, gold, prediction)
        verdicts = []
        for run in range(self.runs):
            verdict = self._cached(key, run)
            if verdict is None:
                verdict = self._grade_once(question, gold, prediction)
                self._store(key, run, verdict)
            verdicts.append(verdict)
        return Grading(tuple(verdicts))


def mmvet_judge(
    response: str, gold: Any, meta: dict, judge: Optional[JudgeClient] = None, compat: bool = False
) -> ScoreResult:
    """MM-Vet v2: the judge's score for the reply (the mean of its runs); meta["question"] is the question text with
    <image k> marks. The detail holds every run's score, attempts and temperatures."""
    if judge is None:
        raise UserError("mmvet_judge scorer: no judge configured (needs a judge base_url and model)")
    question = meta.get("question")
    if not question:
        raise UserError("mmvet_judge scorer: meta has no 'question' text for the judge")
    text = answer_text(response)
    if not text:
        return UNPARSED
    try:
        grading = judge.grade(str(question), str(gold), text)
    except JudgeError as exc:
        return ScoreResult(0.0, "", parsed=False, detail={"judge_error": str(exc)})
    return ScoreResult(grading.score, text, detail={"judge": judge.identity, "cached": grading.cached,
                                                    "runs": [verdict.detail() for verdict in grading.runs]})


def tally_judging(details: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Counts over the Score details `mmvet_judge` left: answers graded, judge runs, answers whose grading needed a
    re-ask (a reply without a score), runs that gave up (scored the style's fallback), failed judge requests sent
    again, and answers left without a verdict (the judge unreachable: scorer errors)."""
    counts = dict.fromkeys(JUDGING_COUNTS, 0)
    for detail in details:
        if detail.get("judge_error"):
            counts["no_verdict"] += 1
            continue
        runs = detail.get("runs") or []
        if not runs:
            continue
        counts["graded"] += 1
        counts["runs"] += len(runs)
        counts["reasked"] += any(run.get("attempts", 1) > 1 for run in runs)
        counts["gave_up"] += sum(bool(run.get("gave_up")) for run in runs)
        counts["faults"] += sum(int(run.get("faults", 0)) for run in runs)
    return counts
