"""Compare stage: the Scores of both backends -> paired statistics per task and one verdict per run.

Items are paired by `item_id`.  An item scored on one side only is listed and left out of every
paired number.  An item with an infrastructure error on either side is left out of the paired sample
too (a fault is not an answer) and counted per side; unparsed answers are scored 0 by the scorer and
counted on their own.  A task that lost more than its rule's `max_error_rate` of items that way, or
lost any item on one side only, reads "incomplete" (docs/statistics.md, "Decision rules").

Scores and deltas are in points (proportion × 100).  Two headline metrics exist:

* ``accuracy``  -- the mean of the per-item values.
* ``livebench`` -- LiveBench's headline: the mean of the category means of the task means, where
  ``Score.group`` is ``"category/task"`` (a group without ``/`` is a category with one task).  The
  paired statistics run on per-item values rescaled by that weighting (value × n × weight, weights
  summing to 1), so the mean of the rescaled values is exactly the headline and Δ, its intervals and
  p-values describe the headline.  The approximation: the weights are held at their observed values
  and not resampled, which ignores the (small) variance of the cell sizes themselves.
* ``macro``     -- the mean of the per-group accuracies (``Score.group``, e.g. BLINK's 14 sub-tasks), each group
  weighted 1/G whatever its size: the same rescaling with weights 1 / (G × n_group), under the same
  approximation.  The row also carries the micro accuracy (plain mean) in ``micro`` for the report.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError
from ..records import Interval, Record, Score, TaskComparison
from ..scoring.asr_text import METRIC_UNITS, error_counts
from . import divergence, error_rate, plan, stats
from .pairing import (Pair, disagree_kind, divergence_pairs, incomplete_reason, outcome_counts, pair_scores,
                      points_interval, rule_fields, score_value)

METRICS = ("accuracy", "livebench", "macro") + tuple(METRIC_UNITS)  # wer, cer: corpus error rates


@dataclass
class PairedTaskComparison(TaskComparison):
    """TaskComparison plus what the report needs to explain the pairing."""

    metric: str = "accuracy"
    only_reference: list[str] = field(default_factory=list)  # item ids scored on the reference only
    only_candidate: list[str] = field(default_factory=list)
    excluded_errors: int = 0  # pairs left out because either side errored (none with errors_as_zero)
    # The decision rule (stats.DecisionRule, points) and what decided the verdict ("equivalence ±1", ...)
    equivalence_margin: Optional[float] = None
    non_inferiority_margin: Optional[float] = None
    max_error_rate: float = 0.02
    rule: str = ""
    non_inferior: bool = False  # the one-sided test at -non_inferiority_margin (False when that rule is off)
    certified: dict[str, float] = field(default_factory=dict)  # tightest margins this row certifies (points)
    incomplete_reason: str = ""  # why faults make the row "incomplete"; "" when they do not
    flip_rate: float = 0.0  # share of paired items whose values differ
    diff_variance: float = 0.0  # population variance of the paired differences (proportion units), for planning
    plan: dict[str, Any] = field(default_factory=dict)  # plan.plan_row: the n this row needs for its rule
    answer_disagreements: int = 0  # pairs whose extracted answers or outcomes differ
    warnings: list[str] = field(default_factory=list)
    # A/B against A/A per item (see beyond_noise_floor); {} without a noise floor
    noise_test: dict[str, Any] = field(default_factory=dict)
    # Paired item ids, and those whose response texts differ: inputs of the noise test, kept out of summary.json
    # (they can name every item of a task).
    paired_items: frozenset = field(default_factory=frozenset, repr=False)
    differing_outputs: frozenset = field(default_factory=frozenset, repr=False)
    # Error-rate rows (wer, cer): scores are rates, lower is better, and delta is reference - candidate, so that a
    # negative delta is a loss on every row and the verdict rules need no second sign.
    lower_is_better: bool = False
    # A `macro` row's micro accuracy (plain mean over the paired items), points: {reference, candidate, delta}
    micro: dict[str, float] = field(default_factory=dict)
    # A `livebench` row's "category/task" cells with no item scored on both sides (agentic_coding, refused): the
    # headline is then not LiveBench's average over all its tasks
    unscored_groups: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        del data["paired_items"], data["differing_outputs"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PairedTaskComparison":
        obj = super().from_dict(data)
        for name in ("reference_ci", "candidate_ci", "delta_ci", "delta_ci90"):
            value = getattr(obj, name)
            if isinstance(value, dict):
                setattr(obj, name, Interval(**value))
        return obj


# --------------------------------------------------------------------------- metrics


def _livebench_cell(group: str) -> tuple[str, str]:
    category, _, task = group.partition("/")
    return category, task or category


def livebench_weights(groups: Sequence[str]) -> list[Fraction]:
    """Per-item weights (exact fractions summing to 1) under which a weighted mean is LiveBench's headline."""
    cells = Counter(_livebench_cell(g) for g in groups)
    tasks_per_category = Counter(category for category, _ in cells)
    n_categories = len(tasks_per_category)
    return [Fraction(1, n_categories * tasks_per_category[c] * cells[(c, t)])
            for c, t in (_livebench_cell(g) for g in groups)]


def macro_weights(groups: Sequence[str]) -> list[Fraction]:
    """Per-item weights (exact fractions summing to 1) under which a weighted mean is the mean of group means."""
    sizes = Counter(groups)
    return [Fraction(1, len(sizes) * sizes[g]) for g in groups]


def _statistic_values(values: Sequence[float], groups: Sequence[str], metric: str) -> list[float]:
    """Values whose plain mean is the task's headline (see the module docstring).  Rescaled in exact
    arithmetic: with equal cells n × weight is exactly 1, so 0/1 values stay 0/1 (floats would give
    0.9999999999999999 for n = 49, 98, 103 and silently switch to the graded test and interval)."""
    if metric == "accuracy":
        return list(values)
    n = len(values)
    weights = livebench_weights(groups) if metric == "livebench" else macro_weights(groups)
    return [float(Fraction(v) * n * w) for v, w in zip(values, weights)]


def unscored_cells(pairs: Sequence[Pair], ref_all: Mapping[str, Score], cand_all: Mapping[str, Score]) -> list[str]:
    """Groups of the task's items of which no pair was scored without an error on both sides: the headline leaves
    them out (or, with errors_as_zero, counts them 0)."""
    every = {s.group for s in (*ref_all.values(), *cand_all.values()) if s.group}
    scored = {p.reference.group or p.candidate.group for p in pairs
              if "error" not in (p.reference.outcome, p.candidate.outcome)}
    return sorted(every - scored)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _group_indices(pairs: Sequence[Pair], livebench: bool = False) -> dict[str, list[int]]:
    """Indices of the pairs per Score.group (per LiveBench category with `livebench`), names sorted; pairs
    without a group are in none."""
    keyed: dict[str, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        group = pair.reference.group or pair.candidate.group
        if group:
            keyed[_livebench_cell(group)[0] if livebench else group].append(index)
    return {name: keyed[name] for name in sorted(keyed)}


def _group_breakdown(pairs: Sequence[Pair], ref_vals: Sequence[float], cand_vals: Sequence[float],
                     metric: str) -> dict[str, dict[str, float]]:
    """Score per Score.group (per LiveBench category, category-weighted, for livebench)."""
    out = {}
    for name, idx in _group_indices(pairs, livebench=metric == "livebench").items():
        groups = [pairs[i].reference.group or pairs[i].candidate.group for i in idx]
        ref = _mean(_statistic_values([ref_vals[i] for i in idx], groups, metric))
        cand = _mean(_statistic_values([cand_vals[i] for i in idx], groups, metric))
        out[name] = {
            "n": len(idx),
            "reference": 100.0 * ref,
            "candidate": 100.0 * cand,
            "delta": 100.0 * (cand - ref),
            "flips_ref_only": sum(ref_vals[i] > cand_vals[i] for i in idx),
            "flips_cand_only": sum(cand_vals[i] > ref_vals[i] for i in idx),
        }
    return out


# --------------------------------------------------------------------------- one task


@dataclass
class _Measured:
    """What one metric measured over the paired items (points): the row fields in which metrics differ."""

    binary: bool
    reference_score: float
    candidate_score: float
    reference_ci: Interval
    candidate_ci: Interval
    delta: float
    delta_ci: Interval
    delta_ci90: Interval
    p_value: float
    flips_ref_only: int
    flips_cand_only: int
    mde: float
    flip_rate: float
    diff_variance: float
    groups: dict[str, dict[str, float]]
    micro: dict[str, float] = field(default_factory=dict)
    lower_is_better: bool = False


def compare_task(task: str, title: str, ref_scores: Iterable[Score], cand_scores: Iterable[Score],
                 rule: Optional[stats.DecisionRule] = None, metric: str = "accuracy",
                 errors_as_zero: bool = False, alpha: float = 0.05,
                 records: Optional[Mapping[str, Iterable[Record]]] = None) -> PairedTaskComparison:
    """Paired statistics of one task under `rule` (default stats.DecisionRule()).  `records` (role -> Records) adds
    logprob divergence when present.

    `p_holm` equals `p_value` and the verdict uses it; `compare_run` adjusts both across tasks.
    """
    if metric not in METRICS:
        raise UserError(f"task {task}: unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
    rule = rule or stats.DecisionRule()
    pairs, only_ref, only_cand, ref_all, cand_all = pair_scores(task, ref_scores, cand_scores)
    if not pairs:
        raise UserError(f"task {task}: no item was scored on both the reference and the candidate")
    warnings = []
    if only_ref or only_cand:
        warnings.append(f"{len(only_ref)} item(s) scored on the reference only and {len(only_cand)} on the "
                        f"candidate only were left out of the paired statistics")
    unscored = unscored_cells(pairs, ref_all, cand_all) if metric == "livebench" else []
    if unscored:
        warnings.append(f"headline without {', '.join(unscored)} (no item scored on both sides): not LiveBench's "
                        "average over all the release's tasks")
    excluded_errors = 0
    if not errors_as_zero:
        kept = [p for p in pairs if "error" not in (p.reference.outcome, p.candidate.outcome)]
        excluded_errors = len(pairs) - len(kept)
        if excluded_errors:
            warnings.append(f"{excluded_errors} pair(s) with an infrastructure error on either side were left out")
        if not kept:
            return _unmeasured_row(task, title, metric, rule, pairs, ref_all, cand_all, only_ref, only_cand, warnings)
        pairs = kept
    reason = incomplete_reason(ref_all, cand_all, rule.max_error_rate)
    if reason:
        warnings.append(f"incomplete: {reason}; rerun to re-ask them")
    if metric in METRIC_UNITS:
        measured = _error_rate_statistics(task, pairs, metric, errors_as_zero, alpha)
    else:
        measured = _mean_statistics(pairs, metric, errors_as_zero, alpha)

    ci90 = (measured.delta_ci90.low, measured.delta_ci90.high)
    verdict, decided_by = stats.verdict((measured.delta_ci.low, measured.delta_ci.high), ci90, measured.p_value,
                                        rule, alpha=alpha)
    by_role = {role: {r.item_id: r for r in recs} for role, recs in (records or {}).items()}
    differing = frozenset(p.item_id for p in pairs if p.reference.response_text != p.candidate.response_text)
    row = PairedTaskComparison(
        task=task,
        title=title,
        n=len(pairs),
        **vars(measured),
        p_holm=measured.p_value,
        answer_agreement=_mean([p.reference.extracted == p.candidate.extracted for p in pairs]),
        output_agreement=1.0 - len(differing) / len(pairs),
        verdict="incomplete" if reason else verdict,
        **outcome_counts(ref_all, cand_all),
        **rule_fields(rule, ci90, decided_by, reason),
        divergence=divergence.summarize_divergence(divergence_pairs(pairs, by_role)),
        metric=metric,
        only_reference=only_ref,
        only_candidate=only_cand,
        excluded_errors=excluded_errors,
        answer_disagreements=sum(bool(disagree_kind(p)) for p in pairs),
        warnings=warnings,
        paired_items=frozenset(p.item_id for p in pairs),
        differing_outputs=differing,
        unscored_groups=unscored,
    )
    row.plan = plan.plan_row(row)
    return row


def _mean_statistics(pairs: Sequence[Pair], metric: str, errors_as_zero: bool, alpha: float) -> _Measured:
    """Accuracy, LiveBench and macro: means of the per-item values rescaled to the headline's weights (module
    docstring); Wilson or bootstrap intervals, exact McNemar on binary values and sign-flip p otherwise."""
    ref_vals = [score_value(p.reference, errors_as_zero) for p in pairs]
    cand_vals = [score_value(p.candidate, errors_as_zero) for p in pairs]
    groups = [p.reference.group or p.candidate.group for p in pairs]
    ref_stat = _statistic_values(ref_vals, groups, metric)
    cand_stat = _statistic_values(cand_vals, groups, metric)
    n = len(pairs)
    binary = stats.is_binary(ref_stat + cand_stat)  # what the paired test and interval below see
    if binary:
        ref_ci = stats.wilson_interval(int(sum(ref_stat)), n)
        cand_ci = stats.wilson_interval(int(sum(cand_stat)), n)
    else:
        ref_ci = stats.bootstrap_mean_ci(ref_stat)
        cand_ci = stats.bootstrap_mean_ci(cand_stat)
    micro = {"reference": 100.0 * _mean(ref_vals), "candidate": 100.0 * _mean(cand_vals),
             "delta": 100.0 * (_mean(cand_vals) - _mean(ref_vals))} if metric == "macro" else {}
    return _Measured(
        binary=binary,
        reference_score=100.0 * _mean(ref_stat),
        candidate_score=100.0 * _mean(cand_stat),
        reference_ci=points_interval(ref_ci),
        candidate_ci=points_interval(cand_ci),
        delta=100.0 * (_mean(cand_stat) - _mean(ref_stat)),
        delta_ci=points_interval(stats.paired_difference_ci(ref_stat, cand_stat, confidence=0.95)),
        delta_ci90=points_interval(stats.paired_difference_ci(ref_stat, cand_stat, confidence=0.90)),
        p_value=stats.paired_p_value(ref_stat, cand_stat),
        flips_ref_only=sum(r > c for r, c in zip(ref_vals, cand_vals)),
        flips_cand_only=sum(c > r for r, c in zip(ref_vals, cand_vals)),
        mde=100.0 * stats.minimum_detectable_effect(ref_stat, cand_stat, alpha=alpha),
        flip_rate=sum(r != c for r, c in zip(ref_stat, cand_stat)) / n,
        diff_variance=float(np.var(np.subtract(cand_stat, ref_stat))),
        groups=_group_breakdown(pairs, ref_vals, cand_vals, metric),
        micro=micro,
    )


def _unmeasured_row(task: str, title: str, metric: str, rule: stats.DecisionRule, pairs: Sequence[Pair],
                    ref_all: Mapping[str, Score], cand_all: Mapping[str, Score], only_ref: list[str],
                    only_cand: list[str], warnings: list[str]) -> PairedTaskComparison:
    """The row of a task whose every paired item errored: nothing measured (Δ anywhere in ±100), "incomplete"."""
    reason = incomplete_reason(ref_all, cand_all, rule.max_error_rate)
    nothing = Interval(-100.0, 100.0)
    return PairedTaskComparison(
        task=task, title=title, n=0, binary=False, reference_score=0.0, candidate_score=0.0,
        reference_ci=Interval(0.0, 100.0), candidate_ci=Interval(0.0, 100.0), delta=0.0, delta_ci=nothing,
        delta_ci90=nothing, p_value=1.0, p_holm=1.0, flips_ref_only=0, flips_cand_only=0, answer_agreement=0.0,
        output_agreement=0.0, mde=100.0, equivalent=False, within_release_gate=False, verdict="incomplete",
        **outcome_counts(ref_all, cand_all), metric=metric, only_reference=only_ref, only_candidate=only_cand, excluded_errors=len(pairs),
        warnings=warnings + [f"incomplete: {reason}; rerun to re-ask them"],
        equivalence_margin=rule.equivalence, non_inferiority_margin=rule.non_inferiority,
        max_error_rate=rule.max_error_rate, rule=rule.label(rule.weakest),
        certified={"equivalence": 100.0, "non_inferiority": 100.0}, incomplete_reason=reason)


def _edits(score: Score, metric: str, errors_as_zero: bool) -> tuple[int, int]:
    """(edits, reference units) of one scored utterance; an infrastructure error (counted as 0) deletes it all."""
    hypothesis = "" if score.outcome == "error" and errors_as_zero else score.extracted
    return error_counts(score.gold, hypothesis, metric)


def _error_rate_statistics(task: str, pairs: Sequence[Pair], metric: str, errors_as_zero: bool,
                           alpha: float) -> _Measured:
    """WER/CER: corpus rates (total edits / total reference units) in points, paired bootstrap over utterances for
    Δ, sign-flip p (error_rate.py).  Δ = reference - candidate: negative when the candidate errs more.

    The edits are recounted from the stored reference (`Score.gold`) and normalised hypothesis (`Score.extracted`)
    with the scorer's own rules (asr_text.py)."""
    counted = [(_edits(p.reference, metric, errors_as_zero), _edits(p.candidate, metric, errors_as_zero))
               for p in pairs]
    ref_edits = [r[0] for r, _ in counted]
    cand_edits = [c[0] for _, c in counted]
    lengths = [r[1] for r, _ in counted]
    try:
        ref_rate, cand_rate = error_rate.corpus_rate(ref_edits, lengths), error_rate.corpus_rate(cand_edits, lengths)
    except ValueError as exc:
        raise UserError(f"task {task}: {exc}") from None
    (low95, high95), (low90, high90) = error_rate.paired_difference_cis(ref_edits, cand_edits, lengths)
    # per-utterance contributions to Δ (in rate units), whose mean is Δ: what the planner's variance is of
    unit = sum(lengths) / len(lengths)
    contributions = [(r - c) / unit for r, c in zip(ref_edits, cand_edits)]
    breakdown = {}
    for name, idx in _group_indices(pairs).items():
        units = sum(lengths[i] for i in idx) or 1
        ref_g, cand_g = sum(ref_edits[i] for i in idx) / units, sum(cand_edits[i] for i in idx) / units
        breakdown[name] = {"n": len(idx), "reference": 100.0 * ref_g, "candidate": 100.0 * cand_g,
                           "delta": 100.0 * (ref_g - cand_g),
                           "flips_ref_only": sum(ref_edits[i] < cand_edits[i] for i in idx),
                           "flips_cand_only": sum(cand_edits[i] < ref_edits[i] for i in idx)}
    return _Measured(
        binary=False,
        reference_score=100.0 * ref_rate,
        candidate_score=100.0 * cand_rate,
        reference_ci=points_interval(error_rate.rate_ci(ref_edits, lengths)),
        candidate_ci=points_interval(error_rate.rate_ci(cand_edits, lengths)),
        delta=100.0 * (ref_rate - cand_rate),
        # the bootstrap interval is of candidate - reference; flipped into the row's reference - candidate
        delta_ci=Interval(-100.0 * high95, -100.0 * low95),
        delta_ci90=Interval(-100.0 * high90, -100.0 * low90),
        p_value=error_rate.paired_p_value(ref_edits, cand_edits, lengths),
        # "reference right, candidate wrong" becomes: the candidate made more errors on this utterance
        flips_ref_only=sum(r < c for r, c in zip(ref_edits, cand_edits)),
        flips_cand_only=sum(c < r for r, c in zip(ref_edits, cand_edits)),
        mde=100.0 * error_rate.minimum_detectable_effect(ref_edits, cand_edits, lengths, alpha=alpha),
        flip_rate=sum(r != c for r, c in zip(ref_edits, cand_edits)) / len(pairs),
        diff_variance=float(np.var(contributions)),
        groups=breakdown,
        lower_is_better=True,
    )
