"""The report's tables, built once as strings for both templates: scores, per-task detail, the planner, errors and
faults, provenance, divergence, teacher forcing, perf, the A/A noise floor and sub-groups."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from ..analysis import plan
from ..analysis.compare import PairedTaskComparison
from ..analysis.comparison import Comparison
from ..records import JUDGING_COUNTS, ROLES
from . import charts
from .cells import Table, fmt_interval, fmt_number, fmt_p, fmt_percent, fmt_ratio, fmt_score, fmt_signed, fmt_small
from .facts import revision_text, side_label

PERF_ROWS = (  # (label, PerfSummary field, section of perf.perf_ratios)
    ("TTFT p50 (ms)", "ttft_ms_p50", "latency"),
    ("TTFT p99 (ms)", "ttft_ms_p99", "latency"),
    ("TPOT p50 (ms)", "tpot_ms_p50", "latency"),
    ("TPOT p99 (ms)", "tpot_ms_p99", "latency"),
    ("ITL p50 (ms)", "itl_ms_p50", "latency"),
    ("ITL p99 (ms)", "itl_ms_p99", "latency"),
    ("E2EL p50 (ms)", "e2el_ms_p50", "latency"),
    ("E2EL p99 (ms)", "e2el_ms_p99", "latency"),
    ("output tok/s", "output_tok_s", "throughput"),
    ("requests/s", "request_s", "throughput"),
)


CHARTED_PERF = ("ttft_ms_p50", "tpot_ms_p50", "itl_ms_p50", "e2el_ms_p50", "output_tok_s", "request_s")


BEYOND_CARD = "†"


def beyond_card_mark(manifest: Mapping[str, Any]) -> set[str]:
    """Tasks whose benchmark the target model's card does not list (their task files say `beyond_card: true`)."""
    return set((manifest.get("config") or {}).get("beyond_card") or ())


def comparison_table(comparison: Comparison, ref: str, cand: str, beyond_card: set[str]) -> Table:
    rows = []
    for t in comparison.tasks:
        rows.append([
            (f"{t.title} ↓" if t.lower_is_better else t.title) + (f" {BEYOND_CARD}" if t.task in beyond_card else ""),
            fmt_score(t.reference_score, t.reference_ci.low, t.reference_ci.high),
            fmt_score(t.candidate_score, t.candidate_ci.low, t.candidate_ci.high),
            fmt_signed(t.delta),
            fmt_interval(t.delta_ci.low, t.delta_ci.high),
            fmt_p(t.p_holm),
            f"{t.flips_ref_only}/{t.flips_cand_only}",
            t.verdict,
            t.incomplete_reason or t.rule,
        ])
    return Table(
        title="Scores",
        headers=["Metrics", ref, cand, "Δ", "95 % CI of Δ", "p (Holm)", "flips (−/+)", "verdict", "decided by"],
        rows=rows,
        note="Scores in points with their 95 % CI (Wilson for right/wrong items, bootstrap for graded ones); "
             "Δ = candidate − reference with its paired 95 % CI; flips: items only the reference (−) or only "
             "the candidate (+) scored higher on.  Decided by: the rule the row was judged against (equivalence "
             "±ε: the 90 % CI inside ±ε; non-inferiority −δ: the 90 % CI above −δ), or why faults made it "
             "incomplete.  Rows marked ↓ are corpus error rates (WER/CER, paired bootstrap over utterances): "
             "lower is better, Δ = reference − candidate, so a negative Δ is a loss there too, and flips count "
             "utterances where one side made fewer errors."
             + (f"  Rows marked {BEYOND_CARD} are beyond the model card: benchmarks the target model's card does "
                "not list (audio and video inputs), after the card's rows."
                if beyond_card & {t.task for t in comparison.tasks} else ""),
        verdict_column=7,
        row_classes=[t.verdict for t in comparison.tasks],
    )


def detail_table(comparison: Comparison) -> Table:
    rows = [[t.title, str(t.n), "binary" if t.binary else "graded", t.metric,
             fmt_interval(t.delta_ci90.low, t.delta_ci90.high), _claim(t.equivalent, t.equivalence_margin, "±"),
             _claim(t.non_inferior, t.non_inferiority_margin, "−"), fmt_number(t.mde), fmt_p(t.p_value),
             fmt_percent(t.answer_agreement), fmt_percent(t.output_agreement)]
            for t in comparison.tasks]
    return Table(
        title="Equivalence and power",
        headers=["Metrics", "n paired", "items", "metric", "90 % CI of Δ", "equivalent ±ε", "non-inferior −δ", "MDE",
                 "p (raw)", "same answer", "same output"],
        rows=rows,
        note="MDE: the smallest |Δ| (points) this many items detect with 80 % power at α = 0.05; a Δ below it "
             "is not evidence of no difference.",
    )


def _claim(shown: bool, margin: Optional[float], sign: str) -> str:
    if margin is None:
        return "not tested"
    return f"{'yes' if shown else 'no'} ({sign}{margin:g})"


def plan_table(comparison: Comparison) -> Table:
    return Table(
        title="What this run certifies, and what it would take",
        headers=["Metrics"] + plan.RUN_HEADERS[1:],
        rows=plan.stored_run_table(comparison),
        note="Certifies now: the tightest margins (points) whose test this run passes, ±ε for equivalence and −δ "
             "for non-inferiority.  Needs: the paired items that certify each rule with 80 % probability when "
             "the true Δ is 0 and items flip as often as here (repeats: sampled answers per item on these items, "
             "when the flips are sampling noise).  `flageval-lite plan` prints the same for a suite before a run.",
    )


def errors_table(comparison: Comparison, ref: str, cand: str) -> Table:
    rows = [[t.title, str(t.errors_reference), str(t.errors_candidate), str(t.unparsed_reference),
             str(t.unparsed_candidate), str(len(t.only_reference)), str(len(t.only_candidate))]
            for t in comparison.tasks]
    return Table(
        title="Errors and unparsed answers",
        headers=["Metrics", f"errors {ref}", f"errors {cand}", f"unparsed {ref}", f"unparsed {cand}",
                 f"only {ref}", f"only {cand}"],
        rows=rows,
        note="Errors are infrastructure failures (no answer after every retry): never scored, and left out of the "
             "paired numbers on both sides; unparsed: an answer came back but none could be extracted, scored 0; "
             "only …: items scored on one side only, left out of the paired numbers.  More than the allowed share "
             "of such items, or any on one side only, makes the row incomplete.",
    )


def _kinds(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} ×{n}" for kind, n in sorted(counts.items())) or "none"


def provenance_table(comparison: Comparison, manifest: Mapping[str, Any]) -> Optional[Table]:
    """Per task and source: dataset, configs, splits, revision; per task the items asked and their content hash."""
    stored = manifest.get("provenance") or {}
    if not stored:
        return None
    titles = {t.task: t.title for t in comparison.tasks}
    rows = []
    for task, row in stored.items():
        hashes = {h for h in (row.get("items_hash") or {}).values() if h}
        asked = "/".join(str(n) for n in (row.get("items") or {}).values())
        content = (next(iter(hashes))[:16] if len(hashes) == 1 else "differ") if hashes else ""
        for source in row.get("sources") or [{}]:
            rows.append([titles.get(task, task), source.get("dataset", ""), ", ".join(source.get("configs") or []),
                         ", ".join(source.get("splits") or []), revision_text(source),
                         source.get("revision_from", ""), asked, content])
    return Table(
        title="Data provenance",
        headers=["task", "dataset", "configs", "splits", "revision", "revision from", "items asked (ref/cand)",
                 "content hash"],
        rows=rows,
        note="Revision: as pinned in the task YAML; for a branch (`main`) the commit datasets read, `unresolved` "
             "when its cache names none; or the one a local copy (--data-dir) records.  Content hash: "
             "SHA-256 (first 16 hex digits; full in summary.json) over the sorted (item id, prompt hash) pairs asked; "
             "both sides, and two runs compared with `compare`, must agree or the comparison is refused.",
    )


def _side_task_rows(comparison: Comparison, manifest: Mapping[str, Any],
                    counts: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    cells: Callable[[Mapping[str, Any]], list[str]]) -> list[list[str]]:
    """One row per side and task of a role -> task -> counts mapping: the side, the task's title, then `cells`."""
    titles = {t.task: t.title for t in comparison.tasks}
    return [[side_label(manifest, role) if role in ROLES else role, titles.get(task, task), *cells(row)]
            for role, tasks in counts.items() for task, row in tasks.items()]


def faults_table(comparison: Comparison, manifest: Mapping[str, Any]) -> Optional[Table]:
    """Requests, retries and failures per side and task (the store's fault_counts), when any request failed."""
    faults = manifest.get("faults") or {}
    if not any(row["failed_attempts"] for tasks in faults.values() for row in tasks.values()):
        return None
    rows = _side_task_rows(comparison, manifest, faults, lambda row: [
        str(row["records"]), str(row["requests"]), str(row["retries"]), _kinds(row["failed_attempts"]),
        str(sum(row["errors"].values())), _kinds(row["errors"])])
    return Table(
        title="Faults and retries",
        headers=["side", "task", "answers", "requests", "retries", "failed requests by kind", "failed for good",
                 "failed for good by kind"],
        rows=rows,
        note="Failed requests are retried up to the run's max_attempts (other 4xx are not retried).  "
             "Answers: stored records (items × repeats).  Failed for good: items left out of the paired "
             "statistics on both sides, never scored; rerun the same command to ask exactly those again.  "
             "wrong_model: the server answered as another model; empty_choices: a body without choices.",
    )


def judging_table(comparison: Comparison, manifest: Mapping[str, Any]) -> Optional[Table]:
    """What the LLM judge did per side and judged task (manifest `judging`), when a task was judged."""
    judging = manifest.get("judging") or {}
    rows = _side_task_rows(comparison, manifest, judging, lambda row: [
        str(row[name]) for name in JUDGING_COUNTS])
    if not rows:
        return None
    return Table(
        title="LLM judge",
        headers=["side", "task", "answers graded", "judge runs", "re-asked", "gave up", "judge requests retried",
                 "no verdict"],
        rows=rows,
        note="Re-asked: answers whose grading got a reply without a score and was asked again, warmer, by the "
             "prompt style's rule; gave up: runs that never got a score and took the style's fallback (0.0 for "
             "the official and FlagEvalMM styles), which reads as a wrong answer, so a difference here between "
             "the sides can move the row without the answers differing.  Judge requests retried: failed requests "
             "sent again unchanged (never scored).  No verdict: answers the judge never graded (scorer errors, "
             "left out of the paired numbers).",
    )


def divergence_table(comparison: Comparison) -> Table:
    rows = []
    for t in comparison.tasks:
        d = t.divergence or {}
        tokens = d.get("logprobs") or {}
        shifts = d.get("finish_reason_shifts") or {}
        rows.append([
            t.title,
            fmt_percent(d.get("exact_output_agreement")),
            fmt_percent(t.answer_agreement),
            fmt_number(d.get("first_divergence_char_median"), 0),
            fmt_percent(d.get("first_divergence_relative_median")),
            fmt_number(d.get("length_shift_mean"), 1),
            ", ".join(f"{k} ×{v}" for k, v in shifts.items()) or "none",
            fmt_percent(tokens.get("top1_agreement")) if tokens else "n/a",
            fmt_number(tokens.get("kl_mean"), 4) if tokens else "n/a",
            str(tokens.get("hard_mismatches", "n/a")) if tokens else "n/a",
        ])
    return Table(
        title="Output divergence",
        headers=["Metrics", "same output", "same answer", "first divergence (char, median)",
                 "first divergence (relative)", "length shift (tokens, mean)", "finish-reason shifts",
                 "top-1 agreement", "KL (mean)", "hard mismatches"],
        rows=rows,
        note="Over paired items.  First divergence: where differing outputs part ways, as a character index and "
             "as a fraction of the longer output.  Top-1 agreement, KL and hard mismatches (a token outside the "
             "other side's top-k) need logprobs and read n/a without them.",
    )


def teacher_forced_table(comparison: Comparison) -> Optional[Table]:
    tf = comparison.teacher_forced
    if not tf:
        return None
    title = "Teacher-forced divergence"
    if tf.get("unsupported"):
        return Table(title=title, headers=["Metrics", "status"],
                     rows=[[t.title, "not measured"] for t in comparison.tasks],
                     note=f"Not measured: {tf['unsupported']}.  The mode needs vLLM's POST /tokenize and "
                          f"`prompt_logprobs` on /v1/completions (the embedded server has both).")
    noise = comparison.noise_floor.teacher_forced.get("tasks", {}) if comparison.noise_floor else {}
    aa_headers = ["A/A top-1 agreement", "A/A KL mean"] if noise else []
    rows = []
    for t in comparison.tasks:
        summary = tf.get("tasks", {}).get(t.task)
        if summary is None:
            continue
        aa = noise.get(t.task) or {}
        rows.append([t.title, str(summary["items"]), str(summary["positions"]), fmt_percent(summary["top1_agreement"]),
                     fmt_small(summary["kl_mean"]), fmt_small(summary["kl_p99"]), fmt_small(summary["kl_max"]),
                     fmt_small(summary["logprob_abs_diff_mean"]), fmt_small(summary["logprob_abs_diff_max"]),
                     fmt_percent(summary["reference_greedy"]), summary["worst_item"] or "n/a"]
                    + ([fmt_percent(aa.get("top1_agreement")), fmt_small(aa.get("kl_mean"))] if noise else []))
    failed = f"  {tf['failed']} selected item(s) could not be compared." if tf.get("failed") else ""
    return Table(
        title=title,
        headers=["Metrics", "items", "positions", "top-1 agreement", "KL mean", "KL p99", "KL max",
                 "|Δ logprob| mean", "|Δ logprob| max", "reference greedy", "worst item"] + aa_headers,
        rows=rows,
        note=f"Both servers scored the same token sequences (the reference's prompt and greedy completion) with "
             f"prompt_logprobs (top-{tf.get('top_k')}), so every completion position has the same context on both "
             f"sides and, unlike the output divergence above, nothing cascades.  KL(reference ‖ candidate) in nats "
             f"over the top-k plus the remaining mass; mean, p99 and max pooled over positions.  |Δ logprob|: of "
             f"the sequence's token.  Reference greedy: positions whose sequence token is the reference's own top-1 "
             f"(below 100 % where a prefill breaks a near-tie otherwise than decoding did, or where re-tokenised "
             f"text departs from the generated tokens).  Worst item: the largest KL.{failed}",
    )


def divergence_headline(comparison: Comparison) -> tuple[str, str]:
    """(status, why): do the outputs differ beyond the A/A noise floor (exact McNemar per task, Holm-adjusted)?
    status is "detected", "not shown" or "not tested"."""
    if comparison.noise_floor is None:
        return "not tested", ("without the A/A noise floor (`noise_floor: true`) differing outputs cannot be told "
                              "apart from the reference's own nondeterminism")
    tested = [t for t in comparison.tasks if t.noise_test]
    if not tested:
        return "not tested", "no task was paired in both the A/B and the A/A comparison"
    beyond = [t for t in tested if t.noise_test.get("beyond_noise")]
    ab_only = sum(t.noise_test["ab_only"] for t in tested)
    aa_only = sum(t.noise_test["aa_only"] for t in tested)
    counts = (f"over {sum(t.noise_test['n'] for t in tested)} items, outputs differed A/B but not A/A on {ab_only} "
              f"and A/A but not A/B on {aa_only}")
    if beyond:
        status = "detected"
        text = (f"on {len(beyond)} of {len(tested)} tasks ({', '.join(t.title for t in beyond)}; exact McNemar, "
                f"Holm-adjusted p ≤ {fmt_p(max(t.noise_test['p_holm'] for t in beyond))}): {counts}")
    else:
        status, text = "not shown", f"on any of {len(tested)} tasks: {counts}"
    top1 = [(tf.get("overall") or {}).get("top1_agreement")
            for tf in (comparison.teacher_forced, comparison.noise_floor.teacher_forced)]
    if None not in top1:
        text += f"; teacher-forced top-1 agreement {fmt_percent(top1[0])} (A/A {fmt_percent(top1[1])})"
    return status, text


def perf_tables(comparison: Comparison, ref: str, cand: str, backends: Mapping[str, Mapping[str, Any]],
                set_aside: Mapping[str, int]) -> list[tuple[str, Table, list[charts.PerfRow]]]:
    hardware = "; ".join(f"{b['label']} on {b['device']}, {b['parallelism']}" for b in backends.values())
    # A resumed run whose serve spec changed: the earlier spec's samples stay in the store, out of the comparison.
    older = "".join(f"  {n} sample(s) of an earlier {role} serve spec are kept in the store and not compared."
                    for role, n in set_aside.items() if n)
    out = []
    for load, roles in comparison.perf.items():
        ratios = comparison.perf_ratios.get(load) or {}
        rows, bars = [], []
        for label, name, section in PERF_ROWS:
            ref_value = getattr(roles["reference"], name) if "reference" in roles else None
            cand_value = getattr(roles["candidate"], name) if "candidate" in roles else None
            ratio = (ratios.get(section) or {}).get(name)
            gate = ""
            if name == "output_tok_s" and ratios.get("meets_throughput_gate") is not None:
                passed = "meets" if ratios["meets_throughput_gate"] else "FAILS"
                gate = f"{passed} ≥ {ratios.get('gate', comparison.perf_gate):g}"
            rows.append([label, fmt_number(ref_value), fmt_number(cand_value), fmt_ratio(ratio), gate])
            if name in CHARTED_PERF:
                bars.append(charts.PerfRow(label, ref_value, cand_value, f"ratio {fmt_ratio(ratio)} {gate}".strip()))
        requests = " / ".join(f"{roles[r].requests} ok in {roles[r].duration_s:.1f} s" for r in ROLES if r in roles)
        table = Table(
            title=f"Performance, {_load_title(load)}",
            headers=["metric", ref, cand, "candidate / reference", "gate"],
            rows=rows,
            note=f"Hardware: {hardware}.  Requests: {requests}.  Latencies: lower is better; throughputs: higher is better.  The gate "
                 f"asks the candidate's output tok/s to reach {comparison.perf_gate:.0%} of the reference's.{older}",
        )
        out.append((load, table, bars))
    return out


def _load_title(load: str) -> str:
    prefix, _, level = load.partition("@c")
    level, media, _ = level.partition("+")  # perf@c8+media: the image/audio load beside the text one
    if not level.isdigit():
        return load
    return f"concurrency {level}" + (", image/audio requests" if media else "")


def noise_table(comparison: Comparison) -> Optional[Table]:
    noise = comparison.noise_floor
    if noise is None:
        return None
    by_task = {t.task: t for t in noise.tasks}
    rows = []
    for t in comparison.tasks:
        aa: Optional[PairedTaskComparison] = by_task.get(t.task)
        rows.append([
            t.title,
            f"{fmt_signed(t.delta)} {fmt_interval(t.delta_ci.low, t.delta_ci.high)}",
            f"{fmt_signed(aa.delta)} {fmt_interval(aa.delta_ci.low, aa.delta_ci.high)}" if aa else "n/a",
            f"{t.flips_ref_only + t.flips_cand_only}",
            f"{aa.flips_ref_only + aa.flips_cand_only}" if aa else "n/a",
            fmt_percent(t.answer_agreement), fmt_percent(aa.answer_agreement) if aa else "n/a",
            fmt_percent(t.output_agreement), fmt_percent(aa.output_agreement) if aa else "n/a",
            _noise_test_cell(t.noise_test),
        ])
    return Table(
        title="Noise floor: A/B beside A/A",
        headers=["Metrics", "A/B Δ [95 % CI]", "A/A Δ [95 % CI]", "A/B flips", "A/A flips", "A/B same answer",
                 "A/A same answer", "A/B same output", "A/A same output", "outputs beyond A/A"],
        rows=rows,
        note="A/A: the reference compared with itself, asked again in another order and batch mix.  A/B "
             "differences no larger than A/A's come from run-to-run nondeterminism, not from the candidate.  "
             "Outputs beyond A/A: items whose output differed A/B only / A/A only, exact McNemar p (Holm-adjusted "
             "across tasks); \"yes\" when A/B differs more often at p < alpha.",
    )


def _noise_test_cell(test: Mapping[str, Any]) -> str:
    if not test:
        return "n/a"
    verdict = "yes" if test.get("beyond_noise") else "no"
    return f"{verdict} ({test['ab_only']}/{test['aa_only']}, p {fmt_p(test['p_holm'])})"


def group_tables(comparison: Comparison) -> list[Table]:
    out = []
    for t in comparison.tasks:
        unscored = getattr(t, "unscored_groups", None)  # a LiveBench release with tasks we cannot score
        if len(t.groups) < 2 and not unscored:
            continue
        rows = [[name, str(int(g["n"])), fmt_number(g["reference"]), fmt_number(g["candidate"]), fmt_signed(g["delta"]),
                 f"{int(g['flips_ref_only'])}/{int(g['flips_cand_only'])}"] for name, g in t.groups.items()]
        note = ""
        if t.micro:  # a macro headline: the micro accuracy beside it
            note = (f"Headline: macro average, the mean of these {len(t.groups)} group scores.  Micro (mean over all "
                    f"{t.n} items): {fmt_number(t.micro['reference'])} vs {fmt_number(t.micro['candidate'])}, "
                    f"Δ {fmt_signed(t.micro['delta'])}.")
        if unscored:
            note = (f"Not LiveBench's official average: {', '.join(unscored)} went unscored (no item scored on both "
                    "sides) and is left out of the headline.")
        out.append(Table(title=f"{t.title} by group", headers=["group", "n", "reference", "candidate", "Δ",
                                                                "flips (−/+)"], rows=rows, note=note))
    return out
