"""Dataset loading and item production: TaskSpec -> Iterator[Item].

Sources: Hugging Face datasets through `datasets.load_dataset` (hub id + revision, honouring the offline cache
and HF_DATASETS_OFFLINE/HF_HUB_OFFLINE, or a local copy of the hub repo under `<data_dir>/<hub id>/`), local
jsonl / parquet / csv files, and VLMEvalKit TSV files with base64 images.

Rows are streamed, never read whole: hub datasets are memory-mapped Arrow tables, JSONL is parsed line by line,
parquet is read in record batches, and a TSV's image column a record at a time.  Media cells stay as stored
(base64, bytes, paths) until the item is built, which the runner does only when a request slot is free.  Order: sources, configs and splits in spec order, rows in
dataset order.  `limit=N` keeps the N items whose SHA-256(item id) sort first, still yielded in dataset
order, so a subset spreads over subjects and a smaller limit is always a subset of a larger one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jinja2

from ..errors import ConfigError, UserError
from ..records import Item
from . import templating
from .messages import build_messages
from .sources import Part, load_local, open_parts, repo_files_table
from .spec import ImageSpec, TaskSpec
from .tables import MissingMedia, first_line, plain_value


@lru_cache(maxsize=512)
def _expression(source: str) -> Callable[..., Any]:
    return templating.compile_expression(source)


@lru_cache(maxsize=128)
def _template(source: str) -> jinja2.Template:
    return templating.compile_template(source)


class _Evaluator:
    """Evaluates one task's templates and expressions, turning failures into one-line ConfigErrors."""

    def __init__(self, spec: TaskSpec):
        self.spec = spec

    def fail(self, field_name: str, item_id: str, exc: BaseException) -> ConfigError:
        message = first_line(exc) if not isinstance(exc, jinja2.UndefinedError) else exc.message or "undefined"
        return ConfigError(self.spec.source, field_name, f"item {item_id}: {message}")

    def value(self, field_name: str, source: str, ctx: dict[str, Any], item_id: str, column_ok: bool = False) -> Any:
        if column_ok and source in ctx:  # gold / id_field may name a column, even one with spaces
            return ctx[source]
        try:
            result = _expression(source)(**ctx)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(self.spec.source, field_name, f"jinja syntax error: {exc.message}") from None
        except Exception as exc:  # any error inside a user expression is reported against its field
            raise self.fail(field_name, item_id, exc) from None
        if isinstance(result, jinja2.Undefined):
            raise self.fail(field_name, item_id, jinja2.UndefinedError(f"{source!r} is undefined"))
        return result

    def text(self, field_name: str, source: str, ctx: dict[str, Any], item_id: str) -> str:
        try:
            return _template(source).render(**ctx)
        except Exception as exc:  # as above: report against the template's field
            raise self.fail(field_name, item_id, exc) from None


def _context(part: Part, index: int, row: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = {"part": part.label, "config": part.config, "split": part.split, "tag": part.source.tag,
                           "row_index": index}
    ctx.update(row)
    ctx["row"] = row
    return ctx


def _item_id(spec: TaskSpec, ev: _Evaluator, part: Part, index: int, ctx: dict[str, Any], many_parts: bool) -> str:
    raw = str(ev.value("id_field", spec.id_field, ctx, f"#{index}", column_ok=True)) if spec.id_field else str(index)
    prefix = part.source.tag or (part.label if many_parts and not spec.id_field else "")
    return f"{prefix}/{raw}" if prefix else raw


def _keep(spec: TaskSpec, ev: _Evaluator, ctx: dict[str, Any], index: int) -> bool:
    return not spec.where or bool(ev.value("where", spec.where, ctx, f"#{index}"))


def _media_values(spec: TaskSpec, ev: _Evaluator, ctx: dict[str, Any], row: dict[str, Any], item_id: str,
                  key: str = "images") -> list:
    """The item's images (or `audios`, `videos`: named by `key`) in prompt order."""
    images: Optional[ImageSpec] = getattr(spec, key)
    if images is None:
        return []
    if images.expr:
        names = ev.value(f"{key}.expr", images.expr, ctx, item_id)
    elif images.pattern:
        names = templating.matching_columns(row, images.pattern)
    else:
        names = list(images.columns)
    values: list[Any] = []
    for name in names:
        if isinstance(name, str) and name in row:
            value = row[name]
        elif images.columns:
            raise ConfigError(spec.source, key, f"item {item_id}: no column {name!r}")
        else:
            value = name
        if isinstance(value, MissingMedia):
            raise UserError(f"{spec.name}: item {item_id}: {key}: {value.reason}")
        # a list cell holds several images; a video's list of frames stays one video
        values.extend(value if isinstance(value, list) and key == "images" else [value])
    while values and values[-1] is None:
        values.pop()
    return values


def _jsonable(value: Any) -> Any:
    """Gold and meta go to SQLite as JSON: dates become ISO strings, numpy values plain Python."""
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):
        return plain_value(value)
    return str(value)


CHOICE_SCORERS = ("choice", "gpqa", "mmlu")  # those that match a response against the option texts


def _check_options(spec: TaskSpec, meta: dict[str, Any], item_id: str) -> None:
    """A multiple-choice item's options are a list of at least two texts; a string would be read letter by
    letter and an empty list would silently fall back to A-D."""
    if spec.scorer not in CHOICE_SCORERS:
        return
    for key in ("options", "choices"):
        if key in meta:
            options = meta[key]
            if isinstance(options, str) and options.strip().startswith("["):  # a stored list (MMMU-style)
                with contextlib.suppress(ValueError):
                    options = templating.literal(options)
            if not isinstance(options, (list, tuple)) or len(options) < 2:
                raise ConfigError(spec.source, f"meta.{key}", f"item {item_id}: expected a list of at least two "
                                                              f"option texts, got {meta[key]!r}")


def _build_item(spec: TaskSpec, ev: _Evaluator, part: Part, index: int, item_id: str, ctx: dict[str, Any],
                max_image_pixels: Optional[int]) -> Item:
    row = ctx["row"]
    if spec.fewshot:
        ctx["shots"] = part.shots.get(row.get(spec.fewshot.by) if spec.fewshot.by else None, [])
    for name, expr in spec.derive.items():
        ctx[name] = ev.value(f"derive.{name}", expr, ctx, item_id)
    images = _media_values(spec, ev, ctx, row, item_id)
    audios = _media_values(spec, ev, ctx, row, item_id, "audios")
    videos = _media_values(spec, ev, ctx, row, item_id, "videos")
    ctx["n_images"] = sum(image is not None for image in images)
    text = ev.text("prompt", spec.prompt, ctx, item_id)
    system = ev.text("system", spec.system, ctx, item_id).strip() if spec.system else ""
    gold = ev.value("gold", spec.gold, ctx, item_id, column_ok=True)
    meta = {key: ev.value(f"meta.{key}", expr, ctx, item_id) for key, expr in spec.meta.items()}
    _check_options(spec, meta, item_id)
    messages = build_messages(text, images, system=system, max_image_pixels=max_image_pixels,
                              where=f"{spec.name}: item {item_id}", base_dir=part.table.base_dir, audios=audios,
                              videos=videos, audio_part=spec.audio_part)
    return Item(task=spec.name, item_id=item_id, messages=messages, gold=_jsonable(gold), meta=_jsonable(meta))


def subset_key(item_id: str) -> tuple[str, str]:
    """Sort key of the deterministic `limit` subset."""
    return hashlib.sha256(item_id.encode("utf-8")).hexdigest(), item_id


def iter_items(spec: TaskSpec, limit: Optional[int] = None, data_dir: Optional[str] = None,
               max_image_pixels: Optional[int] = None) -> Iterator[Item]:
    """The task's items in dataset order; `limit` keeps a deterministic hash-spread subset (see module doc)."""
    if limit is not None and limit < 1:
        raise UserError(f"{spec.name}: limit must be at least 1, got {limit}")
    parts = open_parts(spec, data_dir)
    ev = _Evaluator(spec)
    many = len(parts) > 1
    chosen: Optional[set[tuple[int, int]]] = None
    if limit is not None:
        candidates = []
        for p, part in enumerate(parts):
            for index, row in enumerate(part.table.text_rows()):
                ctx = _context(part, index, row)
                if _keep(spec, ev, ctx, index):
                    candidates.append((subset_key(_item_id(spec, ev, part, index, ctx, many)), p, index))
        chosen = {(p, index) for _, p, index in sorted(candidates)[:limit]}
    seen: set[str] = set()
    for p, part in enumerate(parts):
        for index, row in enumerate(part.table.rows()):
            if chosen is not None and (p, index) not in chosen:
                continue
            ctx = _context(part, index, row)
            if chosen is None and not _keep(spec, ev, ctx, index):
                continue
            item_id = _item_id(spec, ev, part, index, ctx, many)
            if item_id in seen:
                raise UserError(f"{spec.source}: id_field: duplicate item id {item_id!r}")
            seen.add(item_id)
            yield _item_or_bad(spec, ev, part, index, item_id, ctx, max_image_pixels)


def _item_or_bad(spec: TaskSpec, ev: _Evaluator, part: Part, index: int, item_id: str, ctx: dict[str, Any],
                 max_image_pixels: Optional[int]) -> Item:
    """The item, or (a row the spec cannot render: a missing image, a failing expression) an Item carrying only
    the one-line error, which the runner stores as that item's `bad_item` error instead of ending the task."""
    try:
        return _build_item(spec, ev, part, index, item_id, ctx, max_image_pixels)
    except UserError as exc:  # ConfigError included
        return Item(task=spec.name, item_id=item_id, messages=[], gold=None, error=str(exc))


def cached_item_count(spec: TaskSpec, data_dir: Optional[str] = None) -> Optional[int]:
    """Rows available locally without touching the network (local files, a local copy's own TSV, or the
    `datasets` cache's split sizes); None when unknown or when a `where` filter makes the count depend on the
    rows."""
    if spec.where:
        return None
    total = 0
    for source in spec.sources:
        if source.path:
            try:
                total += len(load_local(spec, source, data_dir))
            except UserError:
                return None
            continue
        for config in source.configs:
            for split in source.splits:
                try:
                    table = repo_files_table(source, config, split, data_dir)
                except UserError:
                    return None
                count = len(table) if table is not None else _cached_split_size(source.hub, config, split)
                if count is None:
                    return None
                total += count
    return total


def _cached_split_size(hub: str, config: Optional[str], split: str) -> Optional[int]:
    import datasets

    org_and_name = hub.split("/")
    org_and_name[-1] = _snake(org_and_name[-1])
    root = Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE))) / "___".join(org_and_name)
    infos = glob.glob(str(root / glob.escape(config or "default") / "*" / "*" / "dataset_info.json"))
    if not infos:
        return None
    latest = max(infos, key=os.path.getmtime)
    try:
        splits = json.loads(Path(latest).read_text(encoding="utf-8")).get("splits") or {}
        return int(splits[split]["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _snake(name: str) -> str:
    from datasets.naming import camelcase_to_snakecase

    return camelcase_to_snakecase(name)
