"""Issue 18: the manifest and report carry each task's dataset, configs, splits, revision and a content hash of the
items asked; sides asked different questions are never compared (two runs, or one run whose data changed under a
resume)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flageval_lite.errors import UserError
from flageval_lite.tasks import load_task
from flageval_lite.tasks.provenance import (COMMIT, check_same_revisions, items_hash, local_copy_revision,
                                           task_provenance)

REPO = Path(__file__).resolve().parents[1]
HUB = REPO / "tests/fixtures/hub"
SHA_A, SHA_B = "a" * 40, "b" * 40


def write_metadata(folder: Path, commit: str, files=("data/test.parquet",)) -> None:
    """What `huggingface-cli download --local-dir` leaves: per file, its commit on the first line."""
    for name in files:
        path = folder / ".cache/huggingface/download" / f"{name}.metadata"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{commit}\n\"etag\"\n1700000000.0\n")


def test_hub_source_records_the_yaml_revision_and_a_local_copy_its_own(tmp_path):
    spec = load_task("blink")
    [record] = task_provenance(spec, None)
    assert record["dataset"] == "BLINK-Benchmark/BLINK" and record["splits"] == ["val"]
    assert len(record["configs"]) == 14 and record["revision_from"] == "task yaml"
    assert record["revision"] == spec.sources[0].revision

    pinned = spec.sources[0].revision
    copy = tmp_path / "BLINK-Benchmark/BLINK"
    write_metadata(copy, pinned, ("a.parquet", "b.parquet"))
    [record] = task_provenance(spec, str(tmp_path))
    assert record["revision"] == pinned and record["revision_from"] == f"local copy {copy}"
    write_metadata(copy, SHA_B, ("c.parquet",))  # a mixed copy records no single revision: read, as `unrecorded`
    assert local_copy_revision(copy) == ""
    assert task_provenance(spec, str(tmp_path))[0]["revision"] == "unrecorded"
    (copy / "REVISION").write_text(SHA_B + "\n")
    assert local_copy_revision(copy) == SHA_B


def test_a_local_copy_of_another_commit_than_the_pinned_one_is_refused(tmp_path):
    import dataclasses

    spec = load_task("blink")
    pinned = dataclasses.replace(spec, sources=(dataclasses.replace(spec.sources[0], revision=SHA_A),))
    write_metadata(tmp_path / "BLINK-Benchmark/BLINK", SHA_B)
    with pytest.raises(UserError) as info:
        task_provenance(pinned, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"Blink: local copy {tmp_path}/BLINK-Benchmark/BLINK records "
                                                      f"revision {SHA_B}, but ")
    assert f"--revision {SHA_A}" in message
    write_metadata(tmp_path / "BLINK-Benchmark/BLINK", SHA_A)
    assert task_provenance(pinned, str(tmp_path))[0]["revision"] == SHA_A


# Hub sources no public file cites a commit of (docs/tasks.md, Revisions): they stay on `main` until pinned, and a
# run of one records the commit it read.
UNPINNED = {"m-a-p/CII-Bench", "lmms-lab/CMMMU", "MathLLMs/MathVision", "lmms-lab/mmau", "whyu/mm-vet-v2",
            "m-a-p/OmniBench"}


def test_every_hub_source_pins_a_commit_but_the_known_unpinned_ones():
    revisions = {}
    for path in sorted((REPO / "tasks").glob("*.yaml")):
        if path.name == "suites.yaml":
            continue
        for source in load_task(str(path)).sources:
            if source.hub:
                revisions.setdefault(source.hub, set()).add(source.revision)
    unpinned = {hub for hub, revs in revisions.items() if revs == {"main"}}
    assert unpinned == UNPINNED
    for hub, revs in revisions.items():
        if hub not in UNPINNED:
            assert len(revs) == 1 and COMMIT.fullmatch(next(iter(revs))), hub


def test_the_pinned_blink_yaml_refuses_a_copy_of_another_commit_and_reads_the_pinned_one(tmp_path):
    spec = load_task("blink")
    pinned = spec.sources[0].revision
    assert pinned == "a3666eb249237ba3d5eca8db21176cc47967e040"
    copy = tmp_path / "BLINK-Benchmark/BLINK"
    write_metadata(copy, SHA_B)
    with pytest.raises(UserError, match=f"records revision {SHA_B}, but .*blink.yaml pins {pinned}"):
        task_provenance(spec, str(tmp_path))
    (copy / "REVISION").write_text(pinned + "\n")  # a copy made otherwise states its commit; it takes precedence
    [record] = task_provenance(spec, str(tmp_path))
    assert record["revision"] == pinned and record["revision_from"] == f"local copy {copy}"


def test_items_hash_is_sha256_over_sorted_pairs():
    expected = hashlib.sha256(b"a\th1\nb\th2\n").hexdigest()
    assert items_hash([("b", "h2"), ("a", "h1"), ("a", "h1")]) == expected


# --------------------------------------------------------------------------- through the CLI


def write_task(folder: Path, questions: list[str]) -> Path:
    (folder / "rows.jsonl").write_text("".join(json.dumps({"id": f"q{k}", "question": q, "answer": "A"}) + "\n"
                                               for k, q in enumerate(questions)))
    path = folder / "plain.yaml"
    path.write_text(yaml.safe_dump({"name": "plain", "title": "Plain", "modality": "text",
                                    "dataset": {"path": "rows.jsonl"}, "id_field": "id",
                                    "prompt": "{{ question }} Answer with A, B, C or D.", "gold": "answer",
                                    "scorer": "choice"}))
    return path


def cli(tmp_path: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flageval_lite.cli", *args, "--runs-dir", str(tmp_path / "runs"),
                           "--reports-dir", str(tmp_path / "reports")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def run(tmp_path: Path, run_id: str, task: Path, env=None, **fields) -> subprocess.CompletedProcess:
    stub = {"engine": "stub", "served_model_name": "stub", "warmup": False, "args": ["--answer-mode", "letter"]}
    config = tmp_path / f"{run_id}.yaml"
    config.write_text(yaml.safe_dump({"reference": {"name": "ref", **stub}, "candidate": {"name": "cand", **stub},
                                      "tasks": [str(task)], **fields}))
    return cli(tmp_path, "run", "--config", str(config), "--run-id", run_id, "--quiet", env=env)


QUESTIONS = [f"Question {k}: which letter?" for k in range(10)]


def test_manifest_and_report_carry_provenance_and_compare_refuses_other_item_sets(tmp_path):
    task = write_task(tmp_path, QUESTIONS)
    assert run(tmp_path, "one", task).returncode in (0, 3)
    manifest = json.loads((tmp_path / "runs/one/manifest.json").read_text())
    row = manifest["provenance"]["plain"]
    assert row["sources"] == [{"dataset": "rows.jsonl", "format": "jsonl", "revision": "", "revision_from": "local file"}]
    assert row["items"] == {"reference": 10, "candidate": 10}
    assert row["items_hash"]["reference"] == row["items_hash"]["candidate"]
    assert len(row["items_hash"]["reference"]) == 64
    report = (tmp_path / "reports/one/report.md").read_text()
    assert "### Data provenance" in report and row["items_hash"]["reference"][:16] in report

    assert run(tmp_path, "fewer", task, limit=6).returncode in (0, 3)
    refused = cli(tmp_path, "compare", "one", "fewer")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: task plain: one (reference) and fewer (candidate) were asked different item sets (10 vs 6 items, "
        "4 not in both); compare runs of the same data and limit")

    write_task(tmp_path, ["Edited: " + QUESTIONS[0]] + QUESTIONS[1:])
    assert run(tmp_path, "edited", task).returncode in (0, 3)
    refused = cli(tmp_path, "compare", "one", "edited")
    assert refused.returncode == 2 and "task plain: one (reference) and edited (candidate) were asked different " \
                                       "prompts for 1 item(s) (first: 'q0')" in refused.stderr


def test_a_resume_whose_data_changed_under_it_is_refused(tmp_path):
    task = write_task(tmp_path, QUESTIONS)
    assert run(tmp_path, "r", task).returncode in (0, 3)
    write_task(tmp_path, QUESTIONS[:3] + ["Edited: " + QUESTIONS[3]] + QUESTIONS[4:])
    resumed = run(tmp_path, "r", task)
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1] == (
        "error: task plain: the run asked the reference 1 item(s) with different prompts (first: 'q3'); the data "
        "changed under a resumed run, start a new run id")


# --------------------------------------------------------------------------- a branch resolved to the commit read

HUB_ID = "flageval-test/TinyBench"
SHA_C, SHA_D = "c" * 40, "d" * 40


def write_hub_cache(cache: Path, commit: str, questions: list[str]) -> Path:
    """The Arrow cache `datasets` leaves after loading HUB_ID's `test` split at `commit`, written by `datasets`
    itself: `<org>___<name>/default/0.0.0/<commit>/` with its `dataset_info.json`.  The parquet builder refuses
    local data files for a repo id, so the repo id and config id a hub load would give are set after it is made."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    rows = cache.parent / f"rows-{commit[:4]}.parquet"
    pq.write_table(pa.table({"id": [f"q{k}" for k in range(len(questions))], "question": questions,
                             "answer": ["A"] * len(questions)}), rows)
    builder = Parquet(cache_dir=str(cache), dataset_name="tiny_bench", hash=commit, data_files={"test": str(rows)})
    builder.repo_id, builder.config_id = HUB_ID, "default"
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return cache / "flageval-test___tiny_bench/default/0.0.0" / commit


def write_hub_task(folder: Path, revision: str) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "title": "Tiny", "modality": "text",
                                    "dataset": {"hub": HUB_ID, "revision": revision, "split": "test"},
                                    "id_field": "id", "prompt": "{{ question }} Answer with A, B, C or D.",
                                    "gold": "answer", "scorer": "choice"}))
    return path


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    import datasets

    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_main_is_recorded_as_the_commit_datasets_read_from_the_offline_cache(offline_cache, tmp_path):
    from flageval_lite.tasks import iter_items

    write_hub_cache(offline_cache, SHA_C, QUESTIONS[:3])
    spec = load_task(str(write_hub_task(tmp_path, "main")))
    assert [item.item_id for item in iter_items(spec)] == ["q0", "q1", "q2"]  # the real loader reads the fixture
    [record] = task_provenance(spec, None)
    assert record == {"dataset": HUB_ID, "configs": [], "splits": ["test"], "revision": SHA_C,
                      "revision_from": "main, as read by datasets"}


def test_a_cache_that_names_no_commit_is_recorded_as_unresolved(offline_cache, tmp_path):
    folder = write_hub_cache(offline_cache, SHA_C, QUESTIONS[:3])
    folder.rename(folder.with_name("not-a-commit"))
    [record] = task_provenance(load_task(str(write_hub_task(tmp_path, "main"))), None)
    assert record["revision"] == "unresolved"
    assert record["revision_from"] == "main: its datasets cache names no commit"


def test_offline_a_pinned_source_whose_cache_holds_another_commit_is_refused(offline_cache, tmp_path):
    """Offline, `datasets` reads the newest cached commit whatever revision is asked: that would be other data."""
    from flageval_lite.tasks import iter_items

    write_hub_cache(offline_cache, SHA_C, QUESTIONS[:3])
    spec = load_task(str(write_hub_task(tmp_path, SHA_D)))
    with pytest.raises(UserError) as info:
        next(iter_items(spec))
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"Tiny: dataset {HUB_ID} split 'test': the datasets cache holds commit {SHA_C}, but {spec.source} pins {SHA_D}")
    assert f"--revision {SHA_D}" in message
    write_hub_cache(offline_cache, SHA_D, QUESTIONS[:3])  # now the newest cached commit, and the pinned one
    assert len(list(iter_items(spec))) == 3
    assert task_provenance(spec, None)[0]["revision"] == SHA_D  # a pin is recorded as pinned, without a load


def hub_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}


def test_runs_of_main_at_two_commits_are_not_compared_and_a_resume_at_another_is_refused(offline_cache, tmp_path):
    task = write_hub_task(tmp_path, "main")
    write_hub_cache(offline_cache, SHA_C, QUESTIONS)
    assert run(tmp_path, "at_c", task, env=hub_env(tmp_path)).returncode in (0, 3)
    manifest = json.loads((tmp_path / "runs/at_c/manifest.json").read_text())
    assert manifest["provenance"]["tiny"]["sources"][0]["revision"] == SHA_C
    assert f"- dataset revisions: {HUB_ID} @ {SHA_C}\n" in (tmp_path / "reports/at_c/report.md").read_text()

    write_hub_cache(offline_cache, SHA_D, QUESTIONS)  # same rows, a newer commit: `main` moved
    assert run(tmp_path, "at_d", task, env=hub_env(tmp_path)).returncode in (0, 3)
    refused = cli(tmp_path, "compare", "at_c", "at_d", env=hub_env(tmp_path))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: task tiny: {HUB_ID} was read at revision {SHA_C} by at_c (reference) but {SHA_D} by at_d "
        f"(candidate); compare runs of the same dataset commits")

    resumed = run(tmp_path, "at_c", task, env=hub_env(tmp_path))
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"error: task tiny: {HUB_ID} was read at revision {SHA_C} by the stored run at_c but {SHA_D} by this "
        f"rerun; start a new run id")


def test_a_compare_with_an_unresolved_side_shows_both_revisions():
    from flageval_lite.analysis.analyse import sides_provenance
    from flageval_lite.report.facts import _revision_fact

    source = {"dataset": HUB_ID, "configs": [], "splits": ["test"], "revision_from": "main, as read by datasets"}
    side = {"items": {"reference": 3}, "items_hash": {"reference": "h"}}
    merged = sides_provenance({"tiny": {**side, "sources": [{**source, "revision": SHA_C}]}},
                              {"tiny": {**side, "sources": [{**source, "revision": "unresolved"}]}},
                              "reference", "reference")
    assert merged["tiny"]["sources"][0]["candidate_revision"] == "unresolved"
    sources = {"tiny": merged["tiny"]["sources"]}
    check_same_revisions(("a", sources), ("b", {"tiny": [{**source, "revision": "unresolved"}]}), "")  # not refused
    assert _revision_fact({"provenance": merged}) == f"{HUB_ID} @ {SHA_C} (reference) / unresolved (candidate)"
