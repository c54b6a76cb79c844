"""`flageval-lite bisect RUN`: find the FlagGems operators behind a candidate/reference divergence.

The search (`find_culprits`) only needs `evaluate(ops) -> diverges`, so it is tested without servers. For a
stored run, `ServerRounds` is that function: it restarts the candidate from its stored serve spec with only `ops`
switched on (`flaggems.include`; everything else in the spec is kept), re-asks the disagreeing items through the
Runner into a separate run id (`<run>@bisect-<time>`, role `bisect-<k>` for restart k), and compares each answer
with the stored reference answer.

"Reproduces" means: at least one of the disagreeing items still gets an answer different from the reference's
(response text by default; with `by="answer"`, the extracted answer). The candidate with no FlagGems operator at
all is the reference's operator stack, so the empty set is taken not to reproduce and is never started.

Two search strategies, both starting with a verification restart with all N called operators: if the
divergence does not come back on a fresh candidate asked only the disagreeing items, it depends on something
else (batching, concurrency, nondeterminism) and the search stops there.

- `binary` (default; assumes that switching on more operators never removes a divergence): a binary search for
  the shortest prefix of the operator list that reproduces names one operator that is needed (the last of that
  prefix); the search repeats with that operator kept on until the kept operators reproduce by themselves. A single
  culprit costs at most ⌈log2 N⌉ + 2 restarts, k interacting operators about k·(⌈log2 N⌉ + 1) + 1, and no kept
  operator can be dropped.
- `ddmin` (no assumption): halving (keep the first half if it reproduces, else go to the second half untested,
  confirmed at the end; also ⌈log2 N⌉ + 2 for a single culprit), and when the confirmation fails, Zeller and
  Hildebrandt's delta debugging from the smallest set seen to reproduce: subsets, then complements, at growing
  granularity, down to a set from which no single operator can be removed.
Every subset is started at most once (answers are memoised).
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import UserError
from .records import FlagGemsSpec, GenParams, Item, Record, ServeSpec
from .store import Store

ROLE_PREFIX = "bisect-"
LOG_NAME = "bisect.jsonl"
BYS = ("text", "answer")
# Routes that can restrict FlagGems to a list of operators (FlagScale's patched vLLM cannot).
RESTRICTABLE_ROUTES = ("plugin", "fl", "embedded")

Evaluate = Callable[[tuple[str, ...]], bool]


# --------------------------------------------------------------------------- the search


@dataclass
class Round:
    index: int  # 1-based: the restart number
    phase: str  # all operators | binary search | halving | check | ddmin subset | ddmin complement
    ops: tuple[str, ...]
    diverged: bool
    detail: dict[str, Any] = field(default_factory=dict)  # what the evaluator adds (items, timings, ops called)


@dataclass
class SearchResult:
    universe: tuple[str, ...]
    culprits: tuple[str, ...]  # () when the divergence did not reproduce
    rounds: list[Round]
    reproduced: bool  # the divergence came back (with all operators, or assumed so without verification)
    minimal: bool  # no single operator can be dropped from `culprits` (proven by tests)
    complete: bool  # False: stopped by max_rounds; culprits is then the smallest set seen to reproduce

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _OutOfRounds(Exception):
    pass


class _Search:
    def __init__(self, universe: tuple[str, ...], evaluate: Evaluate, max_rounds: Optional[int],
                 on_round: Optional[Callable[[Round], None]]):
        self.evaluate, self.max_rounds, self.on_round = evaluate, max_rounds, on_round
        self.position = {op: k for k, op in enumerate(universe)}
        self.memo: dict[frozenset[str], bool] = {}
        self.rounds: list[Round] = []
        self.smallest: Optional[tuple[str, ...]] = None  # smallest set seen to reproduce

    def test(self, ops: tuple[str, ...], phase: str) -> bool:
        ops = tuple(sorted(ops, key=self.position.__getitem__))  # always in the universe's order
        key = frozenset(ops)
        if key in self.memo:
            return self.memo[key]
        if self.max_rounds is not None and len(self.rounds) >= self.max_rounds:
            raise _OutOfRounds
        diverged = bool(self.evaluate(ops))
        self.memo[key] = diverged
        record = Round(len(self.rounds) + 1, phase, ops, diverged)
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)
        if diverged and (self.smallest is None or len(ops) < len(self.smallest)):
            self.smallest = ops
        return diverged


def halves(ops: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    cut = (len(ops) + 1) // 2
    return tuple(ops[:cut]), tuple(ops[cut:])


def chunks(ops: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """`ops` cut into `n` consecutive, nearly equal parts."""
    bounds = [round(i * len(ops) / n) for i in range(n + 1)]
    return [tuple(ops[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def _ddmin(ops: tuple[str, ...], search: _Search) -> tuple[str, ...]:
    current, n = ops, 2
    while len(current) >= 2:
        parts = chunks(current, n)
        found = next((p for p in parts if search.test(p, "ddmin subset")), None)
        if found is not None:
            current, n = found, 2
            continue
        complements = [] if len(parts) == 2 else [tuple(op for op in current if op not in p) for p in parts]
        found = next((c for c in complements if search.test(c, "ddmin complement")), None)
        if found is not None:
            current, n = found, max(n - 1, 2)
            continue
        if n >= len(current):
            break
        n = min(len(current), 2 * n)
    return current


def _needed_prefix(search: _Search, kept: tuple[str, ...], candidates: tuple[str, ...]) -> int:
    """Smallest i such that kept + candidates[:i] reproduces, knowing that i = len(candidates) does."""
    low, high = 1, len(candidates)
    while low < high:
        middle = (low + high) // 2
        if search.test(kept + candidates[:middle], "binary search"):
            high = middle
        else:
            low = middle + 1
    return high


def _binary(universe: tuple[str, ...], search: _Search) -> tuple[str, ...]:
    kept: tuple[str, ...] = ()
    candidates = universe
    while True:
        i = _needed_prefix(search, kept, candidates)
        kept, candidates = kept + (candidates[i - 1],), candidates[: i - 1]
        # With nothing left before it, kept + candidates[:i] = kept was the set just seen to reproduce.
        if not candidates or search.test(kept, "check"):
            return tuple(op for op in universe if op in kept)


def _halving_then_ddmin(universe: tuple[str, ...], search: _Search, verified: bool) -> tuple[str, ...]:
    current, tested = universe, verified
    while len(current) > 1:
        first, second = halves(current)
        if search.test(first, "halving"):
            current, tested = first, True
        else:
            current, tested = second, False  # a single culprit must be here; confirmed below
    if tested or search.test(current, "check"):
        return current
    return _ddmin(search.smallest or universe, search)


STRATEGIES = ("binary", "ddmin")


def find_culprits(ops: Sequence[str], evaluate: Evaluate, *, strategy: str = "binary", verify_full: bool = True,
                  max_rounds: Optional[int] = None, on_round: Optional[Callable[[Round], None]] = None) -> SearchResult:
    """The smallest set of `ops` whose enabling reproduces the divergence (see the module docstring).

    `evaluate(subset)` gets a non-empty tuple in the order of `ops` and says whether the divergence reproduces.
    Without `verify_full` the whole set is assumed to reproduce (it is what the stored run showed)."""
    universe = tuple(dict.fromkeys(ops))
    if not universe:
        raise ValueError("nothing to bisect: no operators given")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    search = _Search(universe, evaluate, max_rounds, on_round)

    def result(culprits: tuple[str, ...], reproduced: bool = True, minimal: bool = True,
               complete: bool = True) -> SearchResult:
        return SearchResult(universe, culprits, search.rounds, reproduced, minimal, complete)

    try:
        if verify_full and not search.test(universe, "all operators"):
            return result((), reproduced=False, minimal=False)
        search.memo[frozenset(universe)] = True
        search.smallest = search.smallest or universe
        if strategy == "binary":
            return result(_binary(universe, search))
        return result(_halving_then_ddmin(universe, search, verify_full))
    except _OutOfRounds:
        return result(search.smallest or universe, minimal=False, complete=False)


# --------------------------------------------------------------------------- a stored run's divergence


@dataclass(frozen=True)
class Disagreement:
    task: str
    item_id: str
    reference: str  # the reference's response text, or its extracted answer (by="answer")
    candidate: str


def disagreements(store: Store, run_id: str, by: str = "text",
                  tasks: Optional[Sequence[str]] = None) -> list[Disagreement]:
    """Items whose candidate answer differs from the reference's; failed requests are left out."""
    if by not in BYS:
        raise UserError(f"bisect: --by must be one of {', '.join(BYS)}, not {by!r}")
    wanted = set(tasks) if tasks else None
    if by == "text":
        answers: dict[str, dict[tuple[str, str], str]] = {"reference": {}, "candidate": {}}
        for role in answers:
            for rec in store.records(run_id, role=role):
                if rec.ok and rec.repeat == 0:  # with repeats, the first one (as the report's texts)
                    answers[role][(rec.task, rec.item_id)] = rec.response_text
    else:
        answers = {role: {(s.task, s.item_id): s.extracted for s in store.scores(run_id, role=role)
                          if s.outcome != "error"} for role in ("reference", "candidate")}
    # In the tasks' own item order (records are stored as they finish, which varies from run to run).
    order = {(it["task"], it["item_id"]): k for k, it in enumerate(store.items(run_id))}
    out = []
    for key, ref in sorted(answers["reference"].items(), key=lambda kv: order.get(kv[0], len(order))):
        cand = answers["candidate"].get(key)
        if cand is not None and cand != ref and (wanted is None or key[0] in wanted):
            out.append(Disagreement(key[0], key[1], ref, cand))
    return out


def spec_from_stored(data: dict[str, Any]) -> ServeSpec:
    """The ServeSpec a run stored with `ServeSpec.to_dict()` (JSON turned its tuples into lists)."""
    fields = {f.name for f in dataclasses.fields(ServeSpec)}
    values = {k: v for k, v in data.items() if k in fields}
    fg = dict(values.get("flaggems") or {})
    values["flaggems"] = FlagGemsSpec(route=str(fg.get("route", "off")), include=tuple(fg.get("include") or ()),
                                      exclude=tuple(fg.get("exclude") or ()), record=bool(fg.get("record", True)))
    values["args"] = tuple(str(a) for a in values.get("args") or ())
    values["env"] = tuple((str(k), str(v)) for k, v in values.get("env") or ())
    return ServeSpec(**values)


def restrict(spec: ServeSpec, ops: Sequence[str]) -> ServeSpec:
    """`spec` with FlagGems limited to `ops`; everything else unchanged."""
    return dataclasses.replace(spec, flaggems=dataclasses.replace(spec.flaggems, include=tuple(ops)))


def check_bisectable(spec: ServeSpec) -> None:
    route = spec.flaggems.route
    if spec.engine == "external":
        raise UserError(f"bisect: the candidate {spec.name!r} is an external endpoint; bisecting restarts it with "
                        f"different operator sets, so it must be a server this harness starts")
    if route == "off":
        raise UserError(f"bisect: the candidate {spec.name!r} runs without FlagGems (route off); nothing to bisect")
    if route not in RESTRICTABLE_ROUTES:
        raise UserError(f"bisect: FlagGems route {route!r} of candidate {spec.name!r} cannot be limited to a list "
                        f"of operators (routes that can: {', '.join(RESTRICTABLE_ROUTES)})")


def called_ops(run_dir: Path, evidence: dict[str, Any]) -> tuple[list[str], str, list[str]]:
    """Registration names of the operators the candidate called, where they came from, and log names left out.

    Our calls log gives registration names (what include= takes); without it, FlagGems' op-log names are used
    where FlagGems registered an operator of that name."""
    from .servers.flaggems_hooks import read_calls

    names = sorted({entry["op"] for entry in read_calls(Path(run_dir) / "oplogs" / "candidate")})
    if names:
        return names, "calls log", []
    logged = sorted(evidence.get("ops_called") or ())
    registered = set(evidence.get("ops_registered") or ())
    if not registered:
        return logged, "FlagGems op log", []
    return ([n for n in logged if n in registered], "FlagGems op log",
            [n for n in logged if n not in registered])


def askable_tasks(names: set[str]) -> set[str]:
    """The tasks whose items can be asked again: native task specs (lm-eval and imported tasks have no messages)."""
    from .tasks import load_task

    out = set()
    for name in names:
        try:
            load_task(name)
        except UserError:
            continue
        out.add(name)
    return out


def params_from_record(params: dict[str, Any]) -> GenParams:
    values = dict(params)
    values["stop"] = tuple(values.get("stop") or ())
    values["extra_body"] = tuple((str(k), v) for k, v in values.get("extra_body") or ())
    return GenParams.from_dict(values)


def load_items(store: Store, run_id: str, wanted: Sequence[Disagreement]) -> tuple[dict[str, list[Item]],
                                                                                 dict[str, GenParams]]:
    """The items to re-ask, per task, from their task specs (the store keeps prompt text, not messages), checked
    against the stored prompt hashes; and each task's stored sampling parameters, which must be greedy."""
    from .config import load_run_config
    from .tasks import iter_items, load_task

    config = store.get_meta("config", {})
    data_dir, max_pixels = None, None
    source = config.get("source") or ""
    if source and Path(source).is_file():
        run_config = load_run_config(source)
        data_dir, max_pixels = run_config.data_dir or None, run_config.max_image_pixels
    ref_records = {(r.task, r.item_id): r for r in store.records(run_id, role="reference") if r.ok and r.repeat == 0}
    by_task: dict[str, set[str]] = {}
    for d in wanted:
        by_task.setdefault(d.task, set()).add(d.item_id)
    items: dict[str, list[Item]] = {}
    params: dict[str, GenParams] = {}
    for task, ids in by_task.items():
        task_params = {json.dumps(ref_records[(task, i)].params, sort_keys=True) for i in ids}
        if len(task_params) != 1:
            raise UserError(f"bisect: task {task}: the reference was asked with different parameters across items")
        params[task] = params_from_record(json.loads(task_params.pop()))
        if params[task].temperature != 0:
            raise UserError(f"bisect: task {task} was sampled at temperature {params[task].temperature:g}; a "
                            f"bisection compares answers, so it needs a greedy run (temperature 0)")
        try:
            spec = load_task(task)
        except UserError as exc:
            raise UserError(f"bisect: task {task}: cannot load its task spec to re-ask its items ({exc})") from None
        found = [item for item in iter_items(spec, limit=config.get("limit"), data_dir=data_dir,
                                             max_image_pixels=max_pixels) if item.item_id in ids]
        missing = ids - {item.item_id for item in found}
        if missing:
            raise UserError(f"bisect: task {task}: items {', '.join(sorted(missing))} are no longer in its data")
        for item in found:
            stored = ref_records[(task, item.item_id)].prompt_hash
            if item.prompt_hash() != stored:
                raise UserError(f"bisect: task {task} item {item.item_id}: its prompt changed since the run "
                                f"(hash {item.prompt_hash()} != {stored}); the comparison would be meaningless")
        items[task] = found
    return items, params


# --------------------------------------------------------------------------- restarting the candidate


StartServer = Callable[[ServeSpec, str, Path], Any]  # (spec, role, run_dir) -> a not yet started server


class ServerRounds:
    """`evaluate(ops)` over real servers: restart the candidate with `ops` only and re-ask the disagreeing items."""

    def __init__(self, *, store: Store, run_id: str, run_dir: Path, spec: ServeSpec, items: dict[str, list[Item]],
                 params: dict[str, GenParams], reference: dict[tuple[str, str], str], by: str, group: Any,
                 start_server: StartServer, concurrency: int = 8, request_timeout_s: float = 600.0,
                 quiet: bool = False):
        self.store, self.run_id, self.run_dir, self.spec = store, run_id, Path(run_dir), spec
        self.items, self.params, self.reference, self.by = items, params, reference, by
        self.group, self.start_server = group, start_server
        self.concurrency, self.request_timeout_s, self.quiet = concurrency, request_timeout_s, quiet
        self.bisect_run_id = f"{run_id}@bisect-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        self.count = 0
        self.details: list[dict[str, Any]] = []

    def __call__(self, ops: tuple[str, ...]) -> bool:
        from .pipeline import spec_identity
        from .runner import Job, Runner

        self.count += 1
        role = f"{ROLE_PREFIX}{self.count}"
        spec = restrict(self.spec, ops)
        self._say(f"bisect restart {self.count}: {len(ops)} operator(s) on: {', '.join(ops)}")
        started = time.monotonic()
        server = self.start_server(spec, role, self.run_dir)
        self.group.servers.append(server)  # stopped with the group on any exit, Ctrl-C included
        try:
            endpoint = dataclasses.replace(server.start(), spec_id=spec_identity(spec))
            startup_s = time.monotonic() - started
            runner = Runner(self.store, self.bisect_run_id, concurrency=self.concurrency,
                            request_timeout_s=self.request_timeout_s, progress=False)
            runner.supervisors = {role: server}
            jobs = [Job(endpoint=endpoint, task=task, items=items, params=self.params[task])
                    for task, items in self.items.items()]
            asyncio.run(runner.run_jobs(jobs))
            evidence = server.evidence
        finally:
            self.group.stop(server)
        answers = self._answers(role, endpoint.identity())
        diverged = sorted(f"{task}/{item_id}" for (task, item_id), ref in self.reference.items()
                          if answers.get((task, item_id)) != ref)
        self.details.append({"role": role, "items_diverged": diverged, "items": len(self.reference),
                             "ops_called": list(evidence.ops_called), "startup_s": round(startup_s, 2),
                             "wall_s": round(time.monotonic() - started, 2), "log": str(evidence.log_path)})
        self._say(f"  -> {'diverges' if diverged else 'agrees with the reference'} "
                  f"({len(diverged)}/{len(self.reference)} items differ), {time.monotonic() - started:.1f} s")
        return bool(diverged)

    def _answers(self, role: str, endpoint_id: str) -> dict[tuple[str, str], str]:
        records = [r for r in self.store.records(self.bisect_run_id, role=role) if r.endpoint_id == endpoint_id]
        failed = [r for r in records if not r.ok]
        if failed:
            raise UserError(f"bisect restart {self.count}: {len(failed)} of {len(records)} requests failed "
                            f"({failed[0].task}/{failed[0].item_id}: {failed[0].error_kind} {failed[0].error}); "
                            f"server log {self.run_dir / 'logs' / (role + '.log')}")
        if self.by == "text":
            return {(r.task, r.item_id): r.response_text for r in records}
        return self._extracted(records)

    def _extracted(self, records: list[Record]) -> dict[tuple[str, str], str]:
        from .scoring import score_task

        specs = self.store.get_meta("task_specs", {})
        out: dict[tuple[str, str], str] = {}
        for task in self.items:
            spec = specs.get(task) or {}
            stored = {it["item_id"]: it for it in self.store.items(self.run_id, task=task)}
            scores = score_task([r for r in records if r.task == task], stored, spec.get("scorer", ""),
                                spec.get("scorer_args") or {}, spec.get("group_by", ""))
            out.update({(s.task, s.item_id): s.extracted for s in scores})
        return out

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the command


def _default_start_server(spec: ServeSpec, role: str, run_dir: Path) -> Any:
    from .servers.lifecycle import start_server

    return start_server(spec, role, run_dir)


def bisect_run(run: str, runs_dir: Path = Path("runs"), reports_dir: Path = Path("reports"), *, by: str = "text",
               strategy: str = "binary", ops: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
               max_items: Optional[int] = None, max_rounds: Optional[int] = None, concurrency: Optional[int] = None,
               verify_full: bool = True, start_server: Optional[StartServer] = None,
               quiet: bool = False) -> dict[str, Any]:
    """Bisect the FlagGems operators of stored run `run`; writes reports/RUN/bisect.md, bisect.json,
    runs/RUN/bisect.jsonl and the run's `bisect` meta.  Returns what bisect.json holds."""
    from .pipeline import open_run
    from .servers.lifecycle import ServerGroup

    if strategy not in STRATEGIES:
        raise UserError(f"bisect: --strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    store, run_id, run_dir = open_run(run, Path(runs_dir))
    try:
        spec_data = (store.get_meta("specs", {}) or {}).get("candidate")
        if not spec_data:
            raise UserError(f"{run}: the run stores no candidate serve spec (meta 'specs')")
        spec = spec_from_stored(spec_data)
        check_bisectable(spec)
        evidence = (store.get_meta("servers", {}) or {}).get("candidate") or {}
        if ops:
            universe, source, left_out = list(dict.fromkeys(ops)), "--ops", []
        else:
            universe, source, left_out = called_ops(run_dir, evidence)
        if not universe:
            raise UserError(f"{run}: the candidate's evidence names no FlagGems operator it called (no calls log "
                            f"under {run_dir / 'oplogs' / 'candidate'}, no ops_called); pass --ops")
        found = disagreements(store, run_id, by, tasks)
        skipped = sorted({d.task for d in found} - askable_tasks({d.task for d in found}))
        found = [d for d in found if d.task not in skipped]
        if not found:
            raise UserError(f"{run}: no item's {'response text' if by == 'text' else 'extracted answer'} differs "
                            f"between reference and candidate"
                            f"{' in a task that can be asked again' if skipped else ''}: nothing to bisect")
        chosen = found[:max_items] if max_items else found
        items, params = load_items(store, run_id, chosen)
        reference = {(d.task, d.item_id): d.reference for d in chosen}
        config = store.get_meta("config", {})
        log_path = run_dir / LOG_NAME
        started = _dt.datetime.now().isoformat(timespec="seconds")
        with ServerGroup(run_dir) as group:
            rounds = ServerRounds(store=store, run_id=run_id, run_dir=run_dir, spec=spec, items=items, params=params,
                                  reference=reference, by=by, group=group,
                                  start_server=start_server or _default_start_server,
                                  concurrency=concurrency or int(config.get("concurrency") or 8), quiet=quiet)

            def log_round(r: Round) -> None:
                r.detail = rounds.details[-1]
                with open(log_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"bisect_run_id": rounds.bisect_run_id, "round": r.index, "phase": r.phase,
                                         "ops": list(r.ops), "diverged": r.diverged, **r.detail,
                                         "time": time.time()}) + "\n")

            result = find_culprits(sorted(universe), rounds, strategy=strategy, verify_full=verify_full,
                                   max_rounds=max_rounds, on_round=log_round)
        summary = {
            "run_id": run_id, "bisect_run_id": rounds.bisect_run_id, "candidate": spec.name,
            "route": spec.flaggems.route, "by": by, "strategy": strategy, "started": started,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"), "ops_source": source,
            "ops_left_out": left_out, "tasks_left_out": skipped, "items": [f"{d.task}/{d.item_id}" for d in chosen],
            "disagreeing_items": len(found), **result.to_dict(),
        }
        summary = json.loads(json.dumps(summary, default=str))  # as bisect.json holds it (lists, not tuples)
        paths = write_report(summary, Path(reports_dir) / run_id)
        summary["report"] = str(paths["md"])
        store.set_meta("bisect", {k: summary[k] for k in ("culprits", "reproduced", "minimal", "complete", "by",
                                                          "strategy", "universe", "bisect_run_id", "report")}
                       | {"rounds": len(result.rounds), "items": len(chosen)})
        return summary
    finally:
        store.close()


def bisect_command(run: str, runs_dir: Path = Path("runs"), reports_dir: Path = Path("reports"), **options: Any) -> int:
    """CLI entry: run the bisection, print its outcome and files; 0 when the search finished, 1 when stopped early."""
    summary = bisect_run(run, runs_dir, reports_dir, **options)
    print(f"bisect: {outcome_text(summary)}")
    print(f"md: {summary['report']}")
    print(f"json: {Path(summary['report']).with_name('bisect.json')}")
    return 0 if summary["complete"] else 1


def outcome_text(summary: dict[str, Any]) -> str:
    restarts = f"{len(summary['rounds'])} restart(s) over {len(summary['universe'])} operator(s)"
    if not summary["reproduced"]:
        return (f"the divergence did not reproduce with all operators on ({restarts}): it depends on something "
                f"other than the FlagGems operator set")
    culprits = ", ".join(summary["culprits"])
    if not summary["complete"]:
        return f"stopped after {restarts}; smallest set seen to reproduce: {culprits}"
    kind = "culprit" if len(summary["culprits"]) == 1 else "operators that together reproduce it"
    return f"{kind}: {culprits} ({restarts})"


def write_report(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "bisect.md", "json": out_dir / "bisect.json"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    lines = [f"# FlagGems bisection: {summary['run_id']}", "",
             f"**{outcome_text(summary)}**", "",
             f"- candidate: {summary['candidate']} (FlagGems route {summary['route']}); search: {summary['strategy']}",
             f"- operators searched: {len(summary['universe'])} from the {summary['ops_source']}: "
             f"{', '.join(summary['universe'])}",
             f"- items re-asked: {len(summary['items'])} of {summary['disagreeing_items']} whose "
             f"{'response text' if summary['by'] == 'text' else 'extracted answer'} differed: "
             f"{', '.join(summary['items'])}",
             "- reproduces = at least one of these items still answers differently from the stored reference",
             f"- answers stored under run id `{summary['bisect_run_id']}`, one role per restart",
             f"- started {summary['started']}, finished {summary['finished']}"]
    if summary["tasks_left_out"]:
        lines.append(f"- tasks left out (no task spec to ask them again): {', '.join(summary['tasks_left_out'])}")
    if summary["ops_left_out"]:
        lines.append(f"- left out (FlagGems op-log names that are not registration names, no calls log): "
                     f"{', '.join(summary['ops_left_out'])}")
    if summary["reproduced"] and summary["complete"] and not summary["minimal"]:
        lines.append("- the result was not confirmed minimal")
    lines += ["", "| restart | phase | operators on | count | outcome | items differing | start s | total s |",
              "|---:|---|---|---:|---|---:|---:|---:|"]
    for r in summary["rounds"]:
        d = r.get("detail") or {}
        outcome = "diverges" if r["diverged"] else "agrees"
        lines.append(f"| {r['index']} | {r['phase']} | {', '.join(r['ops'])} | {len(r['ops'])} | {outcome} | "
                     f"{len(d.get('items_diverged', []))}/{d.get('items', '?')} | {d.get('startup_s', '—')} | "
                     f"{d.get('wall_s', '—')} |")
    paths["md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths
