"""Where a task's items came from, and which items were asked: the run manifest's `provenance`.

Per source: the dataset (hub id or file), configs, splits and the revision: as pinned in the task YAML; for a
source on a branch (`main`), the commit `datasets` actually read (sources.loaded_commit), or `unresolved` when
its cache names none; for a local copy read with --data-dir, the revision the copy records.  `huggingface-cli
download --local-dir` leaves one `.cache/huggingface/download/<file>.metadata` per file whose first line is the
commit it was downloaded at; a copy made otherwise may say so in a `REVISION` file at its top.  A source read from
the repo's own files (`files:`) lists the ones it read, relative to the copy.  A YAML revision that is a commit hash
and a copy that records another commit is refused: that copy holds other questions.  So are a resume, and a compare
of two runs, that read one source at two different commits.

Per role, `items_hash` is SHA-256 over the sorted (item_id, prompt hash) pairs of the records actually asked (the
first repeat), so two runs (or two sides of one run) asked the same questions exactly when their hashes agree.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import UserError
from ..records import Record
from .repo_files import locate
from .sources import COMMIT, hub_commits, local_copy
from .spec import DataSource, TaskSpec

UNRESOLVED = "unresolved"
METADATA_DIR = Path(".cache/huggingface/download")


def local_copy_revision(folder: Path) -> str:
    """The commit a local copy of a hub dataset records ("" when it records none, or several: a mixed copy)."""
    marker = folder / "REVISION"
    if marker.is_file():
        return marker.read_text(encoding="utf-8").strip()
    commits = set()
    for metadata in sorted((folder / METADATA_DIR).rglob("*.metadata")):
        first = metadata.read_text(encoding="utf-8").split("\n", 1)[0].strip()
        if COMMIT.fullmatch(first):
            commits.add(first)
    return commits.pop() if len(commits) == 1 else ""


def source_provenance(spec: TaskSpec, source: DataSource, data_dir: Optional[str]) -> dict[str, Any]:
    """One source's provenance record; UserError when a local copy records another commit than the pinned one."""
    if source.path:
        return {"dataset": source.path, "format": source.format, "revision": "", "revision_from": "local file"}
    record = {"dataset": source.hub, "configs": [c for c in source.configs if c is not None],
              "splits": list(source.splits), "revision": source.revision, "revision_from": "task yaml"}
    local = local_copy(source, data_dir)
    if local is not None:
        recorded = local_copy_revision(local)
        if COMMIT.fullmatch(source.revision) and COMMIT.fullmatch(recorded) and recorded != source.revision:
            raise UserError(f"{spec.title}: local copy {local} records revision {recorded}, but {spec.source} pins "
                            f"{source.revision}; download the pinned revision (huggingface-cli download "
                            f"{source.hub} --repo-type dataset --revision {source.revision} --local-dir {local})")
        record.update(revision=recorded or "unrecorded", revision_from=f"local copy {local}")
        read = [str(path.relative_to(local)) for config in source.configs for split in source.splits
                for path in (locate(source.files, local, config, split) if source.files else None) or ()]
        if read:  # the copy is read in the repo's own layout, not through `datasets`
            record["files"] = read
    elif not COMMIT.fullmatch(source.revision):
        record.update(resolved_revision(spec, source, data_dir))
    return record


def resolved_revision(spec: TaskSpec, source: DataSource, data_dir: Optional[str]) -> dict[str, str]:
    """A branch names no fixed data: the one commit `datasets` read every config and split at, else `unresolved`
    and why."""
    branch = source.revision or "main"
    commits = sorted(set(hub_commits(spec, source, data_dir)))
    if len(commits) == 1 and commits[0]:
        return {"revision": commits[0], "revision_from": f"{branch}, as read by datasets"}
    why = "its datasets cache names no commit" if "" in commits else f"parts read at {', '.join(commits)}"
    return {"revision": UNRESOLVED, "revision_from": f"{branch}: {why}"}


def task_provenance(spec: TaskSpec, data_dir: Optional[str]) -> list[dict[str, Any]]:
    return [source_provenance(spec, source, data_dir) for source in spec.sources]


def source_revisions(provenance: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], str]:
    """(task, hub id) -> the revision a run read it at (local files left out: items_hash covers them)."""
    return {(task, source["dataset"]): source.get("revision", "") for task, sources in provenance.items()
            for source in sources if "configs" in source}


def check_same_revisions(side_a: tuple[str, dict[str, Any]], side_b: tuple[str, dict[str, Any]], ending: str) -> None:
    """Two stored provenances (manifest `provenance` meta) that read one hub source at two different commits are
    refused; a side whose revision is not a commit (`unresolved`, or `main` in a run stored before it was resolved)
    cannot be told apart, and the report shows both."""
    (name_a, a), (name_b, b) = side_a, side_b
    revisions_b = source_revisions(b)
    for (task, dataset), revision_a in source_revisions(a).items():
        revision_b = revisions_b.get((task, dataset), "")
        if COMMIT.fullmatch(revision_a) and COMMIT.fullmatch(revision_b) and revision_a != revision_b:
            raise UserError(f"task {task}: {dataset} was read at revision {revision_a} by {name_a} but "
                            f"{revision_b} by {name_b}; {ending}")


def items_hash(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 (hex) of the sorted, distinct (item_id, prompt hash) pairs."""
    digest = hashlib.sha256()
    for item_id, prompt_hash in sorted(set(pairs)):
        digest.update(f"{item_id}\t{prompt_hash}\n".encode("utf-8"))
    return digest.hexdigest()


def asked(records: Iterable[Record]) -> dict[str, set[str]]:
    """item_id -> the prompt hashes it was asked with (first repeat only)."""
    out: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.repeat == 0:
            out[record.item_id].add(record.prompt_hash)
    return out


def check_one_prompt(task: str, role: str, prompts: dict[str, set[str]], where: str) -> None:
    """A resume whose data changed asks some item again with another prompt: refuse to score such a mixture."""
    changed = sorted(item for item, hashes in prompts.items() if len(hashes) > 1)
    if changed:
        raise UserError(f"task {task}: {where} asked {role} {len(changed)} item(s) with different prompts (first: "
                        f"{changed[0]!r}); the data changed under a resumed run, start a new run id")


def check_same_items(task: str, side_a: tuple[str, dict[str, set[str]]], side_b: tuple[str, dict[str, set[str]]],
                     every_item: bool) -> None:
    """Both sides asked the same prompt for every item both asked (`every_item`: and the same items)."""
    (name_a, a), (name_b, b) = side_a, side_b
    for name, prompts in ((name_a, a), (name_b, b)):
        check_one_prompt(task, name, prompts, "the run")
    differ = sorted(item for item in a.keys() & b.keys() if a[item] != b[item])
    if differ:
        raise UserError(f"task {task}: {name_a} and {name_b} were asked different prompts for {len(differ)} item(s) "
                        f"(first: {differ[0]!r}); they did not answer the same questions")
    if every_item and a.keys() != b.keys():
        raise UserError(f"task {task}: {name_a} and {name_b} were asked different item sets ({len(a)} vs {len(b)} "
                        f"items, {len(a.keys() ^ b.keys())} not in both); compare runs of the same data and limit")
