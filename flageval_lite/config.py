"""Run configuration: which two backends, which tasks, and how to judge them.

A run config is a YAML file (see `serve/compare.yaml`); every field has a default, so
`flageval-lite run --suite demo` works with none.  Backends are serve-spec names (files under
`serve/`), paths, or a list of names of which the first one that can run on this machine is used.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError
from .records import ServeSpec
from .servers.spec import device_ids, load_serve_spec, replica_specs
from .stats import DecisionRule
from .tasks.spec import parse_decision

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
    concurrency: tuple[int, ...] = (1, 8)
    requests: int = 16
    prompt_words: int = 64
    output_tokens: int = 32


@dataclass
class TeacherForcedConfig:
    """Score the reference's greedy token sequences on both backends (vLLM `prompt_logprobs`), see
    flageval_lite/teacher_forced.py."""

    enabled: bool = True
    items: int = 20  # per task: the first items the reference answered
    top_k: int = 5  # prompt_logprobs per position (vLLM allows at most --max-logprobs, 20 by default)


@dataclass
class RunConfig:
    reference: ServeSpec
    candidate: ServeSpec
    suite: str = "demo"
    tasks: tuple[str, ...] = ()
    limit: Optional[int] = None
    placement: str = "sequential"
    allow_fallback: bool = True
    concurrency: int = 8
    request_timeout_s: float = 600.0
    max_attempts: int = 4
    interleave: bool = True
    # The decision rule's defaults (docs/statistics.md, "Decision rules"): equivalence margin ε and non-inferiority
    # margin δ in points (null: not tested), and the error share before a row reads "incomplete".  A task spec's
    # `decision:` overrides them for its task, `task_rules: {task: {...}}` overrides both.
    margin: Optional[float] = 1.0
    release_gate: Optional[float] = 5.0
    max_error_rate: float = 0.02
    task_rules: dict[str, dict[str, Optional[float]]] = field(default_factory=dict)
    data_dir: str = ""
    lmeval_include_path: str = ""  # folder of extra lm-eval task YAMLs for `lmeval:<task>` entries
    max_image_pixels: Optional[int] = None
    # Caps every task's max_tokens (both backends alike): a small test model's context cannot hold the
    # 8k-token answers that AIME or GPQA allow a real one.
    max_tokens_cap: Optional[int] = None
    judge: dict[str, Any] = field(default_factory=dict)
    perf: PerfConfig = field(default_factory=PerfConfig)
    noise_floor: bool = False  # also run reference against itself (A/A) and show it beside A/B
    # Ask every item this many times per side (None: each task's own `repeats`, default 1); compared as avg@k.
    repeats: Optional[int] = None
    # Sampled decoding for every task, e.g. {temperature: 0.6, top_p: 0.95}; each repeat gets seed + its index.
    sampling: dict[str, Any] = field(default_factory=dict)
    teacher_forced: TeacherForcedConfig = field(default_factory=TeacherForcedConfig)
    source: str = ""


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


def _check_type(path: str, name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    if not isinstance(value, expected) or isinstance(value, bool) and expected in (int, float, (int, float)):
        want = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
        raise ConfigError(path, name, f"expected {want}, got {value!r}")


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Read a run config file (or the defaults) and apply command-line overrides (None = keep)."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, "", "no such config file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else ""
            raise ConfigError(source, where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(source, "", "expected a mapping at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})

    known = {f.name for f in fields(RunConfig)} - {"source"} | {"gpus"}
    for key in raw:
        if key not in known:
            raise ConfigError(source, key, f"unknown field (known: {', '.join(sorted(known))})")

    default_reference, default_candidate = SUITE_DEFAULT_BACKENDS.get(raw.get("suite") or "",
                                                                      (DEFAULT_REFERENCE, DEFAULT_CANDIDATE))
    reference = resolve_backend(raw.pop("reference", default_reference), source, "reference")
    candidate = resolve_backend(raw.pop("candidate", list(default_candidate)), source, "candidate")
    # `gpus: {reference: "0", candidate: "1"}`: each role's CUDA_VISIBLE_DEVICES, overriding its serve spec's.
    gpus = _gpu_sets(raw.pop("gpus", None), source)
    reference, candidate = (dataclasses.replace(spec, cuda_visible_devices=gpus[role]) if role in gpus else spec
                            for role, spec in (("reference", reference), ("candidate", candidate)))
    for role, spec in (("reference", reference), ("candidate", candidate)):
        if role in gpus:
            replica_specs(spec, source, f"gpus.{role}")  # split over the replicas, enough for TP × PP
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(reference, key) != getattr(candidate, key):
            raise ConfigError(source, "candidate", f"{key} {getattr(candidate, key)} differs from the reference's "
                              f"{getattr(reference, key)}: a comparison needs the same parallelism on both sides")

    perf_raw = raw.pop("perf", {}) or {}
    if not isinstance(perf_raw, dict):
        raise ConfigError(source, "perf", "expected a mapping")
    perf_known = {f.name for f in fields(PerfConfig)}
    for key in perf_raw:
        if key not in perf_known:
            raise ConfigError(source, f"perf.{key}", f"unknown field (known: {', '.join(sorted(perf_known))})")
    if "concurrency" in perf_raw:
        perf_raw["concurrency"] = tuple(int(c) for c in perf_raw["concurrency"])
    perf = PerfConfig(**perf_raw)

    teacher_forced = _teacher_forced_config(raw.pop("teacher_forced", {}) or {}, source)

    if isinstance(raw.get("tasks"), str):
        raw["tasks"] = tuple(t for t in raw["tasks"].split(",") if t)
    if "tasks" in raw:
        raw["tasks"] = tuple(raw["tasks"])
    types = {"suite": str, "limit": int, "placement": str, "allow_fallback": bool, "concurrency": int,
             "request_timeout_s": (int, float), "max_attempts": int, "interleave": bool,
             "margin": (int, float), "release_gate": (int, float), "data_dir": str, "lmeval_include_path": str,
             "max_image_pixels": int, "max_tokens_cap": int, "judge": dict, "noise_floor": bool,
             "max_error_rate": (int, float), "task_rules": dict, "repeats": int, "sampling": dict}
    for key, expected in types.items():
        if raw.get(key) is not None:
            _check_type(source, key, raw[key], expected)
    if raw.get("placement", "sequential") not in PLACEMENTS:
        raise ConfigError(source, "placement", f"must be one of {', '.join(PLACEMENTS)}")
    if raw.get("limit") is not None and raw["limit"] < 1:
        raise ConfigError(source, "limit", "must be at least 1")
    for key in ("margin", "release_gate"):
        if raw.get(key) is not None and not 0 < raw[key] < 100:
            raise ConfigError(source, key, f"a margin in points must lie in (0, 100) or be null, got {raw[key]}")
    if not 0 <= raw.get("max_error_rate", 0.0) < 1:
        raise ConfigError(source, "max_error_rate", f"must lie in [0, 1), got {raw['max_error_rate']}")
    raw["task_rules"] = {task: parse_decision(source, f"task_rules.{task}", rule)
                         for task, rule in (raw.get("task_rules") or {}).items()}
    if raw.get("repeats") is not None and raw["repeats"] < 1:
        raise ConfigError(source, "repeats", "must be at least 1")
    _check_sampling(raw.get("sampling") or {}, source)
    return RunConfig(reference=reference, candidate=candidate, perf=perf, teacher_forced=teacher_forced,
                     source=source, **raw)


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


def _teacher_forced_config(raw: Any, source: str) -> TeacherForcedConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, "teacher_forced", "expected a mapping")
    types = {"enabled": bool, "items": int, "top_k": int}
    for key, value in raw.items():
        if key not in types:
            raise ConfigError(source, f"teacher_forced.{key}", f"unknown field (known: {', '.join(types)})")
        _check_type(source, f"teacher_forced.{key}", value, types[key])
    config = TeacherForcedConfig(**raw)
    if config.items < 1:
        raise ConfigError(source, "teacher_forced.items", "must be at least 1")
    if not 1 <= config.top_k <= 20:
        raise ConfigError(source, "teacher_forced.top_k", "must be between 1 and 20")
    return config


SAMPLING_TYPES = {"temperature": (int, float), "top_p": (int, float), "seed": int}


def _check_sampling(raw: dict[str, Any], source: str) -> None:
    for key, value in raw.items():
        if key not in SAMPLING_TYPES:
            raise ConfigError(source, f"sampling.{key}", f"unknown field (known: {', '.join(SAMPLING_TYPES)})")
        _check_type(source, f"sampling.{key}", value, SAMPLING_TYPES[key])
    if raw.get("temperature", 0) < 0:
        raise ConfigError(source, "sampling.temperature", "must be at least 0")
    if "top_p" in raw and not 0 < raw["top_p"] <= 1:
        raise ConfigError(source, "sampling.top_p", "must be within (0, 1]")
