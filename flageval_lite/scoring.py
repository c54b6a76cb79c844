"""Scoring stage: stored Records + stored item gold/meta -> Scores.

Infrastructure failures stay errors (value 0, outcome "error"); they are never read as answers.
Reasoning (`reasoning_content` or a `<think>` block) is removed before the scorer sees the text.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from .records import Record, Score, ScoreResult
from .scorers import get_scorer, strip_reasoning


def _gold_text(gold: Any) -> str:
    if isinstance(gold, (list, tuple)):
        return " | ".join(str(g) for g in gold)
    return "" if gold is None else str(gold)


def outcome_of(result: ScoreResult) -> str:
    if result.detail.get("judge_error"):
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
    if not record.ok:
        return Score(value=0.0, outcome="error", error=f"{record.error_kind or 'error'}: {record.error}", **base)
    answer, _ = strip_reasoning(record.response_text)
    result = scorer(answer, item.get("gold"), meta, **scorer_args)
    outcome = outcome_of(result)
    error = f"judge: {result.detail['judge_error']}" if outcome == "error" else ""
    value = 0.0 if outcome in ("unparsed", "error") else float(result.value)
    return Score(value=value, outcome=outcome, extracted=result.extracted, error=error, **base)


def score_task(records: Iterable[Record], items: dict[str, dict[str, Any]], scorer_name: str,
               scorer_args: Optional[dict[str, Any]] = None, group_by: str = "") -> list[Score]:
    """Score every record of one task; `items` maps item_id -> stored item (gold, meta)."""
    scorer = get_scorer(scorer_name)
    args = dict(scorer_args or {})
    return [score_record(rec, items[rec.item_id], scorer, args, group_by) for rec in records if rec.item_id in items]
