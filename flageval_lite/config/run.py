"""Run configuration: which two backends, which tasks, and how to judge them.

A run config is a YAML file (see `serve/compare.yaml`); every field has a default, so
`flageval-lite run --suite demo` works with none.  Backends are serve-spec names (files under
`serve/`), paths, or a list of names of which the first one that can run on this machine is used.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from ..analysis.stats import DecisionRule
from ..errors import ConfigError
from ..records import ROLES, ServeSpec
from ..schema import build, checked, convert
from ..secrets import remember
from ..tasks.spec import parse_decision
from .serve import device_ids, load_serve_spec, replica_specs

DEFAULT_REFERENCE = "embedded_fp32"
# On a CUDA machine with FlagGems the candidate is the FlagGems stack; on CPU, bfloat16 stands in.
DEFAULT_CANDIDATE = ("embedded_flaggems", "embedded_bf16")
PLACEMENTS = ("sequential", "concurrent")
# Suites whose inputs the default text model cannot take get embedded defaults that can (a tiny random-weights
# omni model; see docs/qwen3-omni.md for the real stack): suite -> (reference, candidate alternatives).
_OMNI_BACKENDS = ("embedded_omni_fp32", ("embedded_omni_flaggems", "embedded_omni_bf16"))
SUITE_DEFAULT_BACKENDS = {"omni": _OMNI_BACKENDS, "omni-av": _OMNI_BACKENDS}


@dataclass
class PerfConfig:
    """A fixed synthetic load (vLLM `bench serve` style) run against each backend, one at a time."""

    enabled: bool = True
    concurrency: tuple[int, ...] = checked((1, 8), low=1, high=4096, nonempty=True)
    requests: int = checked(16, low=1)
    prompt_words: int = checked(64, low=1)
    output_tokens: int = checked(32, low=1)


@dataclass
class TeacherForcedConfig:
    """Score the reference's greedy token sequences on both backends (vLLM `prompt_logprobs`), see
    flageval_lite/analysis/teacher_forced.py."""

    enabled: bool = True
    items: int = checked(20, low=1)  # per task: the first items the reference answered
    top_k: int = checked(5, low=1, high=20)  # prompt_logprobs per position (vLLM's --max-logprobs, 20 by default)


@dataclass
class JudgeConfig:
    """The LLM judge of MM-Vet v2 (`scoring/judge.JudgeClient`'s arguments, less its cache)."""

    base_url: str = ""
    model: str = ""
    api_key: str = "EMPTY"
    # Requests per judge call when the request itself fails (HTTP error, timeout): an infrastructure fault, never
    # a score. A reply without a score is asked again by the prompt style's own rule (docs/scoring.md).
    max_retries: int = checked(3, low=1)
    timeout_s: float = checked(120.0, above=0)
    max_tokens: int = checked(256, low=1)
    retry_backoff_s: float = checked(0.5, low=0)
    # Which judge prompt (docs/scoring.md): official | flagevalmm, read from `source`, the user's checkout of that
    # upstream evaluator file (`source` alone = official); or a user-saved `prompt_file`; neither = our own prompt
    prompt: str = checked("", choices=("own", "official", "flagevalmm"))
    source: str = ""
    prompt_file: str = ""
    # Independent gradings per item (the official evaluator's --num_run), the score their mean
    runs: int = checked(1, low=1)


def _judge(value: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """The judge keys given, checked against JudgeConfig; its key is scrubbed from whatever is written."""
    judge = build(JudgeConfig, value, source, f"{where}.")
    remember([judge.get("api_key")])
    return judge


@dataclass
class SamplingConfig:
    """`sampling:`: the GenParams fields of these names, set for every task (only the keys given are kept)."""

    temperature: float = checked(0.0, low=0)
    top_p: Optional[float] = checked(None, above=0, high=1)
    seed: Optional[int] = 0


def _sampling(value: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    return build(SamplingConfig, value, source, f"{where}.")


def _task_rules(value: dict[str, Any], source: str, where: str) -> dict[str, dict[str, Optional[float]]]:
    """`task_rules: {task: {equivalence, non_inferiority, max_error_rate}}`, each checked as a task's `decision:`."""
    return {task: parse_decision(source, f"{where}.{task}", rule) for task, rule in value.items()}


@dataclass
class RunConfig:
    # Serve specs: names, paths, mappings or lists of alternatives, resolved by `resolve_backend`.
    reference: ServeSpec
    candidate: ServeSpec
    suite: str = checked("demo", nonempty=True)
    tasks: tuple[str, ...] = ()
    limit: Optional[int] = checked(None, low=1)
    placement: str = checked("sequential", choices=PLACEMENTS)
    allow_fallback: bool = True
    concurrency: int = checked(8, low=1, high=4096)
    request_timeout_s: float = checked(600.0, above=0)
    max_attempts: int = checked(4, low=1, high=100)
    interleave: bool = True
    # The decision rule's defaults (docs/statistics.md, "Decision rules"): equivalence margin ε and non-inferiority
    # margin δ in points (null: not tested), and the error share before a row reads "incomplete".  A task spec's
    # `decision:` overrides them for its task, `task_rules: {task: {...}}` overrides both.
    margin: Optional[float] = checked(1.0, above=0, below=100)
    release_gate: Optional[float] = checked(5.0, above=0, below=100)
    max_error_rate: float = checked(0.02, low=0, below=1)
    task_rules: dict[str, dict[str, Optional[float]]] = checked(default_factory=dict, parse=_task_rules)
    data_dir: str = ""
    lmeval_include_path: str = ""  # folder of extra lm-eval task YAMLs for `lmeval:<task>` entries
    max_image_pixels: Optional[int] = checked(None, low=1)
    # Caps every task's max_tokens (both backends alike): a small test model's context cannot hold the
    # 8k-token answers that AIME or GPQA allow a real one.
    max_tokens_cap: Optional[int] = checked(None, low=1)
    # Only the keys given (JudgeConfig checks them): `judge.get("base_url")` says whether one is set.
    judge: dict[str, Any] = checked(default_factory=dict, parse=_judge)
    perf: PerfConfig = field(default_factory=PerfConfig)
    noise_floor: bool = False  # also run reference against itself (A/A) and show it beside A/B
    # Ask every item this many times per side (None: each task's own `repeats`, default 1); compared as avg@k.
    repeats: Optional[int] = checked(None, low=1)
    # Sampled decoding for every task, e.g. {temperature: 0.6, top_p: 0.95}; each repeat gets seed + its index.
    sampling: dict[str, Any] = checked(default_factory=dict, parse=_sampling)
    teacher_forced: TeacherForcedConfig = field(default_factory=TeacherForcedConfig)
    source: str = field(default="", metadata={"internal": True})
    # field -> where the user set it ("run.yaml: tasks", "command line: --tasks"), for errors found later
    origins: dict[str, str] = field(default_factory=dict, repr=False, metadata={"internal": True})

    def origin(self, name: str) -> str:
        return self.origins.get(name, f"{self.source}: {name}")


def cuda_with_flaggems() -> bool:
    """True when this machine can run FlagGems (a CUDA device and the flag_gems package)."""
    if importlib.util.find_spec("flag_gems") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def runnable_here(spec: ServeSpec) -> bool:
    if spec.engine == "embedded" and spec.ops == "flaggems":
        return cuda_with_flaggems()
    return True


def resolve_backend(value: Any, path: str, field_name: str) -> ServeSpec:
    """A spec name/path, an inline mapping, or a list of alternatives (first runnable one wins)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(path, field_name, "empty list of serve specs")
        specs = [resolve_backend(v, path, field_name) for v in value]
        for spec in specs:
            if runnable_here(spec):
                return spec
        raise ConfigError(path, field_name, f"none of {[s.name for s in specs]} can run on this machine")
    if isinstance(value, str):
        return load_serve_spec(value)
    if isinstance(value, dict):
        return load_serve_spec(value, source=f"{path}:{field_name}")
    raise ConfigError(path, field_name, f"expected a serve spec name, path or mapping, got {type(value).__name__}")


def _gpu_sets(value: Any, source: str) -> dict[str, str]:
    """`gpus: {reference: "0", candidate: "1,2"}` -> role -> CUDA_VISIBLE_DEVICES (indices or GPU-/MIG- UUIDs)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(source, "gpus", "expected a mapping such as {reference: \"0\", candidate: \"1\"}")
    sets = {}
    for role, devices in value.items():
        if role not in ("reference", "candidate"):
            raise ConfigError(source, f"gpus.{role}", "unknown role (known: candidate, reference)")
        ids = device_ids(",".join(map(str, devices)) if isinstance(devices, list) else str(devices))
        if not all(ids) or isinstance(devices, bool):
            raise ConfigError(source, f"gpus.{role}", f"expected device indices such as \"0,1\", got {devices!r}")
        sets[role] = ",".join(ids)
    return sets


COMMAND_LINE = "command line"


def _read_config_file(path: str | Path) -> dict[str, Any]:
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(source, "", "no such config file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "expected a mapping at the top level")
    return raw


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _task_names(value: Any, source: str, where: str) -> Any:
    """`tasks` as a comma-separated string or a list; given but naming no task is refused (it would silently
    run the whole suite)."""
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
        if not value:
            raise ConfigError(source, where, "no task names given (comma-separated names, or leave it out "
                                             "for the suite)")
    return value


def _validated(raw: dict[str, Any], source: str, name_of: Any) -> dict[str, Any]:
    """Type- and range-checked values of one layer (the file, or the command line); `name_of` turns a field
    name into what the user wrote (the field itself, or its flag)."""
    values: dict[str, Any] = {}
    known = {f.name for f in fields(RunConfig) if not f.metadata.get("internal")} | {"gpus"}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(source, name_of(key), f"unknown field (known: {', '.join(sorted(known))})")
        if key in ("reference", "candidate", "gpus"):
            values[key] = value  # resolved below, where the other role is known
            continue
        if key == "tasks":
            value = _task_names(value, source, name_of(key))
        hint = typing.get_type_hints(RunConfig)[key]
        rule = next(f for f in fields(RunConfig) if f.name == key).metadata.get("rule")
        values[key] = convert(value, hint, rule, source, name_of(key))
    return values


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Read a run config file (or the defaults) and apply command-line overrides (None = keep).  Everything
    is checked here, before any server starts; an error names the file and field, or the flag."""
    source = str(path) if path else "<defaults>"
    layers = [(_validated(_read_config_file(path), source, str) if path else {}, source, str)]
    given = {k: v for k, v in overrides.items() if v is not None}
    layers.append((_validated(given, COMMAND_LINE, _flag), COMMAND_LINE, _flag))
    values: dict[str, Any] = {}
    where: dict[str, tuple[str, str]] = {}  # field -> (source, name) of the layer that set it
    for layer, layer_source, name_of in layers:
        values.update(layer)
        where.update({key: (layer_source, name_of(key)) for key in layer})

    suite_defaults = SUITE_DEFAULT_BACKENDS.get(values.get("suite") or "", (DEFAULT_REFERENCE, DEFAULT_CANDIDATE))
    role_defaults = {"reference": suite_defaults[0], "candidate": list(suite_defaults[1])}
    backends = {role: resolve_backend(values.pop(role, role_defaults[role]),
                                      *where.get(role, (source, role))) for role in ROLES}
    # `gpus: {reference: "0", candidate: "1"}`: each role's CUDA_VISIBLE_DEVICES, overriding its serve spec's.
    gpus = _gpu_sets(values.pop("gpus", None), source)
    for role in ROLES:
        if role in gpus:
            backends[role] = dataclasses.replace(backends[role], cuda_visible_devices=gpus[role])
            replica_specs(backends[role], source, f"gpus.{role}")  # split over the replicas, enough for TP × PP
    reference, candidate = backends["reference"], backends["candidate"]
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(reference, key) != getattr(candidate, key):
            raise ConfigError(*where.get("candidate", (source, "candidate")),
                              f"{key} {getattr(candidate, key)} differs from the reference's "
                              f"{getattr(reference, key)}: a comparison needs the same parallelism on both sides")
    for key in ("data_dir", "lmeval_include_path"):
        if values.get(key) and not Path(values[key]).expanduser().is_dir():
            raise ConfigError(*where[key], f"no such directory: {values[key]}")
    return RunConfig(reference=reference, candidate=candidate, source=source, **values,
                     origins={key: f"{layer_source}: {name}" for key, (layer_source, name) in where.items()})


def task_rule(config: RunConfig, task: str, task_decision: Optional[dict[str, Optional[float]]] = None) -> DecisionRule:
    """The decision rule of one task: the run config's defaults, then the task spec's `decision:`, then the run
    config's `task_rules[task]`, field by field."""
    fields_set = {"equivalence": config.margin, "non_inferiority": config.release_gate,
                  "max_error_rate": config.max_error_rate}
    fields_set.update(task_decision or {})
    fields_set.update(config.task_rules.get(task) or {})
    try:
        return DecisionRule(**fields_set)
    except ValueError as exc:
        where = f"task_rules.{task}" if task in config.task_rules else f"margin/release_gate (task {task})"
        raise ConfigError(config.source, where, str(exc)) from None
