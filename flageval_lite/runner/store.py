"""Durable per-run results: one SQLite file, written the moment each item finishes.

Durability choice: WAL journal with `synchronous=NORMAL`.  A commit appends to the WAL file before it
returns, so the data sits in the OS page cache and survives the writer being killed (kill -9, OOM,
Ctrl-C) — only an OS crash or power loss can drop the last few commits, and even then the database
stays consistent (WAL replay is atomic per transaction).  FULL would add an fsync to every one of the
thousands of per-item commits for protection against power loss that a rerun (which resumes) already
gives us.

The records key is (run_id, cache_key) rather than cache_key alone: one file normally holds one run,
and the run id in the key keeps a shared file from moving a record from one run into another.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from flageval_lite.errors import UserError
from flageval_lite.records import Item, Record, Score
from flageval_lite.secrets import redact

THUMBNAIL_PX = 256
# Audio clips up to this size (as a data URL) are kept with the item for the report's player; longer ones are not.
AUDIO_REPORT_CHARS = 1 << 20
MEDIA_PARTS = ("image_url", "input_audio", "audio_url", "video_url")

_RECORD_FIELDS = ("run_id", "role", "endpoint_id", "task", "item_id", "prompt_hash", "params", "response_text",
                  "reasoning_content", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs",
                  "latency_s", "ttft_s", "itl_s", "attempts", "error", "error_kind", "started_at",
                  "attempt_errors", "repeat")
_RECORD_JSON = ("params", "logprobs", "itl_s", "attempt_errors")
_ITEM_COLUMNS = "task, item_id, prompt_hash, gold, meta, prompt_text, images"
_ITEM_TEXT_COLUMNS = "task, item_id, prompt_hash, gold, meta, prompt_text, '[]'"
_SCORE_FIELDS = ("role", "task", "item_id", "value", "outcome", "extracted", "gold", "response_text",
                 "finish_reason", "completion_tokens", "latency_s", "ttft_s", "error", "group", "repeats", "detail")
# Columns added after the first release: files written before them get them with these defaults.
_SCORE_ADDED = {"repeats": "INTEGER NOT NULL DEFAULT 1", "detail": "TEXT NOT NULL DEFAULT '{}'"}
_ADDED_COLUMNS = {"records": {"attempt_errors": "TEXT NOT NULL DEFAULT '[]'", "repeat": "INTEGER NOT NULL DEFAULT 0"},
                  "scores": _SCORE_ADDED, "repeat_scores": _SCORE_ADDED}


def _columns(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{name}"' for name in names)  # quoted: "group" is an SQL keyword


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    cache_key TEXT NOT NULL,
    {_columns(_RECORD_FIELDS)},
    PRIMARY KEY (run_id, cache_key)
);
CREATE TABLE IF NOT EXISTS items (
    run_id TEXT NOT NULL, task TEXT NOT NULL, item_id TEXT NOT NULL,
    prompt_hash TEXT, gold TEXT, meta TEXT, prompt_text TEXT, images TEXT,
    PRIMARY KEY (run_id, task, item_id)
);
CREATE TABLE IF NOT EXISTS scores (
    run_id TEXT NOT NULL,
    {_columns(_SCORE_FIELDS)},
    PRIMARY KEY (run_id, role, task, item_id)
);
CREATE TABLE IF NOT EXISTS repeat_scores (
    run_id TEXT NOT NULL, repeat INTEGER NOT NULL,
    {_columns(_SCORE_FIELDS)},
    PRIMARY KEY (run_id, role, task, item_id, repeat)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS teacher_forced (
    run_id TEXT NOT NULL, role TEXT NOT NULL, task TEXT NOT NULL, item_id TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (run_id, role, task, item_id)
);
"""

# An earlier error is replaced by any later result; a stored success is never overwritten.  The attempts and
# the failed attempts' kinds of the replaced error are kept: they are the item's fault history over all reruns.
_KEPT_HISTORY = {
    "attempts": "records.attempts + excluded.attempts",
    "attempt_errors": "(SELECT json_group_array(value) FROM (SELECT value FROM json_each(records.attempt_errors) "
                      "UNION ALL SELECT value FROM json_each(excluded.attempt_errors)))",
}
_UPSERT_RECORD = (
    f"INSERT INTO records (cache_key, {_columns(_RECORD_FIELDS)}) "
    f"VALUES ({', '.join('?' * (len(_RECORD_FIELDS) + 1))}) "
    f"ON CONFLICT (run_id, cache_key) DO UPDATE SET "
    + ", ".join(f'"{n}" = ' + _KEPT_HISTORY.get(n, f'excluded."{n}"') for n in _RECORD_FIELDS)
    + " WHERE records.error != ''"
)


def _item_dict(row: tuple) -> dict[str, Any]:
    task, item_id, digest, gold, meta, text, images = row
    return {"task": task, "item_id": item_id, "prompt_hash": digest, "gold": json.loads(gold),
            "meta": json.loads(meta), "prompt_text": text, "images": json.loads(images)}


# json.dumps with these options would build a new encoder on every call (a few µs each, ~10 calls per answer).
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def _score_row(score: Score) -> list[Any]:
    return [_dumps(score.detail) if name == "detail" else getattr(score, name) for name in _SCORE_FIELDS]


def _score_of(row: Iterable[Any]) -> Score:
    data = dict(zip(_SCORE_FIELDS, row))
    data["detail"] = json.loads(data["detail"] or "{}")
    return Score(**data)


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The text parts of all messages joined by blank lines (images left out)."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n\n".join(parts)


def image_urls(messages: list[dict[str, Any]]) -> list[str]:
    urls = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    image = part.get("image_url")
                    urls.append(image.get("url", "") if isinstance(image, dict) else str(image))
    return urls


def has_media(messages: list[dict[str, Any]]) -> bool:
    """True when any message carries an image, audio or video part."""
    return any(isinstance(part, dict) and part.get("type") in MEDIA_PARTS
               for message in messages if isinstance(message.get("content"), list) for part in message["content"])


def audio_urls(messages: list[dict[str, Any]]) -> list[str]:
    """Data URLs of the audio parts (`input_audio` becomes `data:audio/<format>;base64,...`)."""
    urls = []
    for message in messages:
        for part in message.get("content") if isinstance(message.get("content"), list) else ():
            if not isinstance(part, dict):
                continue
            if part.get("type") == "input_audio" and isinstance(part.get("input_audio"), dict):
                fmt = str(part["input_audio"].get("format", "wav"))
                mime = "audio/mpeg" if fmt == "mp3" else f"audio/{fmt}"
                urls.append(f"data:{mime};base64,{part['input_audio'].get('data', '')}")
            elif part.get("type") == "audio_url" and isinstance(part.get("audio_url"), dict):
                urls.append(str(part["audio_url"].get("url", "")))
    return [url for url in urls if url.startswith("data:audio/")]


def thumbnail_data_url(url: str, where: str) -> str:
    """A small JPEG data URL (long side <= 256 px) of a data-URL image; other URLs are kept as they are."""
    if not url.startswith("data:"):
        return url
    from PIL import Image, UnidentifiedImageError  # only items with images pay for Pillow

    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=False)
        with Image.open(io.BytesIO(raw)) as img:
            img.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEG: decode at reduced scale, far faster
            img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            out = io.BytesIO()
            img.convert("RGB").save(out, "JPEG", quality=75)
    except (IndexError, binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{where}: image is not a decodable data URL ({exc})") from exc
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


class RunLock:
    """One process per run: `run.lock` in the run folder, held with flock (the kernel drops it when its holder dies,
    kill -9 included, so a stale lock from a dead pid is simply taken over) and naming the holder's pid."""

    def __init__(self, run_dir: Path, run_id: str):
        self.path = Path(run_dir) / "run.lock"
        self.run_id = run_id
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run {self.run_id} is in use by process {holder} ({self.path}); wait for it to end, or "
                            f"stop it and rerun with --run-id {self.run_id} to resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Store:
    """One SQLite connection per process over `path`; every write commits at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 10000")  # readers (report, scoring) may share the file
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            self._check_columns()
            self._db.execute("CREATE INDEX IF NOT EXISTS records_by_task ON records (run_id, role, task)")
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a usable results database ({exc})") from exc
        if mode.lower() != "wal":
            raise UserError(f"{self.path}: SQLite refused WAL mode (got {mode}); put the run directory on a local disk")

    def _check_columns(self) -> None:
        expected = {"records": ("cache_key",) + _RECORD_FIELDS, "scores": ("run_id",) + _SCORE_FIELDS,
                    "repeat_scores": ("run_id", "repeat") + _SCORE_FIELDS,
                    "items": ("run_id", "task", "item_id", "gold", "meta", "prompt_text", "images"),
                    "meta": ("key", "value")}
        for table, columns in expected.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            added = _ADDED_COLUMNS.get(table, {})
            missing = [c for c in columns if c not in have and c not in added]
            if missing:
                raise UserError(f"{self.path}: table {table} lacks columns {', '.join(missing)}; "
                                f"not a flageval-lite results file")
            for name, declaration in added.items():
                if name not in have:
                    self._db.execute(f'ALTER TABLE {table} ADD COLUMN "{name}" {declaration}')

    def close(self) -> None:
        self._db.close()

    # Writes autocommit one by one unless grouped: the runner groups one event-loop turn's writes
    # into a single transaction (see runner/jobs.py GroupCommit for the durability contract).
    def begin(self) -> None:
        self._db.execute("BEGIN")

    def commit(self) -> None:
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        """Undo an open transaction; a no-op where SQLite already rolled it back by itself."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ records

    def put_record(self, rec: Record, cache_key: Optional[str] = None) -> None:
        """Store `rec` (see the upsert rule above); `cache_key` is `rec.cache_key()` when the caller has it already."""
        values = [cache_key or rec.cache_key()]
        for name in _RECORD_FIELDS:
            value = getattr(rec, name)
            values.append(_dumps(value) if name in _RECORD_JSON else value)
        self._db.execute(_UPSERT_RECORD, values)

    def finished_keys(self, run_id: str) -> set[str]:
        rows = self._db.execute("SELECT cache_key FROM records WHERE run_id = ? AND error = ''", (run_id,))
        return {key for (key,) in rows}

    def records(self, run_id: str, role: Optional[str] = None, task: Optional[str] = None) -> Iterator[Record]:
        sql, args = self._filtered("SELECT * FROM records WHERE run_id = ?", run_id, role=role, task=task)
        cursor = self._db.execute(sql + " ORDER BY rowid", args)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            data = dict(zip(names, row))
            for name in _RECORD_JSON:
                data[name] = json.loads(data[name]) if data[name] is not None else None
            yield Record.from_dict(data)

    def error_counts(self, run_id: str) -> dict[tuple[str, str, str], int]:
        rows = self._db.execute("SELECT role, task, error_kind, COUNT(*) FROM records WHERE run_id = ? AND "
                                "error != '' GROUP BY role, task, error_kind", (run_id,))
        return {(role, task, kind): n for role, task, kind, n in rows}

    def fault_counts(self, run_id: str) -> dict[str, dict[str, dict[str, Any]]]:
        """role -> task -> {records, requests, retries, failed_attempts: {kind: n}, errors: {kind: n}}.

        records: stored answers (items × repeats); requests: HTTP requests they took over all reruns;
        retries: requests beyond each record's first; failed_attempts: every failed request by kind (retried
        or not); errors: records that failed for good (left out of the comparison) by kind."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        # A bad item's record took no request (attempts 0): it adds no retry either.
        rows = self._db.execute("SELECT role, task, COUNT(*), SUM(attempts), SUM(MAX(attempts - 1, 0)) FROM records "
                                "WHERE run_id = ? GROUP BY role, task ORDER BY MIN(rowid)", (run_id,))
        for role, task, records, requests, retries in rows:
            out.setdefault(role, {})[task] = {"records": records, "requests": requests, "retries": retries,
                                              "failed_attempts": {}, "errors": {}}
        rows = self._db.execute("SELECT r.role, r.task, a.value, COUNT(*) FROM records r, json_each(r.attempt_errors) a "
                                "WHERE r.run_id = ? GROUP BY r.role, r.task, a.value ORDER BY a.value", (run_id,))
        for role, task, kind, n in rows:
            out[role][task]["failed_attempts"][kind] = n
        for (role, task, kind), n in sorted(self.error_counts(run_id).items()):
            out[role][task]["errors"][kind] = n
        return out

    # ------------------------------------------------------------------ items

    def has_item(self, run_id: str, task: str, item_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM items WHERE run_id = ? AND task = ? AND item_id = ?",
                                (run_id, task, item_id)).fetchone() is not None

    def put_item(self, run_id: str, item: Item, prompt_hash: Optional[str] = None) -> None:
        """Store an item once per (run, task, item); thumbnails are only made the first time.  Audio clips short
        enough (AUDIO_REPORT_CHARS) are kept as they are after the thumbnails, for the report's player.
        `prompt_hash` is `item.prompt_hash()` when the caller has it already."""
        urls = image_urls(item.messages)
        audios = [url for url in audio_urls(item.messages) if len(url) <= AUDIO_REPORT_CHARS]
        if (urls or audios) and self.has_item(run_id, item.task, item.item_id):
            return
        where = f"task {item.task} item {item.item_id}"
        images = [thumbnail_data_url(url, f"{where} image {k + 1}") for k, url in enumerate(urls)] + audios
        self._db.execute("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (run_id, item.task, item.item_id, prompt_hash or item.prompt_hash(), _dumps(item.gold), _dumps(item.meta),
                          prompt_text(item.messages), _dumps(images)))

    def items(self, run_id: str, task: Optional[str] = None, media: bool = True) -> Iterator[dict[str, Any]]:
        """Stored items in insertion order: {task, item_id, prompt_hash, gold, meta, prompt_text, images}.
        `media=False` leaves `images` empty: scoring needs none, and a task's thumbnails together run to
        hundreds of MB."""
        sql, args = self._filtered(f"SELECT {_ITEM_COLUMNS if media else _ITEM_TEXT_COLUMNS} FROM items "
                                   "WHERE run_id = ?", run_id, task=task)
        for row in self._db.execute(sql + " ORDER BY rowid", args):
            yield _item_dict(row)

    def item(self, run_id: str, task: str, item_id: str) -> Optional[dict[str, Any]]:
        """One stored item, as `items` gives it (media included); None when absent."""
        row = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE run_id = ? AND task = ? AND item_id = ?",
                               (run_id, task, item_id)).fetchone()
        return _item_dict(row) if row else None

    # ------------------------------------------------------------------ scores

    def put_scores(self, run_id: str, scores: list[Score]) -> None:
        """One Score per item (repeats already aggregated), replaced per (run, role, task, item)."""
        sql = (f"INSERT OR REPLACE INTO scores (run_id, {_columns(_SCORE_FIELDS)}) "
               f"VALUES ({', '.join('?' * (len(_SCORE_FIELDS) + 1))})")
        self._write_many(sql, [[run_id] + _score_row(score) for score in scores])

    def scores(self, run_id: str, role: Optional[str] = None, task: Optional[str] = None) -> list[Score]:
        sql, args = self._filtered(f"SELECT {_columns(_SCORE_FIELDS)} FROM scores "
                                   f"WHERE run_id = ?", run_id, role=role, task=task)
        return [_score_of(row) for row in self._db.execute(sql + " ORDER BY rowid", args)]

    def put_repeat_scores(self, run_id: str, scores: Iterable[tuple[int, Score]]) -> None:
        """The Score of every repeat of a task asked several times, as (repeat, Score)."""
        sql = (f"INSERT OR REPLACE INTO repeat_scores (run_id, repeat, {_columns(_SCORE_FIELDS)}) "
               f"VALUES ({', '.join('?' * (len(_SCORE_FIELDS) + 2))})")
        self._write_many(sql, [[run_id, repeat] + _score_row(score) for repeat, score in scores])

    def repeat_scores(self, run_id: str, role: str, task: Optional[str] = None) -> dict[int, list[Score]]:
        """repeat -> that repeat's Scores of one role, in stored order ({} when no task had repeats)."""
        sql, args = self._filtered(f"SELECT repeat, {_columns(_SCORE_FIELDS)} FROM repeat_scores WHERE run_id = ?",
                                   run_id, role=role, task=task)
        out: dict[int, list[Score]] = {}
        for repeat, *row in self._db.execute(sql + " ORDER BY repeat, rowid", args):
            out.setdefault(repeat, []).append(_score_of(row))
        return out

    def _write_many(self, sql: str, rows: list[list[Any]]) -> None:
        self._db.execute("BEGIN")  # one commit for the batch (the connection autocommits otherwise)
        try:
            self._db.executemany(sql, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ teacher forcing

    def put_teacher_forced(self, run_id: str, role: str, rows: Iterable[tuple[str, str, Any]]) -> None:
        """(task, item_id, JSON value) rows of one role -- the token sequences or one server's scores (see
        teacher_forced.py) -- in one commit; a row replaces the stored one of the same key."""
        self._write_many("INSERT OR REPLACE INTO teacher_forced VALUES (?, ?, ?, ?, ?)",
                         [[run_id, role, task, item_id, _dumps(value)] for task, item_id, value in rows])

    def teacher_forced(self, run_id: str, role: str) -> dict[tuple[str, str], Any]:
        """(task, item_id) -> value of one role, in the order stored."""
        rows = self._db.execute("SELECT task, item_id, value FROM teacher_forced WHERE run_id = ? AND role = ? "
                                "ORDER BY rowid", (run_id, role))
        return {(task, item_id): json.loads(value) for task, item_id, value in rows}

    # ------------------------------------------------------------------ meta

    def set_meta(self, key: str, value: Any) -> None:
        """Secrets (keys, tokens) are redacted: the meta table is what manifests and reports are made of."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, _dumps(redact(value))))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _filtered(sql: str, run_id: str, **filters: Optional[str]) -> tuple[str, list[Any]]:
        args: list[Any] = [run_id]
        for column, value in filters.items():
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        return sql, args


class StoredItems(Mapping[str, dict[str, Any]]):
    """One task's stored items by id, each read (media included) only when looked up: the report shows a few
    items' images, and reading every item's would hold a whole task's thumbnails in memory."""

    def __init__(self, store: Store, run_id: str, task: str):
        self.store, self.run_id, self.task = store, run_id, task
        self._ids = [it["item_id"] for it in store.items(run_id, task=task, media=False)]

    def __getitem__(self, item_id: str) -> dict[str, Any]:
        found = self.store.item(self.run_id, self.task, item_id)
        if found is None:
            raise KeyError(item_id)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)
