"""Opening a task's sources as parts (source × config × split): a hub dataset through `datasets` (pinned
revision, offline cache, or a local copy under `<data_dir>/<hub id>/`), a local copy holding the repo's own TSV +
archive where the source says how to read them (`files:`, repo_files.py; those win over `datasets` in the same
copy), or a local file, with one-line errors naming what is missing and how to get it.

`datasets` keeps a hub dataset's Arrow cache under `<org>___<name>/<config>/<version>/<commit>/`, online (the
commit it resolved the revision to) and offline alike, so the cache files of a loaded split name the commit it was
read at (`loaded_commit`).  Offline, `datasets` reads the newest cached commit whatever revision was asked, so a
pinned source whose cache holds another commit is refused."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import ConfigError, UserError
from ..records import stable_hash
from .repo_files import ArchiveTsvTable, locate
from .spec import DataSource, TaskSpec
from .tables import HFTable, JsonlTable, ListTable, ParquetTable, Table, TsvTable, first_line, plain_value

COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass
class Part:
    label: str
    source: DataSource
    config: Optional[str]
    split: Optional[str]
    table: Table
    shots: dict[Any, list[dict[str, Any]]] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars while we load (they would interleave with the run's own progress)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _missing_hub_message(spec: TaskSpec, source: DataSource, data_dir: Optional[str]) -> str:
    looked = f" (and {Path(data_dir) / source.hub} does not exist)" if data_dir else ""
    include = ""
    if source.files:  # the repo's own files, just those of the task's configs and splits
        wanted = [str(p) for c in source.configs for s in source.splits for p in source.files.paths(Path(), c, s)]
        include = " --include " + " ".join(f'"{p}"' for p in wanted)
    return (f"{spec.title}: dataset {source.hub} (revision {source.revision}) is not in the offline cache{looked}; "
            f"download it on a connected machine with `huggingface-cli download {source.hub} --repo-type dataset "
            f"--revision {source.revision}{include} --local-dir DIR/{source.hub}` and pass --data-dir DIR "
            f"(DIR containing {source.hub}/...)")


def _load_hub(spec: TaskSpec, source: DataSource, config: Optional[str], split: str, data_dir: Optional[str]) -> Any:
    import datasets

    local = local_copy(source, data_dir)
    target, revision = (str(local), None) if local else (source.hub, source.revision or None)
    cache_dir = _local_cache_dir(local) if local else None
    where = f"{spec.title}: dataset {target}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    try:
        with _quiet_datasets():
            dataset = datasets.load_dataset(target, config, split=split, revision=revision, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as exc:
        if target == source.hub:
            raise UserError(_missing_hub_message(spec, source, data_dir)) from None
        raise UserError(f"{where}: {first_line(exc)}") from None
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as exc:
        raise UserError(f"{where}: {first_line(exc)}") from None
    except RuntimeError as exc:  # `datasets` >= 4 refuses a revision that still holds a loading script
        raise UserError(f"{where}: {first_line(exc)}; use a copy of its parquet files (docs/tasks.md, Revisions)") from None
    read = loaded_commit(dataset, source.hub) if target == source.hub else ""
    if read and COMMIT.fullmatch(source.revision) and read != source.revision:
        raise UserError(f"{where}: the datasets cache holds commit {read}, but {spec.source} pins {source.revision} "
                        f"(offline, datasets reads the newest cached commit); download the pinned revision "
                        f"(huggingface-cli download {source.hub} --repo-type dataset --revision {source.revision}) "
                        f"and pass --data-dir, or load it once online")
    return dataset


def loaded_commit(dataset: Any, hub: str) -> str:
    """The commit a split of `hub` was read at, from its cache files' folder (module doc); "" when they name none
    (a dataset held in memory, a cache folder not keyed by a commit)."""
    from datasets.naming import camelcase_to_snakecase

    org, _, name = hub.rpartition("/")
    folder_name = f"{org}___{camelcase_to_snakecase(name)}" if org else camelcase_to_snakecase(name)
    for cache_file in getattr(dataset, "cache_files", None) or ():
        folder = Path(cache_file["filename"]).parent
        if COMMIT.fullmatch(folder.name) and folder.parents[2].name == folder_name:
            return folder.name
    return ""


def hub_commits(spec: TaskSpec, source: DataSource, data_dir: Optional[str]) -> list[str]:
    """The commit each config × split of a hub source is read at ("" where it cannot be told)."""
    return [loaded_commit(_load_hub(spec, source, config, split, data_dir), source.hub)
            for config in source.configs for split in source.splits]


def local_copy(source: DataSource, data_dir: Optional[str]) -> Optional[Path]:
    """`<data_dir>/<hub id>/` when that folder exists: the local copy read instead of the hub."""
    local = Path(data_dir) / source.hub if data_dir else None
    return local if local is not None and local.is_dir() else None


def repo_files_table(source: DataSource, config: Optional[str], split: str,
                     data_dir: Optional[str]) -> Optional[ArchiveTsvTable]:
    """The part read from the repo's own TSV + archive, when the source says how and its local copy holds them."""
    local = local_copy(source, data_dir)
    if source.files is None or local is None:
        return None
    found = locate(source.files, local, config, split)
    return ArchiveTsvTable(source.files, *found) if found else None


def _hub_table(spec: TaskSpec, source: DataSource, config: Optional[str], split: str,
               data_dir: Optional[str]) -> Table:
    table = repo_files_table(source, config, split, data_dir)
    if table is not None:
        return table
    local = local_copy(source, data_dir)
    try:
        dataset = _load_hub(spec, source, config, split, data_dir)
    except UserError as exc:
        if source.files and local:  # neither layout there: say where the repo's own files were looked for
            raise UserError(f"{exc} (nor does it hold {source.files.paths(local, config, split)[0]})") from None
        raise
    # relative media paths in a cell (Video-MME's video files) resolve inside a local copy of the repo
    return HFTable(dataset, local)


def _local_cache_dir(folder: Path) -> str:
    """A `datasets` cache folder keyed by every file's name, size and mtime under `folder`.

    `datasets` keys the cache of a local folder by its dataset card, so rows edited or re-downloaded into the same
    folder would be served stale from the first load."""
    import datasets.config

    files = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(folder.rglob("*")) if p.is_file()]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "flageval-lite-local" / stable_hash(files))


def _resolve_path(spec: TaskSpec, source: DataSource, data_dir: Optional[str]) -> Path:
    path = Path(source.path)
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = ([Path(data_dir) / path] if data_dir else []) + [Path(spec.source).parent / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{spec.title}: data file {source.path} not found (looked in "
                    f"{', '.join(str(c.parent) for c in candidates)}); pass --data-dir DIR containing it")


def load_local(spec: TaskSpec, source: DataSource, data_dir: Optional[str]) -> Table:
    path = _resolve_path(spec, source, data_dir)
    if source.format == "jsonl":
        return JsonlTable(path)
    if source.format == "parquet":
        return ParquetTable(path)
    if source.format == "tsv-vlmeval":
        return TsvTable(path)
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot read {source.format}: {first_line(exc)}") from None
    return ListTable([{k: plain_value(v) for k, v in r.items()} for r in frame.to_dict("records")], path.parent)


def _part_label(spec: TaskSpec, source: DataSource, config: Optional[str], split: Optional[str]) -> str:
    if source.tag:
        return source.tag
    pieces = []
    if len(spec.sources) > 1:
        pieces.append((source.hub or source.path).rstrip("/").split("/")[-1])
    if len(source.configs) > 1:
        pieces.append(str(config))
    if len(source.splits) > 1:
        pieces.append(str(split))
    return "/".join(pieces) or str(config or split or Path(source.path).stem)


def open_parts(spec: TaskSpec, data_dir: Optional[str] = None) -> list[Part]:
    """Open every part of the task's data; raises UserError (one line) when any is unavailable."""
    parts = []
    for source in spec.sources:
        if source.path:
            parts.append(Part(_part_label(spec, source, None, None), source, None, None,
                              load_local(spec, source, data_dir)))
            continue
        for config in source.configs:
            for split in source.splits:
                table = _hub_table(spec, source, config, split, data_dir)
                part = Part(_part_label(spec, source, config, split), source, config, split, table)
                if spec.fewshot:
                    part.shots = _shots(spec, source, config, data_dir)
                parts.append(part)
    return parts


def _shots(spec: TaskSpec, source: DataSource, config: Optional[str], data_dir: Optional[str]) -> dict[Any, list]:
    """First n rows of the few-shot split per value of `fewshot.by`, in dataset order."""
    fewshot = spec.fewshot
    assert fewshot is not None
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in _hub_table(spec, source, config, fewshot.split, data_dir).text_rows():
        if fewshot.by and fewshot.by not in row:
            raise ConfigError(spec.source, "fewshot.by", f"no column {fewshot.by!r} in split {fewshot.split!r}")
        bucket = groups.setdefault(row[fewshot.by] if fewshot.by else None, [])
        if len(bucket) < fewshot.n:
            bucket.append(row)
    return groups
