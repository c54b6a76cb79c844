"""Rows of one dataset part, streamed: a hub dataset's memory-mapped Arrow table, JSONL line by line, parquet in
record batches, a VLMEvalKit TSV a record at a time (an image cell that names another row's index is read from
that row, found by seeking)."""
from __future__ import annotations

import abc
import ast
import csv
import io
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import UserError

# A VLMEvalKit image cell this short is the `index` of another row whose image it reuses.
TSV_IMAGE_REF_MAX = 64


@dataclass(frozen=True)
class MissingMedia:
    """A media cell whose data is not there (an archive without the row's member): building the item fails with
    `reason`, which makes it a bad item rather than ending the task."""

    reason: str


class Table(abc.ABC):
    """The rows of one part (source x config x split), streamed in dataset order.

    A table may be walked several times (the `limit` subset walks the text once, then the rows); no walk holds more
    than one row's (or one batch's) cells in memory."""

    base_dir: Optional[Path] = None  # for image cells holding relative file paths

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def rows(self) -> Iterator[dict[str, Any]]:
        """Every row, media cells as stored (base64, bytes, paths): they are decoded when the item is built."""

    def text_rows(self) -> Iterator[dict[str, Any]]:
        """Every row, media cells left out where the format allows it (for ids and filters)."""
        return self.rows()


def _is_feature(feature: Any, kind: type) -> bool:
    """`feature` is `kind`, or a sequence/list of it."""
    return (isinstance(feature, kind) or isinstance(getattr(feature, "feature", None), kind)
            or (isinstance(feature, list) and bool(feature) and isinstance(feature[0], kind)))


class HFTable(Table):
    def __init__(self, dataset: Any, base_dir: Optional[Path] = None):
        import datasets

        # Audio and video cells stay undecoded `{bytes, path}`: their bytes are sent as they are (media.py), and
        # decoding would need torchcodec.
        for name, feature in dataset.features.items():
            if isinstance(feature, (datasets.Audio, datasets.Video)):
                dataset = dataset.cast_column(name, type(feature)(decode=False))
        self.dataset, self.base_dir = dataset, base_dir
        self.image_columns = [name for name, feature in dataset.features.items()
                              if any(_is_feature(feature, kind) for kind in (datasets.Image, datasets.Audio,
                                                                               datasets.Video))]

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)  # memory-mapped Arrow: one row decoded at a time

    def text_rows(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset.remove_columns(self.image_columns) if self.image_columns else self.dataset)


class ListTable(Table):
    """Rows already in memory (plain CSV files, which hold no images)."""

    def __init__(self, rows: list[dict[str, Any]], base_dir: Optional[Path] = None):
        self._rows, self.base_dir = rows, base_dir

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)


class JsonlTable(Table):
    """JSON Lines, parsed one line at a time on every walk."""

    def __init__(self, path: Path):
        self.path, self.base_dir = path, path.parent
        self._len: Optional[int] = None

    def __len__(self) -> int:
        if self._len is None:
            with self.path.open("rb") as handle:
                self._len = sum(1 for line in handle if line.strip())
        return self._len

    def rows(self) -> Iterator[dict[str, Any]]:
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{self.path}:{number}: invalid JSON: {exc.msg}") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{self.path}:{number}: expected a JSON object (column: value), "
                                        f"got a {type(row).__name__}")
                    yield row


class ParquetTable(Table):
    """Parquet read in record batches (pyarrow); media structs (`{bytes, path}`) stay undecoded until the item is
    built, and walks for ids and filters skip binary columns."""

    BATCH_ROWS = 64

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.base_dir = path, path.parent
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: cannot read parquet: {first_line(exc)}") from None
        schema = self.file.schema_arrow

        def binary(kind: Any) -> bool:
            if pa.types.is_list(kind) or pa.types.is_large_list(kind):
                return binary(kind.value_type)
            if pa.types.is_struct(kind):
                return any(binary(kind.field(i).type) for i in range(kind.num_fields))
            return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

        self.text_columns = [f.name for f in schema if not binary(f.type)]
        self.all_text = len(self.text_columns) == len(schema)

    def __len__(self) -> int:
        return self.file.metadata.num_rows

    def _walk(self, columns: Optional[list[str]]) -> Iterator[dict[str, Any]]:
        for batch in self.file.iter_batches(batch_size=self.BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()

    def rows(self) -> Iterator[dict[str, Any]]:
        return self._walk(None)

    def text_rows(self) -> Iterator[dict[str, Any]]:
        return self._walk(None if self.all_text else self.text_columns)


class TsvTable(Table):
    """VLMEvalKit TSV: `image` holds base64, a stringified list of base64 strings, or another row's `index`.

    One streamed pass (csv module, a record at a time) notes where each record starts and copies the text cells;
    pandas parses that copy, so the columns get the dtypes of reading the whole file as before.  Walks stream the
    image column again, and a reference to another row's image seeks to that row's record."""

    def __init__(self, path: Path):
        import pandas as pd

        self.path, self.base_dir = path, path.parent
        csv.field_size_limit(2 ** 31 - 1)  # a base64 image cell is far above the default 128 KiB
        text = io.StringIO()
        writer = csv.writer(text, delimiter="\t", lineterminator="\n")
        self.offsets: list[int] = []
        try:
            with path.open("rb") as handle:
                records = _tsv_records(handle)
                _, header = next(records, (0, []))
                self.image_at = header.index("image") if "image" in header else -1
                for offset, cells in itertools.chain([(0, header)], records):
                    self.offsets.append(offset)
                    writer.writerow(cells[:self.image_at] + cells[self.image_at + 1:] if self.image_at >= 0 else cells)
            text.seek(0)
            self.frame = pd.read_csv(text, sep="\t")
        except (ValueError, OSError, csv.Error) as exc:
            raise UserError(f"{path}: cannot read tsv-vlmeval: {first_line(exc)}") from None
        del self.offsets[0]  # the header's
        if len(self.frame) != len(self.offsets):  # pandas and csv disagree on the records: never pair them wrongly
            raise UserError(f"{path}: cannot read tsv-vlmeval: {len(self.offsets)} records, but pandas reads "
                            f"{len(self.frame)} rows from their text cells")
        self.has_image = self.image_at >= 0
        self.columns = list(self.frame.columns)
        self.position = {str(v): i for i, v in enumerate(self.frame["index"])} if "index" in self.frame else {}

    def __len__(self) -> int:
        return len(self.frame)

    def text_rows(self) -> Iterator[dict[str, Any]]:
        for values in self.frame.itertuples(index=False, name=None):
            yield {k: plain_value(v) for k, v in zip(self.columns, values)}

    def rows(self) -> Iterator[dict[str, Any]]:
        if not self.has_image:
            yield from self.text_rows()
            return
        with self.path.open("rb") as handle:
            records = _tsv_records(handle)
            next(records)  # header
            for index, (row, (_, cells)) in enumerate(zip(self.text_rows(), records)):
                try:
                    row["image"] = self._image(cells[self.image_at] if len(cells) > self.image_at else "")
                except (ValueError, SyntaxError):
                    raise UserError(f"{self.path}: row {index + 1}: `image` looks like a list but is not a Python "
                                    "list of base64 strings") from None
                yield row

    def _image(self, cell: str, depth: int = 0) -> Any:
        if not cell:
            return None
        if len(cell) <= TSV_IMAGE_REF_MAX and cell in self.position and depth < 3:  # depth: no reference loops
            return self._image(self._image_cell(self.position[cell]), depth + 1)
        if cell.startswith("["):
            return list(ast.literal_eval(cell))
        return cell

    def _image_cell(self, index: int) -> str:
        """Row `index`'s raw image cell, read from its own record."""
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[index])
            _, cells = next(_tsv_records(handle))
        return cells[self.image_at] if len(cells) > self.image_at else ""


def _tsv_records(handle: Any) -> Iterator[tuple[int, list[str]]]:
    """(byte offset, cells) of each non-blank record of a tab-separated binary handle, from where it stands."""
    lines = _OffsetLines(handle)
    reader = csv.reader(lines, delimiter="\t")
    while True:
        start = lines.offset
        cells = next(reader, None)
        if cells is None:
            return
        if cells:
            yield start, cells


class _OffsetLines:
    """Decoded lines of a binary handle, counting the bytes read (csv.reader asks for exactly one record's lines)."""

    def __init__(self, handle: Any):
        self.handle, self.offset = handle, handle.tell()

    def __iter__(self) -> "_OffsetLines":
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        return line.decode("utf-8")


def plain_value(value: Any) -> Any:
    """pandas/numpy cell -> plain Python (NaN -> None)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
