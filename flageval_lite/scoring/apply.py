"""Scoring stage: stored Records + stored item gold/meta -> Scores.

Infrastructure failures stay errors (outcome "error", value 0 only as a placeholder); they are never read as
answers, and the compare stage leaves them out of the paired sample.  Reasoning (`reasoning_content` or a
`<think>` block) is removed before the scorer sees the text.

An item asked several times (`repeats: k`) has one Record and one Score per repeat; `aggregate_repeats` makes
them ONE Score per item, the unit the paired analysis resamples: the mean over the answered repeats (avg@k), or
pass@k (1 when any answered repeat is right).  Errored repeats are left out of the mean, never scored 0.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from ..errors import UserError
from ..interop.lmeval import SCORER as LMEVAL_SCORER
from ..records import BAD_ITEM, REPEAT_AGGREGATES, SCORER_FAULTS, Record, Score, ScoreResult, stable_hash
from ..runner.store import Store
from . import get_scorer, strip_reasoning

# What a scorer raises on a gold or meta it cannot read: its own one-line UserError ("gold ... is not an integer"),
# or a Python error from reading a malformed value.  A judge failure is not one: it is a detail of the result.
SCORER_DATA_ERRORS = (UserError, ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError)


def _gold_text(gold: Any) -> str:
    if isinstance(gold, (list, tuple)):
        return " | ".join(str(g) for g in gold)
    return "" if gold is None else str(gold)


def _scorer_fault(result: ScoreResult) -> str:
    return next((f"{label}: {result.detail[key]}" for key, label in SCORER_FAULTS.items() if result.detail.get(key)),
                "")


def outcome_of(result: ScoreResult) -> str:
    if _scorer_fault(result):
        return "error"
    if not result.parsed:
        return "unparsed"
    if result.value >= 1.0:
        return "correct"
    return "partial" if result.value > 0 else "wrong"


def score_record(record: Record, item: dict[str, Any], scorer: Callable[..., ScoreResult],
                 scorer_args: dict[str, Any], group_by: str = "") -> Score:
    meta = item.get("meta") or {}
    base = dict(role=record.role, task=record.task, item_id=record.item_id, gold=_gold_text(item.get("gold")),
                response_text=record.response_text, finish_reason=record.finish_reason,
                completion_tokens=record.completion_tokens, latency_s=record.latency_s, ttft_s=record.ttft_s,
                group=str(meta.get(group_by, "")) if group_by else "")
    if not record.ok:  # an infrastructure error, or a bad_item stored by the runner
        return Score(value=0.0, outcome="error", error=f"{record.error_kind or 'error'}: {record.error}", repeats=0,
                     **base)
    answer, _ = strip_reasoning(record.response_text)
    try:
        result = scorer(answer, item.get("gold"), meta, **scorer_args)
    except SCORER_DATA_ERRORS as exc:  # a gold (or meta) the scorer cannot read: that item's fault, not the run's
        return Score(value=0.0, outcome="error", error=f"{BAD_ITEM}: {exc}"[:500], repeats=0, **base)
    outcome = outcome_of(result)
    error = _scorer_fault(result) if outcome == "error" else ""
    value = 0.0 if outcome in ("unparsed", "error") else float(result.value)
    return Score(value=value, outcome=outcome, extracted=result.extracted, error=error, detail=result.detail, **base)


def bad_item_ids(scores: Iterable[Score]) -> set[str]:
    """Items whose data is at fault (a render or gold error) on some side or repeat."""
    return {s.item_id for s in scores if s.outcome == "error" and s.error.startswith(BAD_ITEM + ":")}


def mark_bad(score: Score, bad: set[str]) -> Score:
    """A bad item is bad on every side: its Score becomes the bad_item error whatever this side answered, so the
    pair is left out on both sides alike (a gold the scorer reads only for some answers fails on one side)."""
    if score.item_id not in bad or score.error.startswith(BAD_ITEM + ":"):
        return score
    return dataclasses.replace(score, value=0.0, outcome="error", repeats=0,
                               error=f"{BAD_ITEM}: the item could not be scored on another side or repeat")


def score_task(records: Iterable[Record], items: dict[str, dict[str, Any]], scorer_name: str,
               scorer_args: Optional[dict[str, Any]] = None, group_by: str = "") -> list[Score]:
    """Score every record of one task; `items` maps item_id -> stored item (gold, meta)."""
    scorer = get_scorer(scorer_name)
    args = dict(scorer_args or {})
    return [score_record(rec, items[rec.item_id], scorer, args, group_by) for rec in records if rec.item_id in items]


def aggregate_repeats(scores: Iterable[tuple[int, Score]], aggregate: str = "avg") -> list[Score]:
    """(repeat, Score) of one role and task -> one Score per item, in the items' first-seen order.

    value: the mean of the answered repeats (avg) or their best value (pass: pass@k with n = k samples, so the
    unbiased estimator 1 - C(n-c, k)/C(n, k) is just "any repeat right"); `repeats` says how many were answered.
    The text fields come from the first answered repeat.  An item none of whose repeats was answered stays an
    error.  A single repeat comes back as it is.  Of two Scores of one repeat (records of a rerun with other
    parameters) the later one counts."""
    if aggregate not in REPEAT_AGGREGATES:
        raise ValueError(f"unknown repeat aggregate {aggregate!r} (expected one of {', '.join(REPEAT_AGGREGATES)})")
    by_item: dict[str, dict[int, Score]] = defaultdict(dict)
    for repeat, score in scores:
        by_item[score.item_id][repeat] = score
    out = []
    for by_repeat in by_item.values():
        repeats = sorted(by_repeat.items())
        answered = [score for _, score in repeats if score.outcome != "error"]
        if not answered:
            out.append(dataclasses.replace(repeats[0][1], repeats=0))
            continue
        if len(repeats) == 1:
            out.append(answered[0])
            continue
        values = [score.value for score in answered]
        value = max(values) if aggregate == "pass" else sum(values) / len(values)
        outcome = ("unparsed" if all(s.outcome == "unparsed" for s in answered) else
                   "correct" if value >= 1.0 else "wrong" if value == 0 else "partial")
        out.append(dataclasses.replace(answered[0], value=value, outcome=outcome, repeats=len(answered)))
    return out


def score_run(store: Store, run_id: str, judge_config: Optional[dict[str, Any]] = None) -> None:
    task_specs = store.get_meta("task_specs", {})
    judge = None
    for name, spec in task_specs.items():
        if spec["scorer"] in (LMEVAL_SCORER, "imported"):
            continue  # scored by the tool that produced them
        items = {it["item_id"]: it for it in store.items(run_id, task=name, media=False)}
        args = dict(spec.get("scorer_args") or {})
        if spec["scorer"] == "mmvet_judge":
            judge = judge or make_judge(judge_config, store)
            args["judge"] = judge
        roles = sorted({r.role for r in store.records(run_id, task=name)})
        by_role = {}
        for role in roles:
            # Repeats beyond the task's count are those of an earlier run of the same id that asked for more.
            records = [r for r in store.records(run_id, role=role, task=name)
                       if r.item_id in items and r.repeat < spec.get("repeats", 1)]
            by_role[role] = list(zip((r.repeat for r in records),
                                     score_task(records, items, spec["scorer"], args, spec.get("group_by", ""))))
        bad = bad_item_ids(score for scored in by_role.values() for _, score in scored)
        for role, scored in by_role.items():
            scored = [(repeat, mark_bad(score, bad)) for repeat, score in scored]
            if any(repeat for repeat, _ in scored):
                store.put_repeat_scores(run_id, scored)
            store.put_scores(run_id, aggregate_repeats(scored, spec.get("repeat_aggregate", "avg")))


def judge_prompt_of(judge_config: dict[str, Any]) -> str:
    """Which MM-Vet judge prompt a run uses, for the manifest: an upstream evaluator's (file and content hash), the
    user's prompt file (path and content hash) or our own wording (its version), its re-ask rule, and the runs."""
    from .judge_prompts import resolve_prompt

    described = resolve_prompt(judge_config.get("prompt", ""), judge_config.get("source"),
                               judge_config.get("prompt_file")).describe()
    runs = judge_config.get("runs", 1)
    return f"{described}; {runs} runs per item, scored by their mean" if runs > 1 else described


def make_judge(judge_config: Optional[dict[str, Any]], store: Store) -> Any:
    from .judge import JudgeClient

    if not judge_config or not judge_config.get("base_url"):
        raise UserError("MM-Vet v2 needs an LLM judge: set `judge: {base_url: ..., model: ...}` in the run config")
    return JudgeClient(cache_path=Path(store.path).parent / "judge.sqlite", **judge_config)
