"""Command line: `flageval-lite run | compare | report | plan | tasks`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError
from .secrets import scrub, scrub_logging


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="start both backends, run the tasks, compare and write the report")
    p.add_argument("--config", help="run config YAML (default: embedded reference vs candidate)")
    p.add_argument("--suite", help="task suite: demo, omni, vision, text")
    p.add_argument("--tasks", help="comma-separated task names (instead of a suite)")
    p.add_argument("--limit", type=int, help="deterministic subset of N items per task")
    p.add_argument("--reference", help="serve spec name or path for the reference backend")
    p.add_argument("--candidate", help="serve spec name or path for the candidate backend")
    p.add_argument("--placement", choices=["sequential", "concurrent"])
    p.add_argument("--concurrency", type=int, help="requests in flight per backend")
    p.add_argument("--margin", type=float, help="equivalence margin in points (TOST)")
    p.add_argument("--data-dir", help="local copies of datasets, laid out as <dir>/<hub id>/...")
    p.add_argument("--noise-floor", action="store_true", default=None, help="also run an A/A repeat of the reference")
    p.add_argument("--repeats", type=int, help="ask every item K times per side (compared as avg@K)")
    p.add_argument("--run-id", help="resume or name a run (runs/<run-id>)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--gate", action="store_true",
                   help="exit with the verdict's code (0 consistent, 1 regression, 3 inconclusive, 4 incomplete)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (CI, logs)")


def cmd_run(args: argparse.Namespace) -> int:
    from .config.run import load_run_config
    from .pipeline import Pipeline

    config = load_run_config(args.config, suite=args.suite, tasks=args.tasks, limit=args.limit,
                             reference=args.reference, candidate=args.candidate, placement=args.placement,
                             concurrency=args.concurrency, margin=args.margin, data_dir=args.data_dir,
                             noise_floor=args.noise_floor, repeats=args.repeats)
    result = Pipeline(config, run_id=args.run_id, runs_root=Path(args.runs_dir),
                      reports_root=Path(args.reports_dir), quiet=args.quiet).run()
    return _print_result(result, args.gate)


def _print_result(result, gate: bool) -> int:
    print(f"verdict: {result.verdict}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return result.exit_code if gate else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import rerender

    return _print_result(rerender(args.run, Path(args.runs_dir), Path(args.reports_dir)), args.gate)


def cmd_compare(args: argparse.Namespace) -> int:
    from .pipeline import compare_stored_runs

    result = compare_stored_runs(args.run_a, args.run_b, role_a=args.role_a, role_b=args.role_b,
                                 runs_root=Path(args.runs_dir), reports_root=Path(args.reports_dir),
                                 margin=args.margin)
    return _print_result(result, args.gate)


def cmd_plan(args: argparse.Namespace) -> int:
    from .analysis import plan

    if args.run:
        from .analysis.analyse import analyse
        from .runner.run_dir import open_run

        store, run_id, _ = open_run(args.run, Path(args.runs_dir))
        try:
            headers, rows = plan.RUN_HEADERS, plan.stored_run_table(analyse(store, run_id))
        finally:
            store.close()
        print(f"run {run_id}: items needed to certify each rule at the observed flip rate (true Δ = 0, 80 % power)")
    else:
        from .config.run import load_run_config, task_rule
        from .pipeline import select_tasks
        from .tasks import cached_item_count

        if not 0 < args.flip_rate < 1:
            raise UserError(f"--flip-rate must lie in (0, 1), got {args.flip_rate}")
        config = load_run_config(args.config, suite=args.suite, tasks=args.tasks, data_dir=args.data_dir)
        specs = select_tasks(config)
        headers, rows = plan.ASSUMED_HEADERS, plan.assumed_table([(spec.title, cached_item_count(spec, config.data_dir or None),
                                    task_rule(config, spec.name, spec.decision)) for spec in specs], args.flip_rate)
        print(f"suite {config.suite if not config.tasks else ','.join(config.tasks)}: items needed to certify each "
              f"rule at a flip rate of {100 * args.flip_rate:g} % (true Δ = 0, 80 % power)")
    print(plan.format_table(headers, rows))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import list_tasks

    def cell(value) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(value)
        return "not cached" if value is None else str(value)

    rows = list_tasks(data_dir=args.data_dir)
    headers = ["name", "title", "modality", "scorer", "suites", "items"]
    table = [[cell(r.get(h)) for h in headers] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


def _names(value: Optional[str]) -> Optional[list[str]]:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


def cmd_bisect(args: argparse.Namespace) -> int:
    from .diagnose.bisect import bisect_command

    return bisect_command(args.run, Path(args.runs_dir), Path(args.reports_dir), by=args.by, strategy=args.strategy,
                          ops=_names(args.ops), tasks=_names(args.tasks), max_items=args.max_items,
                          max_rounds=args.max_rounds, concurrency=args.concurrency, verify_full=not args.no_verify,
                          resume=args.resume, triton_cache=Path(args.triton_cache) if args.triton_cache else None,
                          startup_timeout_s=args.startup_timeout, quiet=args.quiet)


def cmd_ops(args: argparse.Namespace) -> int:
    from .diagnose.opcheck import ops_command

    return ops_command(args.run, Path(args.runs_dir), Path(args.reports_dir), dtypes=_names(args.dtypes),
                       calls_per_op=args.calls_per_op, gate=args.gate, timing_repeats=args.timing)


def cmd_import(args: argparse.Namespace) -> int:
    from .interop.importers import import_command

    return import_command(args.path_a, args.path_b, args.format, args.labels, args.runs_dir, args.reports_dir,
                          gate=args.gate, margin=args.margin)


class _Parser(argparse.ArgumentParser):
    """Bad flags as one line naming the flag (argparse would print its usage block first), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: command line: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flageval-lite", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run(sub)
    p = sub.add_parser("report", help="re-render the report of a stored run without re-running it")
    p.add_argument("run", help="run id or run directory")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--gate", action="store_true")
    p = sub.add_parser("compare", help="compare two stored runs (RUN_A's role A against RUN_B's role B)")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--role-a", default="reference")
    p.add_argument("--role-b", default="candidate")
    p.add_argument("--margin", type=float, help="equivalence margin in points for every task (default: as stored "
                                                "with RUN_A)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--gate", action="store_true")
    p = sub.add_parser("plan", help="items (or repeats) each task needs to certify its decision rule: from a stored "
                                    "run's flip rates, or for a suite from an assumed flip rate")
    p.add_argument("run", nargs="?", help="run id or run directory (omit to plan a suite)")
    p.add_argument("--config", help="run config YAML whose decision rules to plan for (without RUN)")
    p.add_argument("--suite", help="suite to plan (without RUN; default: the config's)")
    p.add_argument("--tasks", help="comma-separated task names (without RUN)")
    p.add_argument("--flip-rate", type=float, default=0.05, help="assumed share of items that flip (without RUN)")
    p.add_argument("--data-dir", help="local datasets, for item counts (without RUN)")
    p.add_argument("--runs-dir", default="runs")
    p = sub.add_parser("tasks", help="list tasks and suites, with item counts where the data is local")
    p.add_argument("--data-dir", help="local copies of datasets, laid out as <dir>/<hub id>/...")
    p = sub.add_parser("import", help="compare per-sample outputs of two runs made by lm-eval, lmms-eval, VLMEvalKit, "
                                      "FlagEvalMM, EvalScope or inspect-ai")
    p.add_argument("path_a")
    p.add_argument("path_b")
    # importers.FORMATS, spelled out: importing the module here would slow every command's start
    p.add_argument("--format", choices=["lmeval", "lmms-eval", "vlmevalkit", "flagevalmm", "evalscope", "inspect"])
    p.add_argument("--labels", default="A,B", help="names of the two runs in the report")
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--gate", action="store_true")
    p = sub.add_parser("bisect", help="restart the candidate with subsets of its FlagGems operators to find the "
                                      "ones behind a divergence")
    p.add_argument("run")
    p.add_argument("--by", choices=["text", "answer"], default="text", help="what counts as diverging")
    p.add_argument("--strategy", choices=["binary", "ddmin"], default="binary")
    p.add_argument("--ops", help="comma-separated operators to search (default: those the candidate called)")
    p.add_argument("--tasks", help="comma-separated tasks whose disagreeing items are re-run")
    p.add_argument("--max-items", type=int)
    p.add_argument("--max-rounds", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the full-set check before searching")
    p.add_argument("--resume", action="store_true",
                   help="keep the restarts an earlier, interrupted bisection of this run finished (bisect-state.json)")
    p.add_argument("--triton-cache", help="TRITON_CACHE_DIR for every restart, unless the spec or environment sets "
                                          "one (default: RUN/triton-cache)")
    p.add_argument("--startup-timeout", type=float, help="seconds a restart may take to be ready before it counts as "
                                                         "a crash at start (default: the spec's startup_timeout_s)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    p = sub.add_parser("ops", help="replay the candidate's FlagGems operators against PyTorch and float64 (GPU)")
    p.add_argument("run")
    p.add_argument("--dtypes", help="comma-separated dtypes (default: bfloat16,float16,float32)")
    p.add_argument("--calls-per-op", type=int, default=3)
    p.add_argument("--gate", action="store_true", help="exit 1 when an operator is outside FlagGems' tolerance")
    p.add_argument("--timing", type=int, nargs="?", const=20, default=0, metavar="N",
                   help="also time each replayed call N times (default 20) under both kernels: which one is slow")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    return parser


COMMANDS = {"run": cmd_run, "report": cmd_report, "compare": cmd_compare, "plan": cmd_plan, "tasks": cmd_tasks,
            "import": cmd_import,
            "bisect": cmd_bisect, "ops": cmd_ops}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    scrub_logging()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "rerun with --resume" if args.command == "bisect" else "rerun with the same --run-id"
        print(f"interrupted: finished answers are stored; {again} to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
