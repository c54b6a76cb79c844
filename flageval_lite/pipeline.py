"""The whole run: config -> servers -> requests -> records -> scores -> comparison -> report.

Each step only consumes what the previous one stored, so a run can be resumed (`--run-id`), its
report re-rendered (`report RUN`) or two stored runs compared (`compare RUN_A RUN_B`) without
touching a server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from . import __version__
from .analysis.analyse import (analyse, check_asked_alike, comparison_inputs, error_kinds, judging,
                               perf_set_aside, run_provenance, sides_provenance, stored_rules)
from .analysis.comparison import compare_run
from .analysis.stats import DecisionRule
from .config.run import RunConfig, task_rule
from .config.serve import replica_specs
from .errors import ConfigError, UserError
from .interop.lmeval import is_lmeval_task, run_lmeval_task
from .records import (AA_ROLE, ENDPOINTS_META, PERF_TASK_PREFIX, PERF_WARMUP_PREFIX, ROLES, Endpoint, GenParams, Item,
                      ServeSpec, stable_hash)
from .report.render import render_report
from .runner import teacher_forced
from .runner.jobs import Job
from .runner.perf_load import MEDIA_LOAD_SUFFIX, block_reversed, perf_items, perf_media, perf_media_items
from .runner.run_dir import inside, new_run_id, open_run, write_manifest_file
from .runner.runner import Runner
from .runner.store import RunLock, Store
from .scoring.apply import judge_prompt_of, score_run
from .secrets import redact
from .serving.engines import build_launch
from .serving.evidence import check_candidate, check_reference
from .serving.lifecycle import Server, ServerGroup
from .serving.placement import plan_placement
from .tasks import cached_item_count, iter_items, load_suite, load_task, provenance

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    run_id: str
    run_dir: Path
    report_dir: Path
    files: dict[str, Path]
    verdict: str
    exit_code: int


HISTORY_KEYS = ("config", "specs", "task_specs", "placement", "servers", "replicas")


def select_tasks(config: RunConfig) -> list[Any]:
    """Native task specs of the run (lm-eval tasks, `lmeval:<name>`, are run by lm-eval itself)."""
    if not config.tasks:
        return load_suite(config.suite)
    return [load_task(t) for t in config.tasks if not is_lmeval_task(t)]


def task_params(spec: Any, max_tokens_cap: Optional[int] = None,
                sampling: Optional[dict[str, Any]] = None) -> GenParams:
    """The task's generation parameters, with the run's cap on max_tokens and its `sampling` overrides."""
    params = spec.generation if isinstance(spec.generation, GenParams) else GenParams(**(spec.generation or {}))
    if max_tokens_cap and params.max_tokens > max_tokens_cap:
        params = dataclasses.replace(params, max_tokens=max_tokens_cap)
    if sampling:
        params = dataclasses.replace(params, **sampling)
    return params


def spec_identity(spec: ServeSpec) -> str:
    """What was started, minus where, how many and how patiently: stable across restarts on new ports, across
    replica counts (any replica's answer is the backend's) and across placements (which set the memory share)."""
    keep = redact(spec.to_dict())  # a key is not part of what runs (and its hash is not stored either)
    for volatile in ("port", "base_url", "replicas", "gpu_memory_utilization", "startup_timeout_s", "warmup",
                     "max_restarts", "source", "name"):
        keep.pop(volatile, None)
    return stable_hash(keep)


def check_side(role: str, evidence: Any, spec: ServeSpec) -> None:
    """The reference must show no FlagGems, the candidate the FlagGems its spec asks for."""
    if role == "reference":
        check_reference(evidence)
    else:
        check_candidate(evidence, spec)


def live_replicas(runner: Runner, role: str, replicas: list[Endpoint]) -> list[Endpoint]:
    """The replicas of `role` that the runner has not given up on (the A/A repeat asks the reference's)."""
    roles = {role, AA_ROLE} if role == "reference" else {role}
    dropped = {f["base_url"] for f in runner.replica_failures if f["role"] in roles}
    return [e for e in replicas if e.base_url not in dropped]


# Items preflight builds per task, at most, looking for one that is not a bad item.
PREFLIGHT_ITEMS = 20


def check_not_all_bad(spec: Any, items: Iterable[Item]) -> None:
    """A bad item is that item's error and the run goes on (docs/report.md), but a task whose first items are all
    bad (every one, when it has fewer than PREFLIGHT_ITEMS) has a broken spec or data, not a broken row: refused
    before any server starts, with the first item's one-line error."""
    first = ""
    for count, item in enumerate(items, start=1):
        if not item.error:
            return
        first = first or item.error
        if count == PREFLIGHT_ITEMS:
            break
    if first:
        raise UserError(f"{first} (and every one of the first {count} item(s) of {spec.name} fails: the task spec "
                        f"or its data is at fault, not one row)")


class Pipeline:
    def __init__(self, config: RunConfig, run_id: Optional[str] = None, runs_root: Path = Path("runs"),
                 reports_root: Path = Path("reports"), quiet: bool = False):
        self.config = config
        try:
            self.tasks = select_tasks(config)
        except ConfigError:
            raise  # names its task file already
        except UserError as exc:  # an unknown task or suite: blame the flag or field that named it
            raise UserError(f"{config.origin('tasks' if config.tasks else 'suite')}: {exc}") from None
        self.lmeval_tasks = [t for t in config.tasks if is_lmeval_task(t)]
        self.run_id = run_id or new_run_id(config.suite if not config.tasks else "tasks")
        self.run_dir = inside(runs_root, self.run_id, "--run-id")
        self.report_dir = inside(reports_root, self.run_id, "--run-id")
        self.quiet = quiet

    # ----------------------------------------------------------------- stages

    def preflight(self) -> None:
        """Fail before any server starts: every task must yield its first item, a judge must be set, every server's
        command line must build (a contradiction in a spec would otherwise surface only when its turn comes)."""
        judged = [spec.title for spec in self.tasks if spec.scorer == "mmvet_judge"]
        if judged and not self.config.judge.get("base_url"):
            raise UserError(f"{', '.join(judged)} needs an LLM judge: set `judge: {{base_url: ..., model: ...}}` "
                            f"in the run config ({self.config.source})")
        if judged:
            judge_prompt_of(self.config.judge)  # an unreadable prompt source stops the run before any server starts
        coded = [spec.title for spec in self.tasks
                 if spec.scorer in ("livebench", "livebench_coding", "livebench_bigcode")]
        if coded:  # scoring runs model-written code: a sandbox that cannot start here would error every such item
            from .scoring.sandbox import SandboxError, check_sandbox
            try:
                check_sandbox()
            except SandboxError as exc:
                raise UserError(f"{', '.join(coded)} runs model code in a sandbox, which cannot start here: {exc}") \
                    from None
        unknown = sorted(set(self.config.task_rules) - {t.name for t in self.tasks})
        if unknown:
            raise UserError(f"{self.config.source}: task_rules names {', '.join(unknown)}, not a task of this run")
        self.rules()
        self.provenance()  # a local copy of another revision than the pinned one is refused here
        for spec in self.tasks:
            check_not_all_bad(spec, self.items(spec))
        for role, backend in (("reference", self.config.reference), ("candidate", self.config.candidate)):
            for one in replica_specs(backend):
                build_launch(one, role, self.run_dir, port=0)

    def provenance(self) -> dict[str, list[dict[str, Any]]]:
        """Each task's sources: dataset, configs, splits and revision (tasks/provenance.py)."""
        return {spec.name: provenance.task_provenance(spec, self.config.data_dir or None) for spec in self.tasks}

    def rules(self) -> dict[str, DecisionRule]:
        """Each task's decision rule (config.task_rule); a contradiction is a ConfigError before anything starts."""
        return {spec.name: task_rule(self.config, spec.name, spec.decision) for spec in self.tasks}

    def items(self, spec: Any) -> Iterator[Item]:
        return iter_items(spec, limit=self.config.limit, data_dir=self.config.data_dir or None,
                          max_image_pixels=self.config.max_image_pixels)

    def run_lmeval(self, endpoint: Endpoint, store: Store) -> None:
        # One role at a time: lm-eval reseeds the global RNGs, so parallel runs would interfere.
        for task in self.lmeval_tasks:
            run_lmeval_task(task, endpoint, endpoint.role, self.run_id, store, limit=self.config.limit,
                            include_path=self.config.lmeval_include_path or None,
                            num_concurrent=self.config.concurrency, cache_dir=self.run_dir,
                            samples_dir=self.run_dir / "lmeval" / endpoint.role)

    def expected_items(self, spec: Any) -> Optional[int]:
        count = cached_item_count(spec, self.config.data_dir or None)
        if count is None or self.config.limit is None:
            return count
        return min(count, self.config.limit)

    def params(self, spec: Any) -> GenParams:
        return task_params(spec, self.config.max_tokens_cap, self.config.sampling)

    def repeats(self, spec: Any) -> int:
        return self.config.repeats or spec.repeats

    def jobs_for(self, replicas: list[Endpoint]) -> list[Job]:
        return [Job(endpoint=replicas[0], task=spec.name, items=self.items(spec), replicas=tuple(replicas),
                    params=self.params(spec), total=self.expected_items(spec), repeats=self.repeats(spec))
                for spec in self.tasks]

    def run(self) -> RunResult:
        self.preflight()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir, self.run_id):
            store = Store(self.run_dir / "results.sqlite")
            try:
                provenance.check_same_revisions((f"the stored run {self.run_id}", store.get_meta("provenance") or {}),
                                                ("this rerun", self.provenance()), "start a new run id")
                self.serve_and_ask(store)
                self.score(store)
                return self.report(store)
            finally:
                store.close()

    def write_manifest(self, store: Store, placement: Any) -> None:
        """The new run's config and specs replace the stored ones only once its servers are up: a rerun that fails
        to start (port taken, endpoint down, bad option) leaves the stored run and `report RUN` as they were.
        The replaced ones are kept in the `history` meta key."""
        cfg = self.config
        if store.get_meta("config") is not None:
            previous = {key: store.get_meta(key) for key in HISTORY_KEYS}
            store.set_meta("history", store.get_meta("history", []) + [previous])
        store.set_meta("placement", dataclasses.asdict(placement))
        store.set_meta("config", {
            "run_id": self.run_id, "suite": cfg.suite, "tasks": [t.name for t in self.tasks], "limit": cfg.limit,
            "beyond_card": [t.name for t in self.tasks if t.beyond_card],
            "placement": cfg.placement, "margin": cfg.margin, "release_gate": cfg.release_gate,
            "max_error_rate": cfg.max_error_rate,
            "rules": {name: dataclasses.asdict(rule) for name, rule in self.rules().items()},
            "concurrency": cfg.concurrency, "noise_floor": cfg.noise_floor, "source": cfg.source,
            "repeats": cfg.repeats, "sampling": dict(cfg.sampling),
            "judge_prompt": judge_prompt_of(cfg.judge) if any(t.scorer == "mmvet_judge" for t in self.tasks) else "",
            "flageval_lite": __version__, "host": platform.node(), "python": platform.python_version(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        })
        store.set_meta("specs", {"reference": cfg.reference.to_dict(), "candidate": cfg.candidate.to_dict()})
        store.set_meta("provenance", self.provenance())
        store.set_meta("task_specs", {t.name: {"title": t.title, "scorer": t.scorer,
                                               "scorer_args": dict(t.scorer_args or {}),
                                               "metric": t.metric, "group_by": t.group_by or "",
                                               "repeats": self.repeats(t),
                                               "repeat_aggregate": t.repeat_aggregate}
                                      for t in self.tasks})

    def serve_and_ask(self, store: Store) -> None:
        cfg = self.config
        placement = plan_placement(cfg.reference, cfg.candidate, cfg.placement,
                                   allow_fallback=cfg.allow_fallback)
        runner = Runner(store, self.run_id, concurrency=cfg.concurrency, request_timeout_s=cfg.request_timeout_s,
                        max_attempts=cfg.max_attempts, progress=not self.quiet and sys.stderr.isatty())
        evidence: dict[str, list[Any]] = {}  # role -> evidence of each replica
        specs = {"reference": placement.apply(cfg.reference, "reference"),
                 "candidate": placement.apply(cfg.candidate, "candidate")}

        with ServerGroup(self.run_dir) as group:
            if placement.mode == "concurrent":
                servers = {role: group.start_all(specs[role], role) for role in ROLES}
                self.write_manifest(store, placement)
                self.ask(runner, servers, specs, store)
                evidence = {role: [s.evidence for s in replicas] for role, replicas in servers.items()}
            else:
                for role in ROLES:
                    servers = {role: group.start_all(specs[role], role)}
                    if role == ROLES[0]:
                        self.write_manifest(store, placement)
                    self.ask(runner, servers, specs, store)
                    evidence[role] = [s.evidence for s in servers[role]]
                    for server in servers[role]:
                        group.stop(server)
        # `servers` keeps the single-server form (replica 0) that older runs have; `replicas` lists them all.
        store.set_meta("servers", {role: evs[0].to_dict() for role, evs in evidence.items()})
        store.set_meta("replicas", {role: [ev.to_dict() for ev in evs] for role, evs in evidence.items()})
        store.set_meta("replica_failures", runner.replica_failures)
        for role in ROLES:
            for ev in evidence[role]:
                check_side(role, ev, specs[role])

    def ask(self, runner: Runner, servers: dict[str, list[Server]], specs: dict[str, ServeSpec],
            store: Store) -> None:
        """The main run on the started servers of one or both roles, then the stages that follow it."""
        for role, replicas in servers.items():
            # The warm-up request already ran the model: a stack that is not what the spec asks for is refused
            # now rather than after a whole run (`serve_and_ask` checks again with everything the run called).
            if specs[role].warmup:
                for server in replicas:
                    check_side(role, server.evidence, specs[role])
        # Every replica gets the role's spec identity: records are the same whichever replica answered.
        endpoints = {role: [dataclasses.replace(s.endpoint, spec_id=spec_identity(specs[role])) for s in replicas]
                     for role, replicas in servers.items()}
        runner.supervisors = {role: {e.base_url: s for e, s in zip(endpoints[role], servers[role])}
                              for role in servers}
        # Which identity's perf samples the comparison reads (replicas share it): the one started now.
        store.set_meta(ENDPOINTS_META, {**(store.get_meta(ENDPOINTS_META) or {}),
                                        **{role: replicas[0].identity() for role, replicas in endpoints.items()}})
        jobs = [job for replicas in endpoints.values() for job in self.jobs_for(replicas)]
        asyncio.run(runner.run_jobs(jobs, interleave=self.config.interleave))
        for role, replicas in endpoints.items():
            # lm-eval talks to one base_url: the first replica still up.
            self.run_lmeval(live_replicas(runner, role, replicas)[0], store)
        self.after_main(runner, endpoints, store)

    def after_main(self, runner: Runner, endpoints: dict[str, list[Endpoint]], store: Store) -> None:
        """A/A repeat of the reference, teacher forcing and the perf sweep, one backend at a time.  Replicas
        given up on during the run are left out."""
        cfg = self.config
        if cfg.noise_floor and "reference" in endpoints:
            repeat = [dataclasses.replace(e, role=AA_ROLE) for e in live_replicas(runner, "reference",
                                                                                   endpoints["reference"])]
            # Another order and concurrency: a different batch composition on the same stack.
            # A task asked at least twice has its A/A sample in the reference's own repeats (see noise_inputs).
            jobs = [Job(endpoint=repeat[0], task=spec.name, items=block_reversed(self.items(spec)),
                        replicas=tuple(repeat), params=self.params(spec))
                    for spec in self.tasks if self.repeats(spec) < 2]
            runner.supervisors[AA_ROLE] = runner.supervisors["reference"]
            asyncio.run(runner.run_jobs(jobs, concurrency=max(1, cfg.concurrency // 2)))
        # Teacher forcing and perf use one replica per role: replicas are identical, and perf then measures
        # one server on each side, comparable whatever the two sides' replica counts.
        first = {role: live_replicas(runner, role, replicas)[0] for role, replicas in endpoints.items()}
        if cfg.teacher_forced.enabled and self.tasks:
            self.teacher_force(first, store)
        if cfg.perf.enabled:
            params = GenParams(max_tokens=cfg.perf.output_tokens, stream=True,
                               extra_body=(("ignore_eos", True),))
            images, audios = perf_media({spec.modality for spec in self.tasks})
            loads = {"": lambda level, warm_up: perf_items(cfg, level, warm_up)}
            if images or audios:
                loads[MEDIA_LOAD_SUFFIX] = lambda level, warm_up: perf_media_items(cfg, level, images, audios, warm_up)
            for endpoint in first.values():
                for level in cfg.perf.concurrency:
                    for suffix, load in loads.items():
                        # One unmeasured wave first: a JIT compiler (FlagGems' Triton kernels) compiles for each new
                        # batch shape inside the first requests, seconds that no steady-state request pays.
                        for prefix, warm_up in ((PERF_WARMUP_PREFIX, True), (PERF_TASK_PREFIX, False)):
                            job = Job(endpoint=endpoint, task=f"{prefix}{level}{suffix}", items=load(level, warm_up),
                                      params=params)
                            asyncio.run(runner.run_jobs([job], concurrency=level))

    def teacher_force(self, endpoints: dict[str, Endpoint], store: Store) -> None:
        """Build the token sequences while the reference is up, score them on each backend while it is up (and
        again on the reference for the A/A floor); the compare stage pairs the stored scores."""
        cfg = self.config
        # Every role needs the sources: a media item's sequence is scored from its messages, which stay out of the
        # store; they come from the reference's stored answers, there whichever roles are up now.
        sources = self.teacher_forced_sources(store)
        ordered = {role: endpoints[role] for role in ROLES if role in endpoints}
        started = time.monotonic()
        statuses = asyncio.run(teacher_forced.run_stage(
            store, self.run_id, ordered, sources, cfg.teacher_forced.top_k, cfg.concurrency, cfg.request_timeout_s))
        if cfg.noise_floor and "reference" in endpoints:
            repeat = {AA_ROLE: dataclasses.replace(endpoints["reference"], role=AA_ROLE)}
            statuses |= asyncio.run(teacher_forced.run_stage(
                store, self.run_id, repeat, sources, cfg.teacher_forced.top_k, max(1, cfg.concurrency // 2),
                cfg.request_timeout_s))
        log.info("teacher forcing (%s) took %.1f s: %s", ", ".join(statuses), time.monotonic() - started, statuses)

    def teacher_forced_sources(self, store: Store) -> list[teacher_forced.TFSource]:
        """The first `teacher_forced.items` items of each task that the reference answered (items with images,
        audio or video included: they are scored through the chat route, see runner/teacher_forced.py)."""
        sources = []
        for spec in self.tasks:
            answered = {r.item_id: r.response_text for r in store.records(self.run_id, role="reference",
                                                                          task=spec.name)
                        if not r.error and r.response_text and r.repeat == 0}
            extra_body = dict(task_params(spec).extra_body)
            picked = 0
            for item in self.items(spec):
                if picked == self.config.teacher_forced.items:
                    break
                if item.item_id in answered:
                    sources.append(teacher_forced.TFSource(
                        spec.name, item.item_id, item.messages, answered[item.item_id],
                        extra_body.get("chat_template_kwargs") or {}, extra_body.get("mm_processor_kwargs") or {}))
                    picked += 1
        return sources

    def score(self, store: Store) -> None:
        score_run(store, self.run_id, self.config.judge)

    def report(self, store: Store) -> RunResult:
        return render_run(store, self.run_id, self.run_dir, self.report_dir)


# --------------------------------------------------------------------------- stored-run helpers


def render_run(store: Store, run_id: str, run_dir: Path, report_dir: Path) -> RunResult:
    config = store.get_meta("config", {})
    comparison = analyse(store, run_id)
    manifest = {"run_id": run_id, "config": config, "specs": store.get_meta("specs", {}),
                "servers": store.get_meta("servers", {}), "replicas": store.get_meta("replicas", {}),
                "replica_failures": store.get_meta("replica_failures", []),
                "placement": store.get_meta("placement", {}),
                "errors": {"/".join(map(str, k)): v for k, v in error_kinds(store, run_id).items()},
                "faults": store.fault_counts(run_id), "judging": judging(store, run_id),
                "repeats": {name: {"k": spec["repeats"], "aggregate": spec.get("repeat_aggregate", "avg")}
                            for name, spec in store.get_meta("task_specs", {}).items() if spec.get("repeats", 1) > 1},
                "bisect": store.get_meta("bisect", {}), "opcheck": store.get_meta("opcheck", {}),
                "perf_set_aside": perf_set_aside(store, run_id), "provenance": run_provenance(store, run_id)}
    write_manifest_file(run_dir, manifest)
    files = render_report(comparison, manifest, report_dir)
    return RunResult(run_id, run_dir, report_dir, files, comparison.verdict, comparison.exit_code)


def rerender(run: str, runs_root: Path = Path("runs"), reports_root: Path = Path("reports")) -> RunResult:
    store, run_id, run_dir = open_run(run, runs_root)
    try:
        return render_run(store, run_id, run_dir, reports_root / run_id)
    finally:
        store.close()


def compare_stored_runs(run_a: str, run_b: str, role_a: str = "reference", role_b: str = "candidate",
                        runs_root: Path = Path("runs"), reports_root: Path = Path("reports"),
                        margin: Optional[float] = None) -> RunResult:
    """Compare role A of one stored run with role B of another (e.g. two single-stack runs), under the decision rules
    stored with run A; `margin` replaces every task's equivalence margin."""
    store_a, id_a, dir_a = open_run(run_a, runs_root)
    store_b, id_b, _ = open_run(run_b, runs_root)
    try:
        if not store_b.scores(id_b, role=role_b):
            raise UserError(f"{run_b}: no scores for role {role_b!r}")
        check_asked_alike((store_a, id_a, role_a), (store_b, id_b, role_b), (f"{run_a} ({role_a})", f"{run_b} ({role_b})"),
                          every_item=True)
        defaults, rules = stored_rules(store_a)
        if margin is not None:
            defaults["margin"] = margin
            try:
                rules = {name: dataclasses.replace(rule, equivalence=margin) for name, rule in rules.items()}
            except ValueError as exc:
                raise UserError(f"--margin {margin:g}: {exc}") from None
        comparison = compare_run(comparison_inputs((store_a, id_a, role_a), (store_b, id_b, role_b), rules),
                                 **defaults)
        specs_a, specs_b = store_a.get_meta("specs", {}), store_b.get_meta("specs", {})
        servers_a, servers_b = store_a.get_meta("servers", {}), store_b.get_meta("servers", {})
        run_id = f"{id_a}__vs__{id_b}"
        manifest = {"run_id": run_id, "config": {**store_a.get_meta("config", {}), "compared": [run_a, run_b]},
                    "specs": {"reference": specs_a.get(role_a, {}), "candidate": specs_b.get(role_b, {})},
                    "servers": {"reference": servers_a.get(role_a, {}), "candidate": servers_b.get(role_b, {})},
                    "faults": {"reference": store_a.fault_counts(id_a).get(role_a, {}),
                               "candidate": store_b.fault_counts(id_b).get(role_b, {})},
                    "judging": {"reference": judging(store_a, id_a, [role_a]).get(role_a, {}),
                                "candidate": judging(store_b, id_b, [role_b]).get(role_b, {})},
                    "provenance": sides_provenance(run_provenance(store_a, id_a, [role_a]),
                                                   run_provenance(store_b, id_b, [role_b]), role_a, role_b)}
        files = render_report(comparison, manifest, reports_root / run_id)
        return RunResult(run_id, dir_a, reports_root / run_id, files, comparison.verdict, comparison.exit_code)
    finally:
        store_a.close()
        store_b.close()
