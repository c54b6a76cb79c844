"""A hub repo's own files read without `datasets`: a header-less TSV whose rows name members of an archive.

A revision that ships no parquet and a loading script that `datasets` >= 4 refuses (google/fleurs at its pinned
commit: `data/<config>/<split>.tsv` beside `data/<config>/audio/<split>.tar.gz`) is read from a local copy this way.
The source's `files:` mapping says how (docs/tasks.md, "Repo files"):

    tsv: data/{config}/{split}.tsv          one row per line, cells split on tabs, no header, no quoting
    columns: [id, file_name, ...]           the cells' names in order; a line with another count is refused
    archive: data/{config}/audio/{split}.tar.gz
    member: file_name                       the column naming each row's archive member, by base name
    media: audio                            the column the member's bytes land in, as `{bytes, path}`

Rows come in archive order, as a loading script that walks the archive and looks each member's base name up in
the TSV yields them (FLEURS' does), so the hub's parquet conversion holds the same rows in the same order.
Members the TSV does not name are skipped, as there.  A row whose member the archive lacks (the script would drop
it silently) comes after them with a `MissingMedia` cell: that item becomes a bad item naming the archive.  The
archive is streamed, one member in memory at a time, never extracted.
"""
from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import ConfigError, UserError
from .tables import MissingMedia, Table, first_line

FILES_KEYS = {"tsv", "columns", "archive", "member", "media"}
PLACEHOLDERS = {"config": "c", "split": "s"}


@dataclass(frozen=True)
class RepoFiles:
    tsv: str
    columns: tuple[str, ...]
    archive: str
    member: str
    media: str

    def paths(self, folder: Path, config: Optional[str], split: str) -> tuple[Path, Path]:
        """The TSV and the archive of one config x split inside a local copy of the repo."""
        return (folder / self.tsv.format(config=config, split=split),
                folder / self.archive.format(config=config, split=split))


def parse_repo_files(path: Path, name: str, raw: Any) -> RepoFiles:
    if not isinstance(raw, dict):
        raise ConfigError(path, name, f"expected a mapping with {', '.join(sorted(FILES_KEYS))}, got {raw!r}")
    for key in sorted(FILES_KEYS):
        if key not in raw:
            raise ConfigError(path, f"{name}.{key}", "missing")
    for key in raw:
        if key not in FILES_KEYS:
            raise ConfigError(path, f"{name}.{key}", f"unknown field (known: {', '.join(sorted(FILES_KEYS))})")
    text = {}
    for key in ("tsv", "archive", "member", "media"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ConfigError(path, f"{name}.{key}", f"expected a string, got {raw[key]!r}")
        text[key] = raw[key]
    for key in ("tsv", "archive"):
        try:
            text[key].format(**PLACEHOLDERS)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(path, f"{name}.{key}", f"the placeholders are {{config}} and {{split}}: "
                                                     f"{first_line(exc)}") from None
    columns = raw["columns"]
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns):
        raise ConfigError(path, f"{name}.columns", f"expected a list of column names, got {columns!r}")
    if len(set(columns)) != len(columns):
        raise ConfigError(path, f"{name}.columns", "names a column twice")
    if text["member"] not in columns:
        raise ConfigError(path, f"{name}.member", f"{text['member']!r} is not one of `columns`")
    if text["media"] in columns:
        raise ConfigError(path, f"{name}.media", f"{text['media']!r} is already a TSV column")
    return RepoFiles(tsv=text["tsv"], columns=tuple(columns), archive=text["archive"], member=text["member"],
                     media=text["media"])


def locate(files: RepoFiles, folder: Path, config: Optional[str], split: str) -> Optional[tuple[Path, Path]]:
    """The (TSV, archive) of a local copy holding the repo's own files; None when it holds neither (a parquet
    copy, read through `datasets`).  Only one of the two is a UserError naming the other."""
    tsv, archive = files.paths(folder, config, split)
    if not tsv.is_file() and not archive.is_file():
        return None
    for present, missing in ((tsv, archive), (archive, tsv)):
        if not missing.is_file():
            raise UserError(f"{missing} not found beside {present}: the local copy holds half of the repo's files "
                            f"for {config or '-'} / {split}; download {missing.relative_to(folder)} too")
    return tsv, archive


class ArchiveTsvTable(Table):
    """Rows of a header-less TSV, each with its archive member's bytes (see the module doc for the order)."""

    def __init__(self, files: RepoFiles, tsv: Path, archive: Path):
        self.files, self.tsv, self.archive, self.base_dir = files, tsv, archive, None
        self._rows = list(self._read_tsv())
        self._by_member = {row[files.member].rsplit("/", 1)[-1]: index for index, row in enumerate(self._rows)}
        self._order: Optional[list[int]] = None

    def _read_tsv(self) -> Iterator[dict[str, Any]]:
        names, first_line_of = self.files.columns, {}
        try:
            data = self.tsv.read_bytes()
        except OSError as exc:
            raise UserError(f"{self.tsv}: cannot read: {exc.strerror}") from None
        for number, raw in enumerate(data.split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError as exc:
                raise UserError(f"{self.tsv}:{number}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != len(names):
                raise UserError(f"{self.tsv}:{number}: {len(cells)} tab-separated cells, expected {len(names)} "
                                f"({', '.join(names)})")
            row = dict(zip(names, cells))
            member = row[self.files.member].rsplit("/", 1)[-1]
            if member in first_line_of:
                raise UserError(f"{self.tsv}:{number}: {self.files.member} {member!r} is already on line "
                                f"{first_line_of[member]}")
            first_line_of[member] = number
            yield row

    def __len__(self) -> int:
        return len(self._rows)

    def _members(self, with_bytes: bool) -> Iterator[tuple[int, str, Optional[bytes]]]:
        """(row index, member name, bytes) of each archive member a row names, in archive order, first copy only;
        then the rows whose member the archive lacks, with no name."""
        seen: set[int] = set()
        try:
            with tarfile.open(self.archive, mode="r|*") as tar:
                for member in tar:
                    index = self._by_member.get(member.name.rsplit("/", 1)[-1]) if member.isfile() else None
                    if index is None or index in seen:
                        continue
                    seen.add(index)
                    handle = tar.extractfile(member) if with_bytes else None
                    yield index, member.name, handle.read() if handle else None
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise UserError(f"{self.archive}: cannot read the archive: {first_line(exc)}") from None
        for index in range(len(self._rows)):
            if index not in seen:
                yield index, "", None

    def _walk(self, with_media: bool) -> Iterator[dict[str, Any]]:
        order = []
        for index, name, data in self._members(with_bytes=with_media):
            order.append(index)
            row = dict(self._rows[index])
            if with_media:
                member = row[self.files.member]
                row[self.files.media] = {"bytes": data, "path": name} if name else MissingMedia(
                    f"{member} is not in {self.archive}")
            yield row
        self._order = order

    def rows(self) -> Iterator[dict[str, Any]]:
        return self._walk(with_media=True)

    def text_rows(self) -> Iterator[dict[str, Any]]:
        """The rows without their media cell, in the same order (the archive's headers are read once for it)."""
        if self._order is None:
            return self._walk(with_media=False)
        return (dict(self._rows[index]) for index in self._order)
