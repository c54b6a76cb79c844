"""Task spec files: the shipped specs and suites, lookup, and one-line ConfigErrors for bad specs."""
from __future__ import annotations

from pathlib import Path

import pytest

from flageval_lite.errors import ConfigError, UserError
from flageval_lite.records import GenParams
from flageval_lite.tasks import list_tasks, load_suite, load_task

CARD_ORDER = ["CMMMU", "MMMU", "MMMU_Pro_standard", "MMMU_Pro_vision", "MM-Vet v2", "OCRBench", "MathVision",
              "CII-Bench", "Blink", "AIME", "GPQA", "LiveBench", "MMLU", "MuSR"]

VALID = """\
name: mytask
title: My task
modality: text
dataset: {path: data.jsonl}
prompt: "{{ question }}"
gold: answer
scorer: choice
"""


def test_omni_suite_is_the_model_card_in_order_then_the_rows_beyond_it():
    specs = load_suite("omni")
    assert [s.title for s in specs[:14]] == CARD_ORDER and not any(s.beyond_card for s in specs[:14])
    assert [s.name for s in specs[14:]] == [s.name for s in load_suite("omni-av")]
    assert all(s.beyond_card for s in specs[14:])
    assert [s.title for s in load_suite("vision")] == CARD_ORDER[:9]
    assert [s.title for s in load_suite("text")] == CARD_ORDER[9:]
    assert all(s.modality == "vision" for s in load_suite("vision"))
    assert [s.name for s in load_suite("demo")] == ["demo_arith", "demo_mcq", "demo_facts"]
    for spec in specs:
        assert spec.suites[:1] == ("omni",)
        assert spec.group_by in ("", *spec.meta)


def test_list_tasks_rows():
    rows = {row["name"]: row for row in list_tasks()}
    assert rows["demo_arith"] == {"name": "demo_arith", "title": "Demo arithmetic", "modality": "text",
                                  "scorer": "exact_integer", "suites": ["demo"], "items": 120}
    assert rows["livebench"]["items"] is None  # filtered by release: not countable without reading rows
    assert set(rows) >= {s.name for s in load_suite("omni")} | {"mmmu_tsv"}


def test_lookup_by_name_title_and_path():
    assert load_task("MMMU_Pro_vision").name == "mmmu_pro_vision"
    assert load_task("mm-vet v2").name == "mmvet_v2"
    spec = load_task("gpqa_diamond")
    assert load_task(spec.source) == spec
    with pytest.raises(UserError, match="unknown task 'nope' \\(known: "):
        load_task("nope")
    with pytest.raises(UserError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_generation_and_compat():
    mmlu = load_task("mmlu")
    assert mmlu.generation == GenParams(max_tokens=256, temperature=0, stop=("\n",))
    assert mmlu.scorer_args == {} and mmlu.compat is False


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mytask.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_minimal_spec_and_compat(tmp_path):
    spec = load_task(write(tmp_path, VALID + "compat: true\ngeneration: {max_tokens: 8, stop: END}\n"))
    assert spec.scorer_args == {"compat": True}
    assert spec.generation.stop == ("END",) and spec.generation.max_tokens == 8
    assert spec.sources[0].format == "jsonl"


BAD = [
    (VALID + "colour: blue\n", "colour", "unknown field"),
    (VALID.replace("gold: answer\n", ""), "gold", "missing required field"),
    (VALID.replace("scorer: choice", "scorer: vibes"), "scorer", "unknown scorer 'vibes'"),
    (VALID + "scorer_args: {letter: A}\n", "scorer_args", "takes no letter"),
    (VALID.replace('"{{ question }}"', '"{{ question "'), "prompt", "jinja syntax error"),
    (VALID + "meta: {a: 'x +'}\n", "meta.a", "jinja syntax error"),
    (VALID.replace("modality: text", "modality: smell"), "modality", "expected one of text, vision, audio"),
    (VALID + "group_by: subject\n", "group_by", "is not a `meta` key"),
    (VALID.replace("{path: data.jsonl}", "{hub: org/data, split: test}"), "dataset.revision", "missing"),
    (VALID.replace("{path: data.jsonl}", "{hub: org/data, revision: main}"), "dataset.split", "missing"),
    (VALID.replace("{path: data.jsonl}", "{path: data.xlsx}"), "dataset.format", "expected one of"),
    (VALID + "generation: {max_token: 5}\n", "generation.max_token", "unknown field"),
    (VALID + "images: {pattern: 'image_\\d+'}\n", "images.pattern", "one group"),
    (VALID + "metric: median\n", "metric", "expected one of"),
    (VALID + "beyond_card: yes please\n", "beyond_card", "true or false"),
    (VALID.replace("name: mytask", "name: other"), "name", "must equal the file name"),
    (VALID + "prompt: [unclosed\n", "line 9", "invalid YAML"),
]


@pytest.mark.parametrize("text, field, message", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_spec_is_one_line_config_error(tmp_path, text, field, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_task(path)
    error = info.value
    assert error.path == str(path) and error.field == field
    assert message in str(error) and "\n" not in str(error)
    assert str(error).startswith(f"{path}: {field}: ")


def test_custom_tasks_dir_and_suite_membership(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text('{"question": "q", "answer": "A"}\n')
    write(tmp_path, VALID + "suites: [mine]\n")
    (tmp_path / "suites.yaml").write_text("first: [mytask]\n")
    monkeypatch.setenv("FLAGEVAL_TASKS_DIR", str(tmp_path))
    assert [s.name for s in load_suite("mine")] == ["mytask"]
    assert load_task("mytask").suites == ("first", "mine")
    (tmp_path / "suites.yaml").write_text("first: [mytask, ghost]\n")
    with pytest.raises(ConfigError, match=r"suites.yaml: first\[1\]: no task file ghost.yaml"):
        load_suite("first")
