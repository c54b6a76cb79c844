"""Report stage: Comparison + run manifest -> report.md, report.html (one offline file), summary.json.

Every table is built once here as strings and rendered by both templates, so the Markdown and the
HTML can never disagree.  The HTML carries its CSS, its SVG charts and its image thumbnails inline
(data URLs only) and a Content-Security-Policy that forbids any network fetch; model text is
escaped by jinja2's autoescape.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import jinja2

from ..analysis.comparison import Comparison
from ..records import ROLES
from ..secrets import redact
from . import charts
from .cells import fmt_number, fmt_percent
from .facts import backend_facts, hardware_warnings, run_facts, server_warnings, side_label
from .tables import (beyond_card_mark, comparison_table, detail_table, divergence_headline, divergence_table,
                     errors_table, faults_table, group_tables, judging_table, noise_table, perf_tables, plan_table,
                     provenance_table, teacher_forced_table)

VERDICT_TEXT = {
    "consistent": "every row meets its decision rule (equivalence ±ε or non-inferiority −δ)",
    "regression": "the candidate is worse",
    "improvement": "the candidate is better",
    "inconclusive": "neither the decision rule nor a difference is shown",
    "incomplete": "infrastructure errors took answers out of a task's paired sample: rerun to re-ask them",
}
EXIT_CODES_TEXT = "0 consistent, 1 regression, 3 inconclusive, 4 incomplete"


def build_context(comparison: Comparison, manifest: Mapping[str, Any]) -> dict[str, Any]:
    ref, cand = side_label(manifest, "reference"), side_label(manifest, "candidate")
    backends = {role: backend_facts(manifest, role) for role in ROLES}
    perf = perf_tables(comparison, ref, cand, backends, manifest.get("perf_set_aside") or {})
    return {
        "comparison": comparison,
        "reference_label": ref,
        "candidate_label": cand,
        "backends": list(backends.values()),
        "hardware_warnings": hardware_warnings(backends),
        "server_warnings": server_warnings(backends),
        "divergence_headline": divergence_headline(comparison),
        "facts": run_facts(comparison, manifest),
        "scores": comparison_table(comparison, ref, cand, beyond_card_mark(manifest)),
        "details": detail_table(comparison),
        "plan": plan_table(comparison),
        "exit_codes_text": EXIT_CODES_TEXT,
        "errors": errors_table(comparison, ref, cand),
        "faults": faults_table(comparison, manifest),
        "judging": judging_table(comparison, manifest),
        "provenance": provenance_table(comparison, manifest),
        "error_kinds": dict(manifest.get("errors") or {}),
        "divergence": divergence_table(comparison),
        "noise": noise_table(comparison),
        "teacher_forced": teacher_forced_table(comparison),
        "groups": group_tables(comparison),
        "perf": perf,
        "verdict_text": VERDICT_TEXT,
        "drilldown": comparison.drilldown,
        "titles": {t.task: t.title for t in comparison.tasks},
        "verdicts": {t.task: t.verdict for t in comparison.tasks},
        "disagreements": {t.task: t.answer_disagreements for t in comparison.tasks},
        "forest": charts.forest_plot(_forest_rows(comparison), comparison.margin or 0.0,
                                     comparison.release_gate),
        "flips": charts.flip_bars([charts.FlipRow(t.title, t.flips_ref_only, t.flips_cand_only)
                                   for t in comparison.tasks]),
        "perf_charts": {load: charts.perf_bars(bars, ref, cand) for load, _table, bars in perf},
    }


def _forest_rows(comparison: Comparison) -> list[charts.ForestRow]:
    noise = {t.task: t for t in comparison.noise_floor.tasks} if comparison.noise_floor else {}
    rows = []
    for t in comparison.tasks:
        aa = noise.get(t.task)
        rows.append(charts.ForestRow(t.title, t.delta, t.delta_ci.low, t.delta_ci.high, t.verdict,
                                     (aa.delta, aa.delta_ci.low, aa.delta_ci.high) if aa else None))
    return rows


# --------------------------------------------------------------------------- rendering


# `](` is what makes a link; a bare [43.1, 56.9] interval stays as it is.
_MD_SPECIAL = re.compile(r"[\\`*|]|\](?=\()|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# What markdown would read as HTML: a tag (`<b`, `</`, `<!--`, `<?`) or an entity (`&amp;`); "<0.001" is text.
_HTML_SPECIAL = re.compile(r"<(?=[A-Za-z/!?])|&(?=#?\w+;)")


def _md_cell(text: Any) -> str:
    """Text from specs, tasks and datasets as literal markdown: HTML tags and entities neutralised, markdown
    syntax (emphasis, code, links, table pipes) backslash-escaped, one line.  Underscores inside words
    (`demo_mcq`) stay."""
    text = _HTML_SPECIAL.sub(lambda m: {"<": "&lt;", "&": "&amp;"}[m.group(0)], str(text))
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text).replace("\r", " ").replace("\n", " ")


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("flageval_lite.report", "templates"), autoescape=autoescape,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["md"] = _md_cell
    env.filters["num"] = fmt_number
    env.filters["pct"] = fmt_percent
    return env


def summary_dict(comparison: Comparison, manifest: Mapping[str, Any]) -> dict[str, Any]:
    backends = {role: backend_facts(manifest, role) for role in ROLES}
    return {"verdict": comparison.verdict, "exit_code": comparison.exit_code, "comparison": comparison.to_dict(),
            "divergence_beyond_noise": dict(zip(("status", "detail"), divergence_headline(comparison))),
            "hardware_warnings": hardware_warnings(backends),
            "server_warnings": server_warnings(backends),
            "faults": manifest.get("faults") or {},
            "judging": manifest.get("judging") or {},
            "manifest": dict(manifest)}


def render_report(comparison: Comparison, manifest: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html and summary.json into `out_dir`; returns {"md", "html", "json"} paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = redact(manifest)
    context = build_context(comparison, manifest)
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html", "json": out_dir / "summary.json"}
    paths["md"].write_text(_environment(False).get_template("report.md.j2").render(**context), encoding="utf-8")
    paths["html"].write_text(_environment(True).get_template("report.html.j2").render(**context), encoding="utf-8")
    summary = summary_dict(comparison, manifest)
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return paths
