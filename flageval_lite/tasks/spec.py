"""Task specs: one YAML file per benchmark under `tasks/`, validated into a `TaskSpec`.

Every problem in a spec file is reported as `ConfigError(file, field, message)` on one line.  Suites are
ordered lists in `tasks/suites.yaml`; a task file may add itself to further suites with `suites: [...]`.
See docs/tasks.md for the field reference.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import jinja2
import yaml

from ..errors import ConfigError, UserError
from ..records import REPEAT_AGGREGATES, GenParams
from ..schema import build
from . import templating
from .media import AUDIO_PARTS
from .repo_files import RepoFiles, parse_repo_files

MODALITIES = ("text", "vision", "audio", "video", "audio-visual")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv-vlmeval"}
METRICS = ("accuracy", "livebench", "macro", "ocrbench_sum", "wer", "cer")
SUITES_FILE = "suites.yaml"

TASK_KEYS = {"name", "title", "description", "modality", "dataset", "id_field", "where", "images", "derive", "prompt",
             "system", "fewshot", "gold", "meta", "group_by", "generation", "scorer", "scorer_args", "metric",
             "compat", "suites", "decision", "repeats", "repeat_aggregate", "audios", "videos", "audio_part",
             "beyond_card"}
REQUIRED_KEYS = ("name", "title", "modality", "dataset", "prompt", "gold", "scorer")
SOURCE_KEYS = {"hub", "revision", "config", "configs", "split", "splits", "path", "format", "tag", "files"}
FEWSHOT_KEYS = {"split", "n", "by"}
IMAGE_KEYS = {"pattern", "expr"}
# `decision:` margins in points (null switches one off) and the error share before a row reads "incomplete".
DECISION_KEYS = ("equivalence", "non_inferiority", "max_error_rate")


def tasks_dir() -> Path:
    """Where task YAML files live: $FLAGEVAL_TASKS_DIR, else `tasks/` at the repository root."""
    env = os.environ.get("FLAGEVAL_TASKS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "tasks"


@dataclass(frozen=True)
class DataSource:
    """One dataset: a hub repo (one or more configs x splits, concatenated in order) or a local file."""

    hub: str = ""
    revision: str = ""
    configs: tuple[Optional[str], ...] = (None,)
    splits: tuple[str, ...] = ()
    path: str = ""
    format: str = ""
    tag: str = ""  # prefixes item ids and names the part; for several sources of one task (AIME 2024 + 2025)
    files: Optional[RepoFiles] = None  # how a local copy holding the repo's own TSV + archive reads (repo_files.py)

    def describe(self) -> str:
        if self.path:
            return f"{self.path} ({self.format})"
        return f"{self.hub} (revision {self.revision})"


@dataclass(frozen=True)
class FewShot:
    split: str  # split of the same source/config the shots come from
    n: int
    by: str = ""  # shots share this field's value with the item (MMLU: subject); "" = first n overall


@dataclass(frozen=True)
class ImageSpec:
    """Which row values are the item's images: image k of the prompt is entry k-1 of the resolved list."""

    columns: tuple[str, ...] = ()
    pattern: str = ""  # regex with one numeric group; matching columns ordered by that number
    expr: str = ""  # expression giving column names (or image values) in order


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    modality: str
    sources: tuple[DataSource, ...]
    prompt: str
    gold: str
    scorer: str
    description: str = ""
    id_field: str = ""
    where: str = ""
    images: Optional[ImageSpec] = None
    derive: dict[str, str] = field(default_factory=dict)
    system: str = ""
    fewshot: Optional[FewShot] = None
    meta: dict[str, str] = field(default_factory=dict)
    group_by: str = ""
    generation: GenParams = field(default_factory=GenParams)
    scorer_args: dict[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"
    compat: bool = False
    suites: tuple[str, ...] = ()
    beyond_card: bool = False  # a benchmark the target model's card does not list: the report marks its row
    # The fields of `decision:` this task sets (DECISION_KEYS); the run config fills in the rest (config.task_rule).
    decision: dict[str, Optional[float]] = field(default_factory=dict)
    repeats: int = 1  # times each item is asked per side, unless the run config sets `repeats`
    repeat_aggregate: str = "avg"  # one of REPEAT_AGGREGATES
    source: str = ""  # the YAML file, for error messages
    # `<audio k>` / `<video k>` values, resolved like `images`; audio sent as `input_audio` or `audio_url` parts
    audios: Optional[ImageSpec] = None
    videos: Optional[ImageSpec] = None
    audio_part: str = "input_audio"


# --------------------------------------------------------------------------- parsing


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(path, f"line {mark.line + 1}" if mark else "",
                          f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None


def _expect(path: Path, name: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise ConfigError(path, name, f"expected {what}, got {value!r}")
    return value


def _check_keys(path: Path, prefix: str, raw: dict[str, Any], known: set[str]) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(path, f"{prefix}{key}", f"unknown field (known: {', '.join(sorted(known))})")


def _compile(path: Path, name: str, source: str, template: bool) -> None:
    try:
        if template:
            templating.compile_template(source)
        else:
            templating.compile_expression(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(path, name, f"jinja syntax error: {exc.message}") from None


def _str_list(path: Path, name: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    _expect(path, name, values, list, "a string or a list of strings")
    return tuple(_expect(path, f"{name}[{i}]", v, str, "a string") for i, v in enumerate(values))


def _parse_source(path: Path, name: str, raw: Any) -> DataSource:
    _expect(path, name, raw, dict, "a mapping with hub/revision/split or path/format")
    _check_keys(path, f"{name}.", raw, SOURCE_KEYS)
    for single, plural in (("config", "configs"), ("split", "splits")):
        if single in raw and plural in raw:
            raise ConfigError(path, f"{name}.{plural}", f"give either {single} or {plural}, not both")
    tag = str(_expect(path, f"{name}.tag", raw.get("tag", ""), (str, int), "a string"))
    if bool(raw.get("hub")) == bool(raw.get("path")):
        raise ConfigError(path, name, "needs exactly one of `hub` (a Hugging Face dataset id) or `path` (a local file)")
    if raw.get("hub"):
        hub = _expect(path, f"{name}.hub", raw["hub"], str, "a dataset id like org/name")
        if "revision" not in raw:
            raise ConfigError(path, f"{name}.revision", "missing: pin the dataset commit (or `main`, a known gap)")
        revision = _expect(path, f"{name}.revision", raw["revision"], str, "a commit sha or branch")
        configs: tuple[Optional[str], ...] = (None,)
        if "config" in raw or "configs" in raw:
            configs = _str_list(path, f"{name}.configs", raw.get("configs", raw.get("config")))
        if "split" not in raw and "splits" not in raw:
            raise ConfigError(path, f"{name}.split", "missing: which split to evaluate")
        splits = _str_list(path, f"{name}.splits", raw.get("splits", raw.get("split")))
        files = parse_repo_files(path, f"{name}.files", raw["files"]) if "files" in raw else None
        return DataSource(hub=hub, revision=revision, configs=configs, splits=splits, tag=tag, files=files)
    file_path = _expect(path, f"{name}.path", raw["path"], str, "a file path")
    if {"config", "configs", "revision", "files"} & raw.keys():
        raise ConfigError(path, name, "config/revision/files apply to hub datasets only")
    fmt = raw.get("format") or FORMATS.get(Path(file_path).suffix.lower())
    if fmt not in FORMATS.values():
        raise ConfigError(path, f"{name}.format", f"expected one of {', '.join(sorted(set(FORMATS.values())))}, "
                                                  f"got {fmt!r}")
    return DataSource(path=file_path, format=fmt, splits=(), tag=tag)


def _parse_images(path: Path, raw: Any, key: str = "images") -> ImageSpec:
    """`images`, `audios` or `videos` (named by `key`): a column list, `{pattern: ...}` or `{expr: ...}`."""
    if isinstance(raw, list):
        return ImageSpec(columns=_str_list(path, key, raw))
    _expect(path, key, raw, dict, "a list of columns or a mapping with `pattern` or `expr`")
    _check_keys(path, f"{key}.", raw, IMAGE_KEYS)
    if len(raw) != 1:
        raise ConfigError(path, key, "give exactly one of `pattern` or `expr`")
    if "pattern" in raw:
        pattern = _expect(path, f"{key}.pattern", raw["pattern"], str, "a regular expression")
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise ConfigError(path, f"{key}.pattern", f"bad regular expression: {exc}") from None
        if groups != 1:
            raise ConfigError(path, f"{key}.pattern", "needs exactly one group capturing the number")
        return ImageSpec(pattern=pattern)
    expr = _expect(path, f"{key}.expr", raw["expr"], str, "a jinja expression")
    _compile(path, f"{key}.expr", expr, template=False)
    return ImageSpec(expr=expr)


def _parse_generation(path: Path, raw: Any) -> GenParams:
    _expect(path, "generation", raw, dict, "a mapping of sampling parameters")
    values = dict(raw)
    if "stop" in values:
        values["stop"] = _str_list(path, "generation.stop", values["stop"])
    if "extra_body" in values:
        _expect(path, "generation.extra_body", values["extra_body"], dict, "a mapping")
    values = {**build(GenParams, values, str(path), "generation.", skip=("extra_body",)),
              **({"extra_body": tuple(raw["extra_body"].items())} if "extra_body" in raw else {})}
    return GenParams(**values)


def parse_decision(path: Path | str, name: str, raw: Any) -> dict[str, Optional[float]]:
    """A `decision:` mapping (task spec or run config): known keys, margins in points or null, an error share in
    [0, 1).  Whether the margins fit together is checked once the run config's defaults are in (config.task_rule)."""
    path = Path(path)
    _expect(path, name, raw, dict, f"a mapping with {', '.join(DECISION_KEYS)}")
    _check_keys(path, f"{name}.", raw, set(DECISION_KEYS))
    out: dict[str, Optional[float]] = {}
    for key, value in raw.items():
        where = f"{name}.{key}"
        if key == "max_error_rate":
            share = _expect(path, where, value, (int, float), "a share such as 0.02")
            if not 0 <= share < 1:
                raise ConfigError(path, where, f"must lie in [0, 1), got {share}")
            out[key] = float(share)
        elif value is None:
            out[key] = None  # this margin is not tested
        else:
            points = _expect(path, where, value, (int, float), "a margin in points or null")
            if not 0 < points < 100:
                raise ConfigError(path, where, f"a margin in points must lie in (0, 100), got {points}")
            out[key] = float(points)
    return out


def _check_scorer(path: Path, scorer: str, args: dict[str, Any]) -> None:
    """Scorer name and arguments against the registry (skipped when the scorers package cannot be imported)."""
    try:
        from ..scoring import SCORERS, scorer_args
    except ImportError:
        return
    if scorer not in SCORERS:
        raise ConfigError(path, "scorer", f"unknown scorer {scorer!r} (known: {', '.join(sorted(SCORERS))})")
    unknown = sorted(set(args) - set(scorer_args(scorer)))
    if unknown:
        raise ConfigError(path, "scorer_args", f"scorer {scorer!r} takes no {', '.join(unknown)} "
                                               f"(it takes {', '.join(scorer_args(scorer))})")


def parse_task(raw: Any, path: Path) -> TaskSpec:
    """Validate one task mapping (as read from `path`) into a TaskSpec."""
    _expect(path, "", raw, dict, "a mapping at the top level")
    _check_keys(path, "", raw, TASK_KEYS)
    for key in REQUIRED_KEYS:
        if raw.get(key) in (None, ""):
            raise ConfigError(path, key, "missing required field")
    name = _expect(path, "name", raw["name"], str, "a string")
    if path.suffix in (".yaml", ".yml") and path.stem != name:
        raise ConfigError(path, "name", f"must equal the file name stem {path.stem!r}")
    modality = raw["modality"]
    if modality not in MODALITIES:
        raise ConfigError(path, "modality", f"expected one of {', '.join(MODALITIES)}, got {modality!r}")

    dataset = raw["dataset"]
    if isinstance(dataset, list):
        if not dataset:
            raise ConfigError(path, "dataset", "empty list")
        sources = tuple(_parse_source(path, f"dataset[{i}]", s) for i, s in enumerate(dataset))
    else:
        sources = (_parse_source(path, "dataset", dataset),)

    prompt = _expect(path, "prompt", raw["prompt"], str, "a jinja template")
    _compile(path, "prompt", prompt, template=True)
    system = _expect(path, "system", raw.get("system", ""), str, "a jinja template")
    _compile(path, "system", system, template=True)

    expressions: dict[str, str] = {}
    for key in ("gold", "id_field", "where"):
        if raw.get(key) not in (None, ""):
            expressions[key] = _expect(path, key, raw[key], str, "a column name or jinja expression")
    derive = _expect(path, "derive", raw.get("derive") or {}, dict, "a mapping name -> expression")
    for key, expr in derive.items():
        expressions[f"derive.{key}"] = _expect(path, f"derive.{key}", expr, str, "a jinja expression")
    meta_raw = raw.get("meta") or {}
    if isinstance(meta_raw, list):  # a list of column names, each kept under its own name
        meta_raw = {_expect(path, "meta", col, str, "a column name"): f"row[{col!r}]" for col in meta_raw}
    _expect(path, "meta", meta_raw, dict, "a list of columns or a mapping key -> expression")
    for key, expr in meta_raw.items():
        expressions[f"meta.{key}"] = _expect(path, f"meta.{key}", expr, str, "a jinja expression")
    for key, expr in expressions.items():
        if key not in ("id_field", "gold"):  # those may also be bare column names with spaces
            _compile(path, key, expr, template=False)

    group_by = _expect(path, "group_by", raw.get("group_by") or "", str, "a meta key")
    if group_by and group_by not in meta_raw:
        raise ConfigError(path, "group_by", f"{group_by!r} is not a `meta` key (meta: {', '.join(meta_raw) or 'none'})")

    fewshot = None
    if raw.get("fewshot"):
        fs = _expect(path, "fewshot", raw["fewshot"], dict, "a mapping with split, n, by")
        _check_keys(path, "fewshot.", fs, FEWSHOT_KEYS)
        if any(s.path for s in sources):
            raise ConfigError(path, "fewshot", "needs a hub dataset (shots come from another split)")
        fewshot = FewShot(split=_expect(path, "fewshot.split", fs.get("split"), str, "a split name"),
                          n=_expect(path, "fewshot.n", fs.get("n"), int, "a number of shots"),
                          by=_expect(path, "fewshot.by", fs.get("by", ""), str, "a column name"))

    scorer = _expect(path, "scorer", raw["scorer"], str, "a scorer name")
    scorer_args = dict(_expect(path, "scorer_args", raw.get("scorer_args") or {}, dict, "a mapping"))
    compat = _expect(path, "compat", raw.get("compat", False), bool, "true or false")
    if "compat" in scorer_args:
        raise ConfigError(path, "scorer_args.compat", "set the top-level `compat` field instead")
    if compat:  # scorers take it as a keyword: reproduce the reference implementation's quirks
        scorer_args["compat"] = True
    _check_scorer(path, scorer, scorer_args)
    audio_part = raw.get("audio_part", AUDIO_PARTS[0])
    if audio_part not in AUDIO_PARTS:
        raise ConfigError(path, "audio_part", f"expected one of {', '.join(AUDIO_PARTS)}, got {audio_part!r}")
    metric = raw.get("metric", "accuracy")
    if metric not in METRICS:
        raise ConfigError(path, "metric", f"expected one of {', '.join(METRICS)}, got {metric!r}")
    if (scorer in ("wer", "cer") or metric in ("wer", "cer")) and metric != scorer:
        raise ConfigError(path, "metric", f"scorer {scorer!r} with metric {metric!r}: an error-rate task needs the "
                                          "same name for both (wer or cer)")

    repeats = _expect(path, "repeats", raw.get("repeats", 1), int, "a whole number of repeats")
    if repeats < 1:
        raise ConfigError(path, "repeats", f"must be at least 1, got {repeats}")
    repeat_aggregate = raw.get("repeat_aggregate", "avg")
    if repeat_aggregate not in REPEAT_AGGREGATES:
        raise ConfigError(path, "repeat_aggregate",
                          f"expected one of {', '.join(REPEAT_AGGREGATES)}, got {repeat_aggregate!r}")

    return TaskSpec(
        name=name,
        title=str(_expect(path, "title", raw["title"], str, "a string")),
        description=_expect(path, "description", raw.get("description", ""), str, "a string"),
        modality=modality,
        sources=sources,
        prompt=prompt,
        system=system,
        gold=expressions["gold"],
        id_field=expressions.get("id_field", ""),
        where=expressions.get("where", ""),
        images=_parse_images(path, raw["images"]) if raw.get("images") else None,
        derive=dict(derive),
        fewshot=fewshot,
        meta=dict(meta_raw),
        group_by=group_by,
        generation=_parse_generation(path, raw["generation"]) if raw.get("generation") else GenParams(),
        scorer=scorer,
        scorer_args=scorer_args,
        metric=metric,
        compat=compat,
        beyond_card=_expect(path, "beyond_card", raw.get("beyond_card", False), bool, "true or false"),
        suites=_str_list(path, "suites", raw.get("suites") or []),
        decision=parse_decision(path, "decision", raw["decision"]) if raw.get("decision") is not None else {},
        repeats=repeats,
        repeat_aggregate=repeat_aggregate,
        source=str(path),
        audios=_parse_images(path, raw["audios"], "audios") if raw.get("audios") else None,
        videos=_parse_images(path, raw["videos"], "videos") if raw.get("videos") else None,
        audio_part=audio_part,
    )


# --------------------------------------------------------------------------- lookup


def _task_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(tasks_dir().glob("*.yaml")) if p.name != SUITES_FILE}


def _suites_table() -> dict[str, list[str]]:
    """suites.yaml: suite name -> ordered task names."""
    path = tasks_dir() / SUITES_FILE
    raw = _read_yaml(path) if path.is_file() else {}
    _expect(path, "", raw or {}, dict, "a mapping suite -> list of task names")
    files = _task_files()
    table: dict[str, list[str]] = {}
    for suite, names in (raw or {}).items():
        table[str(suite)] = list(_str_list(path, str(suite), names))
        for i, task in enumerate(table[str(suite)]):
            if task not in files:
                raise ConfigError(path, f"{suite}[{i}]", f"no task file {task}.yaml in {tasks_dir()}")
    return table


def _with_suites(spec: TaskSpec, table: dict[str, list[str]]) -> TaskSpec:
    listed = [suite for suite, names in table.items() if spec.name in names]
    return dataclasses.replace(spec, suites=tuple(dict.fromkeys(listed + list(spec.suites))))


def _load_file(path: Path) -> TaskSpec:
    return parse_task(_read_yaml(path), path)


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A task by name (`mmmu`), model-card title (`MMMU_Pro_vision`, case-insensitive) or YAML path."""
    text = str(name_or_path)
    candidate = Path(text)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"task file {text} does not exist")
        return _with_suites(_load_file(candidate), _suites_table())
    files = _task_files()
    if text in files:
        return _with_suites(_load_file(files[text]), _suites_table())
    for path in files.values():
        spec = _load_file(path)
        if spec.title.lower() == text.lower():
            return _with_suites(spec, _suites_table())
    raise UserError(f"unknown task {text!r} (known: {', '.join(files)})")


def load_suite(name: str) -> list[TaskSpec]:
    """The tasks of a suite in suites.yaml order; tasks that add themselves via `suites:` follow by name."""
    table = _suites_table()
    specs = {stem: _load_file(path) for stem, path in _task_files().items()}
    ordered = list(table.get(name, []))
    ordered += sorted(n for n, s in specs.items() if name in s.suites and n not in ordered)
    if not ordered:
        known = sorted(set(table) | {s for spec in specs.values() for s in spec.suites})
        raise UserError(f"unknown suite {name!r} (known: {', '.join(known)})")
    return [_with_suites(specs[n], table) for n in ordered]


def all_tasks() -> list[TaskSpec]:
    """Every task file, suite members first in suite order."""
    table = _suites_table()
    order = list(dict.fromkeys(n for names in table.values() for n in names))
    files = _task_files()
    order += sorted(n for n in files if n not in order)
    return [_with_suites(_load_file(files[n]), table) for n in order]
