"""The analysis stage's one entry: a stored run -> its Comparison (`analyse`), and the stored facts the report
states beside it (provenance, error kinds, perf samples set aside).

It reads only the store: the scores of each side, the first repeat's records (texts for divergence), the
reference's A/A pass or repeats (noise floor), the perf waves' timings and the teacher-forced logprobs."""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Optional

from ..records import AA_ROLE, BAD_ITEM, ENDPOINTS_META, PERF_TASK_PREFIX, ROLES, SCORER_FAULTS, Record
from ..runner.store import Store, StoredItems
from ..runner.teacher_forced import META_KEY
from ..tasks import provenance
from . import teacher_forced
from .comparison import compare_run
from .perf import timing_sample
from .stats import DecisionRule


def stored_rules(store: Store) -> tuple[dict[str, Any], dict[str, DecisionRule]]:
    """The run's default rule (compare_run's margin, release_gate, max_error_rate) and each task's rule, as stored by
    the run; a run stored before per-task rules has only the defaults."""
    config = store.get_meta("config", {})
    gate = config.get("release_gate", 5.0)
    defaults = {"margin": config.get("margin", 1.0),
                # runs stored before non-inferiority was a test switched the old gate off with an infinite one
                "release_gate": None if gate is not None and math.isinf(gate) else gate,
                "max_error_rate": config.get("max_error_rate", 0.02)}
    return defaults, {name: DecisionRule(**rule) for name, rule in (config.get("rules") or {}).items()}


def comparison_inputs(side_a: tuple[Store, str, str], side_b: tuple[Store, str, str],
                      rules: Optional[dict[str, DecisionRule]] = None) -> list[dict[str, Any]]:
    """Pair the scores of (store, run_id, role) A as reference with those of B as candidate, per task of A; `rules`
    gives a task its own decision rule (the others get compare_run's defaults)."""
    store_a, run_a, role_a = side_a
    store_b, run_b, role_b = side_b
    out = []
    for name, spec in store_a.get_meta("task_specs", {}).items():
        items = StoredItems(store_a, run_a, name)
        out.append({"task": name, "title": spec["title"], "metric": spec.get("metric", "accuracy"),
                    "rule": (rules or {}).get(name),
                    "reference": store_a.scores(run_a, role=role_a, task=name),
                    "candidate": store_b.scores(run_b, role=role_b, task=name),
                    "records": {"reference": first_repeats(store_a, run_a, role_a, name),
                                "candidate": first_repeats(store_b, run_b, role_b, name)},
                    "items": items})
    return out


def first_repeats(store: Store, run_id: str, role: str, task: str) -> list[Record]:
    """The records of a task's first repeat: those the Scores take their texts from."""
    return [r for r in store.records(run_id, role=role, task=task) if r.repeat == 0]


def noise_inputs(store: Store, run_id: str, rules: Optional[dict[str, DecisionRule]] = None) -> list[dict[str, Any]]:
    """Per task, the A/A sample: the reference against its separate second pass (`noise_floor`), or else, for a
    task asked at least twice, its first repeat against its second (the same stack, another seed: under
    sampling the floor of seed-to-seed variation).  Tasks with neither are left out."""
    separate = {}
    if store.scores(run_id, role=AA_ROLE):
        separate = {row["task"]: row for row in comparison_inputs((store, run_id, "reference"),
                                                                  (store, run_id, AA_ROLE), rules) if row["candidate"]}
    out = []
    for name, spec in store.get_meta("task_specs", {}).items():
        repeats = store.repeat_scores(run_id, "reference", task=name)
        if name in separate:
            out.append(separate[name])
        elif len(repeats) >= 2:
            out.append({"task": name, "title": spec["title"], "metric": spec.get("metric", "accuracy"),
                        "rule": (rules or {}).get(name), "reference": repeats[0], "candidate": repeats[1]})
    return out


def _perf_records(store: Store, run_id: str) -> Iterator[tuple[Record, bool]]:
    """The perf records, each with whether it comes from its role's current endpoint identity (runs stored
    before ENDPOINTS_META existed: all do)."""
    current = store.get_meta(ENDPOINTS_META) or {}
    for rec in store.records(run_id):
        if rec.task.startswith(PERF_TASK_PREFIX):
            yield rec, rec.endpoint_id == current.get(rec.role, rec.endpoint_id)


def perf_samples(store: Store, run_id: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """role -> perf task -> timing samples of the synthetic load, from the role's current endpoint identity only:
    the timings of another serve spec (a resumed run whose spec changed) measure another server."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rec, current in _perf_records(store, run_id):
        if current:
            out.setdefault(rec.role, {}).setdefault(rec.task, []).append(timing_sample(rec))
    return out


def perf_set_aside(store: Store, run_id: str) -> dict[str, int]:
    """role -> perf samples of an earlier endpoint identity, kept in the store and left out of the comparison."""
    out: dict[str, int] = {}
    for rec, current in _perf_records(store, run_id):
        if not current:
            out[rec.role] = out.get(rec.role, 0) + 1
    return out


def asked_items(store: Store, run_id: str, role: str, task: str) -> dict[str, set[str]]:
    return provenance.asked(store.records(run_id, role=role, task=task))


def run_provenance(store: Store, run_id: str, roles: Iterable[str] = ROLES) -> dict[str, Any]:
    """task -> its sources (as stored when the run started) and, per role, how many items were asked and their
    items_hash (tasks/provenance.py)."""
    sources = store.get_meta("provenance") or {}
    out = {}
    for task in store.get_meta("task_specs", {}):
        asked = {role: asked_items(store, run_id, role, task) for role in roles}
        out[task] = {"sources": sources.get(task, []),
                     "items": {role: len(prompts) for role, prompts in asked.items()},
                     "items_hash": {role: provenance.items_hash((item, h) for item, hashes in prompts.items()
                                                               for h in hashes)
                                    for role, prompts in asked.items()}}
    return out


def check_asked_alike(side_a: tuple[Store, str, str], side_b: tuple[Store, str, str], names: tuple[str, str],
                      every_item: bool) -> None:
    """Refuse (UserError naming the task) to pair two sides that were asked different questions."""
    (store_a, run_a, role_a), (store_b, run_b, role_b) = side_a, side_b
    if store_a is not store_b:  # the two roles of one run share its provenance
        provenance.check_same_revisions((names[0], store_a.get_meta("provenance") or {}),
                                        (names[1], store_b.get_meta("provenance") or {}),
                                        "compare runs of the same dataset commits")
    for task in store_a.get_meta("task_specs", {}):
        provenance.check_same_items(task, (names[0], asked_items(store_a, run_a, role_a, task)),
                                    (names[1], asked_items(store_b, run_b, role_b, task)), every_item)


def analyse(store: Store, run_id: str) -> Any:
    """The run's comparison under the decision rules stored with it."""
    check_asked_alike((store, run_id, "reference"), (store, run_id, "candidate"), ("the reference", "the candidate"),
                      every_item=False)
    tasks = list(store.get_meta("task_specs", {}))
    defaults, rules = stored_rules(store)
    noise = None
    if aa_inputs := noise_inputs(store, run_id, rules):
        tf_noise = {}
        if AA_ROLE in (store.get_meta(META_KEY) or {}).get("status", {}):
            tf_noise = teacher_forced.stored_comparison(store, run_id, "reference", AA_ROLE, tasks)
        noise = compare_run(aa_inputs, **defaults, teacher_forced=tf_noise)
    # Infrastructure errors are left out of the paired sample (compare_run's default), never scored 0.
    return compare_run(comparison_inputs((store, run_id, "reference"), (store, run_id, "candidate"), rules),
                       **defaults, perf=perf_samples(store, run_id), noise_floor=noise,
                       teacher_forced=teacher_forced.stored_comparison(store, run_id, "reference", "candidate", tasks))


def error_kinds(store: Store, run_id: str) -> dict[tuple[str, str, str], int]:
    """(role, task, error kind) -> records that failed for good; `bad_item` counts items instead, those the runner
    stored as such and those whose gold the scorer could not read (their records are answers), and so do the
    scorer's own faults (`judge`, `sandbox`, `environment`: answers it could not score)."""
    counts = {key: n for key, n in store.error_counts(run_id).items() if key[2] != BAD_ITEM}
    score_kinds = (BAD_ITEM, *SCORER_FAULTS.values())
    for score in store.scores(run_id):
        kind = score.error.partition(":")[0] if score.outcome == "error" else ""
        if kind in score_kinds:
            key = (score.role, score.task, kind)
            counts[key] = counts.get(key, 0) + 1
    return counts


def judging(store: Store, run_id: str, roles: Iterable[str] = ROLES) -> dict[str, dict[str, dict[str, int]]]:
    """role -> task -> the LLM judge's counts (scoring/judge.py tally_judging), over every repeat, for the tasks a
    judge graded."""
    from ..scoring.judge import tally_judging

    out: dict[str, dict[str, dict[str, int]]] = {}
    for role in roles:
        repeated = [score for scores in store.repeat_scores(run_id, role).values() for score in scores]
        tasks_repeated = {score.task for score in repeated}
        by_task: dict[str, list[dict[str, Any]]] = {}
        for score in repeated + [s for s in store.scores(run_id, role=role) if s.task not in tasks_repeated]:
            by_task.setdefault(score.task, []).append(score.detail)
        counts = {task: tally_judging(details) for task, details in by_task.items()}
        if judged := {task: row for task, row in counts.items() if row["graded"] or row["no_verdict"]}:
            out[role] = judged
    return out


def sides_provenance(a: dict[str, Any], b: dict[str, Any], role_a: str, role_b: str) -> dict[str, Any]:
    """Two runs' provenance as one, run A's side as the reference and run B's as the candidate; a source that run B
    read at another revision (one not a commit, else the compare was refused) carries it as `candidate_revision`."""
    revisions_b = provenance.source_revisions({task: row["sources"] for task, row in b.items()})

    def sources(task: str, row: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for source in row["sources"]:
            other = revisions_b.get((task, source.get("dataset", "")), source.get("revision", ""))
            out.append(source if other == source.get("revision", "") else {**source, "candidate_revision": other})
        return out

    return {task: {"sources": sources(task, row),
                   "items": {"reference": row["items"][role_a], "candidate": b.get(task, {}).get("items", {}).get(role_b)},
                   "items_hash": {"reference": row["items_hash"][role_a],
                                  "candidate": b.get(task, {}).get("items_hash", {}).get(role_b)}}
            for task, row in a.items()}
