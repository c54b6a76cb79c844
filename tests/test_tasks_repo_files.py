"""A hub repo read in its own layout (`files:`, tasks/repo_files.py): google/fleurs at its pinned commit, a
header-less TSV beside a tar.gz of WAVs, as `huggingface-cli download --include` leaves it (tests/fixtures/repo_files,
built by build_fixtures.py in the upstream schema), through the real task YAML, provenance and the bad inputs."""
from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from flageval_lite.errors import ConfigError, UserError
from flageval_lite.tasks import cached_item_count, iter_items, load_task, parse_task
from flageval_lite.tasks.provenance import task_provenance

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT / "tests/fixtures/repo_files"
PARQUET = ROOT / "tests/fixtures/hub"
PINNED = "70bb2e84b976b7e960aa89f1c648e09c59f894dd"

_builder = importlib.util.spec_from_file_location("build_fixtures", ROOT / "tests/fixtures/build_fixtures.py")
fixtures = importlib.util.module_from_spec(_builder)
_builder.loader.exec_module(fixtures)

# (item id = the recording's file name stem, tone of its WAV) in archive order
RECORDINGS = [(name.removesuffix(".wav"), freq) for _, name, freq, _, _ in fixtures.FLEURS_ZH]


def items(data_dir: Path, **kwargs) -> list:
    return list(iter_items(load_task("fleurs_zh"), data_dir=str(data_dir), **kwargs))


def wav_of(item) -> bytes:
    audio, text = item.messages[-1]["content"]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
    assert text == {"type": "text", "text": "请将这段中文语音转写成文字，不要加标点符号。"}
    return base64.b64decode(audio["input_audio"]["data"])


def copy_of(tmp_path: Path, *layouts: Path) -> Path:
    """A data dir whose google/fleurs holds the given fixture layouts, merged."""
    for layout in layouts:
        shutil.copytree(layout / "google/fleurs", tmp_path / "google/fleurs", dirs_exist_ok=True)
    return tmp_path / "google/fleurs"


def test_the_pinned_commits_own_files_load_in_archive_order_with_the_members_wav_bytes():
    loaded = items(ORIGINAL)
    assert [(item.item_id, wav_of(item)) for item in loaded] == [(i, fixtures.tone_wav(f)) for i, f in RECORDINGS]
    first, second, third = loaded
    assert first.gold == "他说：“这本书非常有意思！”"  # the quotes are cell text: lines split on tabs only
    assert first.meta == {"sentence_id": 1002, "gender": "female"}
    # two speakers of one sentence: their own items, the sentence id kept in meta
    assert second.gold == third.gold and second.meta["sentence_id"] == third.meta["sentence_id"] == 1001
    assert (second.meta["gender"], third.meta["gender"]) == ("male", "female")
    assert cached_item_count(load_task("fleurs_zh"), str(ORIGINAL)) == 3


def test_both_layouts_give_the_same_items():
    """The Hub's parquet conversion holds what the upstream script yields: ids, prompts, audio, gold, meta agree."""
    def view(item):
        return item.item_id, item.messages, item.gold, item.meta, item.error

    assert [view(i) for i in items(ORIGINAL)] == [view(i) for i in items(PARQUET)]
    assert [view(i) for i in items(ORIGINAL, limit=2)] == [view(i) for i in items(PARQUET, limit=2)]


def test_the_limit_subset_walks_the_text_in_the_order_the_rows_come():
    """The TSV lists the rows in another order than the archive: the subset's ids still pair with their audio."""
    full = [(item.item_id, wav_of(item)) for item in items(ORIGINAL)]
    for limit in (1, 2, 3):
        subset = [(item.item_id, wav_of(item)) for item in items(ORIGINAL, limit=limit)]
        assert len(subset) == limit and subset == [pair for pair in full if pair in subset]


def test_the_original_files_win_over_a_parquet_copy_in_the_same_folder(tmp_path):
    copy = copy_of(tmp_path, PARQUET, ORIGINAL)
    tsv = copy / "data/cmn_hans_cn/test.tsv"
    tsv.write_text(tsv.read_text(encoding="utf-8").replace("他说", "她说"), encoding="utf-8")
    assert items(tmp_path)[0].gold == "她说：“这本书非常有意思！”"
    [record] = task_provenance(load_task("fleurs_zh"), str(tmp_path))
    assert record["files"] == ["data/cmn_hans_cn/test.tsv", "data/cmn_hans_cn/audio/test.tar.gz"]


def test_provenance_reads_the_commit_from_the_download_metadata(tmp_path):
    [record] = task_provenance(load_task("fleurs_zh"), str(ORIGINAL))
    assert record["revision"] == PINNED and record["revision_from"] == f"local copy {ORIGINAL}/google/fleurs"
    assert [s for s in task_provenance(load_task("fleurs_zh"), str(PARQUET))[0]] == [
        "dataset", "configs", "splits", "revision", "revision_from"]  # read through `datasets`: no `files`

    copy = copy_of(tmp_path, ORIGINAL)
    for metadata in (copy / ".cache/huggingface/download").rglob("*.metadata"):
        metadata.write_text(metadata.read_text().replace(PINNED, "b" * 40))
    with pytest.raises(UserError) as info:
        task_provenance(load_task("fleurs_zh"), str(tmp_path))
    assert "\n" not in str(info.value) and f"records revision {'b' * 40}, but " in str(info.value)
    assert f"--revision {PINNED}" in str(info.value)


def test_half_of_the_files_is_one_line_naming_the_missing_one(tmp_path):
    copy = copy_of(tmp_path, ORIGINAL)
    (copy / "data/cmn_hans_cn/test.tsv").unlink()
    with pytest.raises(UserError) as info:
        items(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{copy}/data/cmn_hans_cn/test.tsv not found beside "
                                                      f"{copy}/data/cmn_hans_cn/audio/test.tar.gz")
    with pytest.raises(UserError, match="half of the repo's files"):  # the preflight's provenance says it too
        task_provenance(load_task("fleurs_zh"), str(tmp_path))
    shutil.copy(ORIGINAL / "google/fleurs/data/cmn_hans_cn/test.tsv", copy / "data/cmn_hans_cn/test.tsv")
    (copy / "data/cmn_hans_cn/audio/test.tar.gz").unlink()
    with pytest.raises(UserError, match=r"audio/test\.tar\.gz not found beside .*test\.tsv"):
        items(tmp_path)


def test_a_copy_in_neither_layout_says_where_the_tsv_was_looked_for(tmp_path):
    copy = tmp_path / "google/fleurs"
    copy.mkdir(parents=True)
    (copy / "README.md").write_text("no data here\n")
    with pytest.raises(UserError) as info:
        items(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"FLEURS zh: dataset {copy} config 'cmn_hans_cn' split 'test': ")
    assert message.endswith(f"(nor does it hold {copy}/data/cmn_hans_cn/test.tsv)")


def test_no_copy_at_all_names_the_pinned_files_to_download(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(UserError) as info:
        items(tmp_path)
    assert (f"huggingface-cli download google/fleurs --repo-type dataset --revision {PINNED} --include "
            '"data/cmn_hans_cn/test.tsv" "data/cmn_hans_cn/audio/test.tar.gz" --local-dir DIR/google/fleurs'
            in str(info.value))


def test_a_line_with_another_number_of_cells_names_the_file_and_line(tmp_path):
    copy = copy_of(tmp_path, ORIGINAL)
    tsv = copy / "data/cmn_hans_cn/test.tsv"
    lines = tsv.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0]  # the gender cell gone
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        items(tmp_path)
    assert str(info.value) == (f"{tsv}:2: 6 tab-separated cells, expected 7 (id, file_name, raw_transcription, "
                               "transcription, characters, num_samples, gender)")


def test_other_bad_tsv_lines_name_the_file_and_line(tmp_path):
    copy = copy_of(tmp_path, ORIGINAL)
    tsv = copy / "data/cmn_hans_cn/test.tsv"
    good = tsv.read_bytes()
    tsv.write_bytes(good + good.splitlines(keepends=True)[0])
    with pytest.raises(UserError, match=r"test\.tsv:4: file_name '12838260497310528466\.wav' is already on line 1$"):
        items(tmp_path)
    tsv.write_bytes(good.replace("他说".encode(), b"\xff\xfe"))
    with pytest.raises(UserError, match=r"test\.tsv:3: not UTF-8"):
        items(tmp_path)


def test_a_recording_missing_from_the_archive_is_a_bad_item_and_the_rest_load(tmp_path):
    copy = copy_of(tmp_path, ORIGINAL)
    archive = copy / "data/cmn_hans_cn/audio/test.tar.gz"
    missing = fixtures.FLEURS_ZH[1][1]
    kept = [(name, fixtures.tone_wav(freq)) for _, name, freq, _, _ in fixtures.FLEURS_ZH if name != missing]
    # and a member no row names: skipped, as the upstream script skips it
    archive.write_bytes(fixtures.tar_gz(kept + [("1.wav", fixtures.tone_wav(100.0))], "test"))
    loaded = items(tmp_path)
    assert [item.item_id for item in loaded] == [RECORDINGS[0][0], RECORDINGS[2][0], RECORDINGS[1][0]]
    assert [item.error for item in loaded[:2]] == ["", ""] and wav_of(loaded[1]) == fixtures.tone_wav(RECORDINGS[2][1])
    assert loaded[2].error == f"fleurs_zh: item {RECORDINGS[1][0]}: audios: {missing} is not in {archive}"
    assert loaded[2].messages == [] and loaded[2].gold is None


def test_an_unreadable_archive_names_it(tmp_path):
    copy = copy_of(tmp_path, ORIGINAL)
    archive = copy / "data/cmn_hans_cn/audio/test.tar.gz"
    archive.write_bytes(gzip.compress(b"not a tar archive" * 40))
    with pytest.raises(UserError, match=f"^{archive}: cannot read the archive: "):
        items(tmp_path)
    data = (ORIGINAL / "google/fleurs/data/cmn_hans_cn/audio/test.tar.gz").read_bytes()
    archive.write_bytes(data[: len(data) // 2])  # cut short: the first rows come, then the one-line error
    with pytest.raises(UserError, match=f"^{archive}: cannot read the archive: "):
        items(tmp_path)


def test_the_archive_is_streamed_not_extracted(tmp_path):
    copy = copy_of(tmp_path, ORIGINAL)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert len(items(tmp_path)) == 3
    assert sorted(p for p in tmp_path.rglob("*")) == before
    with tarfile.open(copy / "data/cmn_hans_cn/audio/test.tar.gz") as tar:  # the fixture's members: test/<file name>
        assert tar.getnames() == ["test"] + [f"test/{name}" for _, name, _, _, _ in fixtures.FLEURS_ZH]


SOURCE = {"hub": "org/data", "revision": "main", "split": "test"}
FILES = {"tsv": "{config}/{split}.tsv", "columns": ["id", "file"], "archive": "{split}.tar", "member": "file",
         "media": "audio"}


def task(tmp_path: Path, **files) -> dict:
    return {"name": "t", "title": "T", "modality": "audio", "prompt": "<audio 1>", "gold": "id", "scorer": "cer",
            "metric": "cer", "audios": ["audio"], "dataset": {**SOURCE, "files": {**FILES, **files}}}


@pytest.mark.parametrize("files, field, message", [
    ({"member": "name"}, "dataset.files.member", "'name' is not one of `columns`"),
    ({"media": "file"}, "dataset.files.media", "'file' is already a TSV column"),
    ({"columns": ["id", "id", "file"]}, "dataset.files.columns", "names a column twice"),
    ({"columns": "id file"}, "dataset.files.columns", "expected a list of column names"),
    ({"tsv": "{lang}/{split}.tsv"}, "dataset.files.tsv", "the placeholders are {config} and {split}: 'lang'"),
    ({"header": True}, "dataset.files.header", "unknown field"),
])
def test_a_bad_files_mapping_is_a_config_error_naming_its_field(tmp_path, files, field, message):
    with pytest.raises(ConfigError) as info:
        parse_task(task(tmp_path, **files), tmp_path / "t.yaml")
    assert f"{field}: {message}" in str(info.value)


def test_files_belong_to_a_hub_source(tmp_path):
    raw = task(tmp_path)
    raw["dataset"] = {"path": "data.jsonl", "files": FILES}
    with pytest.raises(ConfigError, match="config/revision/files apply to hub datasets only"):
        parse_task(raw, tmp_path / "t.yaml")


def test_a_declared_layout_reads_any_repo_not_just_fleurs(tmp_path):
    """Another repo, other names, a plain .tar: the YAML alone says how it reads."""
    folder = tmp_path / "org/data/cfg"
    folder.mkdir(parents=True)
    (folder / "test.tsv").write_text("a\tx/one.wav\nb\ttwo.wav\n", encoding="utf-8")
    with tarfile.open(tmp_path / "org/data/test.tar", "w") as tar:
        for name, freq in (("two.wav", 300.0), ("one.wav", 200.0)):
            data = fixtures.tone_wav(freq)
            info = tarfile.TarInfo(f"clips/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = task(tmp_path)
    raw["dataset"]["config"] = "cfg"
    spec = parse_task(raw, tmp_path / "t.yaml")
    loaded = list(iter_items(spec, data_dir=str(tmp_path)))
    assert [(i.item_id, i.gold, wav_of_part(i)) for i in loaded] == [
        ("0", "b", fixtures.tone_wav(300.0)), ("1", "a", fixtures.tone_wav(200.0))]  # row_index: archive order


def wav_of_part(item) -> bytes:
    [audio] = item.messages[-1]["content"]
    return base64.b64decode(audio["input_audio"]["data"])
