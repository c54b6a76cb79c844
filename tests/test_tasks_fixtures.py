"""Every benchmark's fixture (upstream schema, tests/fixtures/hub) through the real `datasets` loader: item counts,
exact rendered prompts, image positions, gold and meta, limits, TSV images, errors."""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from flageval_lite.errors import UserError
from flageval_lite.tasks import iter_items, load_task

ROOT = Path(__file__).resolve().parents[1]
HUB = str(ROOT / "tests/fixtures/hub")
VLMEVAL = str(ROOT / "tests/fixtures/vlmeval")

_builder = importlib.util.spec_from_file_location("build_fixtures", ROOT / "tests/fixtures/build_fixtures.py")
fixtures = importlib.util.module_from_spec(_builder)
_builder.loader.exec_module(fixtures)

MC = "Answer with the option's letter from the given choices directly."
OPEN = "Answer the question using a single word or phrase."
LETTER_LINE = ("The last line of your response should be of the following format: 'Answer: $LETTER' (without quotes) "
               "where LETTER is one of options.")


def decode(url: str) -> Image.Image:
    assert url.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.format == "JPEG" and image.mode == "RGB"
    return image


def pieces(item) -> list[str]:
    """The user message as a list: text pieces verbatim, images as their fixture colour in brackets."""
    content = item.messages[-1]["content"]
    if isinstance(content, str):
        return [content]
    out = []
    for part in content:
        if part["type"] == "text":
            out.append(part["text"])
        else:
            image = decode(part["image_url"]["url"])
            out.append(f"[{fixtures.nearest_color(image.getpixel((image.width // 2, image.height // 2)))}]")
    return out


def items_of(name: str, data_dir: str = HUB, **kw) -> dict:
    return {item.item_id: item for item in iter_items(load_task(name), data_dir=data_dir, **kw)}


COUNTS = {"mmmu": 8, "mmmu_pro_standard": 6, "mmmu_pro_vision": 6, "cmmmu": 7, "mmvet_v2": 6, "ocrbench": 8,
          "mathvision": 6, "cii_bench": 6, "blink": 14, "aime": 7, "gpqa_diamond": 6, "livebench": 12, "mmlu": 6,
          "musr": 6}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_fixture_loads_through_datasets(name):
    items = list(iter_items(load_task(name), data_dir=HUB))
    assert len(items) == COUNTS[name]
    assert len({i.item_id for i in items}) == len(items)
    for item in items:
        json.dumps([item.gold, item.meta, item.messages])  # the store keeps all three as JSON
        assert item.messages[-1]["role"] == "user" and item.task == name
    # Same items, same bytes, on a second pass.
    again = list(iter_items(load_task(name), data_dir=HUB))
    assert [i.prompt_hash() for i in again] == [i.prompt_hash() for i in items]


# --------------------------------------------------------------------------- exact prompts, FlagEvalMM rules


def test_mmmu_prompts():
    items = items_of("mmmu")
    # Options become "\nA. ..." lines; <image k> inside options interleaves the images; default MC instruction.
    assert pieces(items["validation_Accounting_2"]) == [
        "Which chart shows revenue rising every quarter?\nA. ", "[green]", "\nB. ", "[blue]",
        f"\nC. Neither chart\nD. Both charts\n{MC}"]
    # image_3 is not referenced, so it is not sent.
    assert pieces(items["validation_Math_1"]) == [
        "Compare the areas of ", "[cyan]", " and ", "[orange]", f". Which shape is larger?\nA. The first shape\n"
        f"B. The second shape\n{MC}"]
    assert pieces(items["validation_Physics_1"]) == [
        "[magenta]", " A block slides down the frictionless ramp shown. What is its acceleration in m/s^2?\n" + OPEN]
    # A repeated placeholder sends the image twice.
    assert pieces(items["validation_Computer_Science_1"]) == [
        "[green]", " shows a loop over n items. Looking at ", "[green]", " again, what is the running time?\n"
        f"A. O(n)\nB. O(n log n)\nC. O(n^2)\nD. O(1)\n{MC}"]
    # No placeholder at all: FlagEvalMM attaches no image, so the item is text only.
    assert items["validation_History_1"].messages == [{"role": "user", "content": (
        "Which century does this map most likely come from?\nA. 15th\nB. 17th\nC. 19th\nD. 20th\n" + MC)}]
    accounting = items["validation_Accounting_1"]
    assert accounting.gold == "B"
    assert accounting.meta == {"options": ["$6", "$7", "$8", "$9"], "letters": "ABCD",
                               "question_type": "multiple-choice", "subject": "Accounting", "difficulty": "Easy"}
    assert items["validation_Art_Theory_1"].meta["subject"] == "Art_Theory"
    assert items["validation_Physics_1"].meta["question_type"] == "open" and items["validation_Physics_1"].gold == "4.9"


def test_mmmu_pro_prompts():
    standard = items_of("mmmu_pro_standard")
    options = "".join(f"\n{letter}. {value}" for letter, value in zip("ABCDEFGHIJ", ["1", "2", "3", "4", "5", "6", "7",
                                                                                     "8", "9", "12"]))
    assert pieces(standard["test_Music_5"]) == ["[magenta]", " How many beats does the bar hold?" + options + "\n" + MC]
    assert standard["test_Music_5"].meta["letters"] == "ABCDEFGHIJ" and standard["test_Music_5"].gold == "J"
    vision = items_of("mmmu_pro_vision")
    assert pieces(vision["test_Accounting_1"]) == [
        "[gray]", " \nAnswer with the option letter from the given choices directly. " + LETTER_LINE]
    assert vision["test_Accounting_1"].meta["question_type"] == "vision"
    assert len(vision["test_Accounting_1"].meta["options"]) == 10


def test_cmmmu_prompts():
    items = items_of("cmmmu")
    # <img="..."> references in the options become <image k>; Chinese default instruction per question type.
    assert pieces(items["1004"]) == [
        "下列哪一幅图表示细胞的有丝分裂中期？\nA. ", "[yellow]", "\nB. ", "[magenta]",
        "\nC. 都不是\nD. 无法判断\n从给定的选项中直接选择答案的字母，不要多余的解释。"]
    assert pieces(items["1003"]) == ["根据", "[blue]", "中的数据，该公司2020年的利润比2019年高。\n直接回答'对'或'错'，不需要多余的解释"]
    assert pieces(items["1002"]) == [
        "[green]", "图中直角三角形的面积为____平方厘米。\n在横线或者空白处直接填上答案，如果有多个空需要填，使用分号(;)分隔。"
        "直接给出答案，不需要多余的解释"]
    assert pieces(items["1006"]) == ["[orange]", "与", "[gray]", "所示的两种建筑风格相同。\n直接回答'对'或'错'，不需要多余的解释"]
    assert items["1002"].meta["question_type"] == "填空" and items["1002"].meta["options"] == []
    assert items["1001"].meta["category"] == "技术与工程"


def test_mmvet_v2_prompts():
    items = items_of("mmvet_v2")
    # <IMG><image_k> markers are numbered by appearance: image_1 is sent first here.
    assert pieces(items["v2_4"]) == ["[red]", "Name the two colours in this flag. ", "[gray]"]
    assert items["v2_4"].meta["question"] == "<image 1>Name the two colours in this flag. <image 2>"
    assert pieces(items["v2_5"]) == ["Put the four photos in time order.", "[red]", "[green]", "[blue]", "[yellow]"]
    assert items["v2_1"].gold == "the second<OR>right"


def test_ocrbench_prompts():
    items = items_of("ocrbench")
    assert pieces(items["7"]) == [
        "[gray]", " Please write out the expression of the formula in the image using LaTeX format."]
    assert items["7"].gold == ["x ^ { 2 } + 1"]
    assert items["7"].meta == {"dataset": "HME100k", "question_type": "Handwritten Mathematical Expression Recognition"}


def test_mathvision_prompts():
    items = items_of("mathvision")
    instruction = ('Please solve the problem and put your answer in one "\\boxed{}". If it is a multiple choice '
                   'question, only one letter is allowed in the "\\boxed{}".\n')
    assert pieces(items["3"]) == [instruction + "In the figure ", "[blue]",
                                  " the square has side 4. What is the shaded area?\nA. 2\nB. 4\nC. 6\nD. 8\nE. 16"]
    # Two <imageN> tokens are left alone and the image goes in front of the question.
    assert pieces(items["5"]) == [instruction, "[magenta]", " Which picture fits the pattern? <image1> Choose from "
                                  "<image2>.\nA. A\nB. B\nC. C\nD. D\nE. E"]
    assert items["2"].meta["question_type"] == "open" and items["2"].gold == "8"


def test_cii_bench_prompt():
    item = items_of("cii_bench")["test-3"]
    assert pieces(item) == [
        "请根据提供的图片尝试回答下面的单选题。直接回答正确选项，不要包含额外的解释。请使用以下格式：“答案：$LETTER”，其中$LETTER是你认为正确答案"
        "的字母。\n", "[blue]", " 这幅图片的深层含义是什么？\nA. 家和万事兴\nB. 一寸光阴一寸金\nC. 滴水穿石\nD. 守株待兔\nE. 亡羊补牢\n"
        "F. 拔苗助长\n答案："]
    assert item.gold == "F" and item.meta["letters"] == "ABCDEF"


def test_blink_prompts():
    items = items_of("blink")
    assert pieces(items["val_Forensic_Detection_1"]) == [
        "[yellow]", "[magenta]", "[cyan]", "[orange]",
        " Which image is most likely a real photograph?\nSelect from the following choices.\n(A) first\n(B) second\n"
        "(C) third\n(D) fourth\n\n" + LETTER_LINE]
    assert items["val_Forensic_Detection_1"].gold == "D"
    assert items["val_Forensic_Detection_1"].meta["sub_task"] == "Forensic_Detection"
    assert list(items)[:2] == ["val_Art_Style_1", "val_Counting_1"]  # configs in spec order


def test_aime_prompt_and_ids():
    items = items_of("aime")
    assert list(items) == ["2024/60", "2024/61", "2024/62", "2024/63", "2025/0", "2025/1", "2025/2"]
    assert items["2025/1"].messages == [{"role": "user", "content": (
        "Solve the following math problem step by step. Put your answer inside \\boxed{}.\n\n"
        "Find the largest prime factor of $9991$.\n\nRemember to put your answer inside \\boxed{}.")}]
    assert items["2025/1"].gold == "103" and items["2025/1"].meta == {"year": "2025"}


def test_gpqa_shuffle_and_prompt():
    items = items_of("gpqa_diamond")
    question = ("During which phase of the cell cycle is DNA replicated?")
    base = ["G1 phase", "M phase", "G2 phase", "S phase"]  # incorrect 1-3, then correct (evalscope order)
    seed = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    order = list(range(4))
    random.Random(seed).shuffle(order)
    options = [base[i] for i in order]
    item = items["recFixture0003"]
    assert item.messages[0]["content"] == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
        f"answering.\n\n{question}\n\nA) {options[0]}\nB) {options[1]}\nC) {options[2]}\nD) {options[3]}")
    assert item.gold == "ABCD"[options.index("S phase")]
    assert item.meta["options"] == options and item.meta["domain"] == "Biology"


def test_livebench_release_filter_and_prompt():
    items = items_of("livebench")
    # 2025-04-02 questions are newer than release 2024-11-25; b2e1d1 was removed on 2024-08-31, e5a0b5 on 2024-11-25.
    assert set(items) == {"a1f0c3", "a1f0c4", "b2e1d0", "c3d2e1", "c3d2e2", "d4c3b2", "e5a0b1", "e5a0b2", "e5a0b3",
                          "e5a0b4", "e5f6a7", "e5f6a8"}
    item = items["b2e1d0"]
    assert item.messages == [{"role": "user", "content": item.meta["question_text"]}]
    assert item.gold == "B"
    assert item.meta["category"] == "math" and item.meta["task"] == "math_comp" and item.meta["subtask"] == "amc"
    assert item.meta["livebench_release_date"] == "2024-06-24"
    # grouped by category/task, so the headline averages task means within a category, as LiveBench does
    assert load_task("livebench").group_by == "cell" and item.meta["cell"] == "math/math_comp"


def test_mmlu_five_shot_prompt():
    item = items_of("mmlu")["high_school_biology/3"]
    shots = fixtures.MMLU_SUBJECTS["high_school_biology"]["dev"]
    blocks = [f"{q}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer: {'ABCD'[a]}" for q, c, a in shots]
    expected = ("The following are multiple choice questions (with answers) about high school biology.\n\n"
                + "\n\n".join(blocks) + "\n\nWhich organelle produces most of a cell's ATP?\nA. Golgi body\n"
                "B. Mitochondrion\nC. Vacuole\nD. Lysosome\nAnswer:")
    assert item.messages == [{"role": "user", "content": expected}]
    assert item.gold == "B" and item.meta["subject"] == "high_school_biology"
    # The question is stripped, as lm-eval does.
    assert "\n\nWhich force keeps planets in orbit?\nA. Magnetism" in items_of("mmlu")["astronomy/2"].messages[0]["content"]


def test_musr_cot_plus_prompt():
    items = items_of("musr")
    item = items["object_placements/0"]
    assert item.messages[0] == {"role": "system",
                                "content": "You are a helpful assistant that will answer the questions given by the user."}
    narrative, question, choices, answer = fixtures.MUSR["object_placements"][0]
    hint = ("Based on this story, we want to identify where someone believes that a certain object is at the end of "
            "the story. In order to do that, you need to read the story and keep track of where they think the object "
            "is at each point. When an object is moved, the person may observe its new location if they saw it move."
            "\n\nTo see where an object ends up, they must be able to see the location that it moves to and not be "
            "too distracted by what they are doing. If they do not observe the object moving, then they will still "
            "believe it to be in the last location where they observed it.")
    assert item.messages[1]["content"] == (
        f"{narrative}\n\n{hint}\n\n{question}\n\nPick one of the following choices:\n1 - drawer\n2 - shelf\n3 - table"
        "\n\nYou must pick one option. Explain your reasoning step by step before you answer. Finally, the last "
        'thing you generate should be "ANSWER: (your answer here, including the choice number)"')
    assert item.gold == answer + 1 and item.meta == {"options": choices, "domain": "object_placements"}
    # Other domains: hint after "You must pick one option."; team allocation's hint ends in a blank line.
    team = items["team_allocation/1"].messages[1]["content"]
    assert "\n3 - Planting: Cal, Watering: Ada and Ben\n\nYou must pick one option. The story should allow" in team
    assert team.endswith('as effectively as possible.\n\n Explain your reasoning step by step before you answer. '
                         'Finally, the last thing you generate should be "ANSWER: (your answer here, including the '
                         'choice number)"')


# --------------------------------------------------------------------------- gold/meta contract with the scorers


CORRECT_REPLY = {
    "choice": lambda item: f"Answer: {item.gold}", "gpqa": lambda item: f"Answer: {item.gold}",
    "mmlu": lambda item: str(item.gold), "cmmmu": lambda item: f"答案：{item.gold}",
    "mmmu": lambda item: f"The answer is {item.gold}", "ocrbench": lambda item: item.gold[0],
    "mathvision": lambda item: f"\\boxed{{{item.gold}}}", "aime": lambda item: f"\\boxed{{{item.gold}}}",
    "musr": lambda item: f"ANSWER: {item.gold}",
}


@pytest.mark.parametrize("name", ["mmmu", "mmmu_pro_standard", "mmmu_pro_vision", "cmmmu", "ocrbench", "mathvision",
                                  "cii_bench", "blink", "aime", "gpqa_diamond", "mmlu", "musr"])
def test_scorer_accepts_gold_and_meta(name):
    """A reply stating the gold answer scores 1.0: gold and meta have the shape the scorer reads."""
    from flageval_lite.scoring import get_scorer

    spec = load_task(name)
    scorer = get_scorer(spec.scorer)
    for item in iter_items(spec, data_dir=HUB):
        result = scorer(CORRECT_REPLY[spec.scorer](item), item.gold, item.meta, **spec.scorer_args)
        assert result.value == 1.0, (item.item_id, result)


# --------------------------------------------------------------------------- limit, TSV, images, errors


def test_limit_is_a_deterministic_hash_spread_subset():
    spec = load_task("blink")
    every = [i.item_id for i in iter_items(spec, data_dir=HUB)]
    five = [i.item_id for i in iter_items(spec, data_dir=HUB, limit=5)]
    assert five == [i.item_id for i in iter_items(spec, data_dir=HUB, limit=5)]
    assert five == sorted(five, key=every.index)  # still in dataset order
    expected = sorted(every, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:5]
    assert set(five) == set(expected)
    three = [i.item_id for i in iter_items(spec, data_dir=HUB, limit=3)]
    assert set(three) <= set(five)
    assert len(list(iter_items(spec, data_dir=HUB, limit=100))) == len(every)
    with pytest.raises(UserError, match="limit"):
        next(iter_items(spec, data_dir=HUB, limit=0))


def test_limit_applies_after_the_where_filter():
    ids = {i.item_id for i in iter_items(load_task("livebench"), data_dir=HUB, limit=12)}
    assert ids == set(items_of("livebench"))


def test_vlmeval_tsv_images_lists_and_references():
    items = items_of("mmmu_tsv", data_dir=VLMEVAL)
    assert list(items) == ["2", "3", "4", "5", "6"]  # `where` keeps the validation rows
    # A stringified list of base64 images is a multi-image row.
    assert pieces(items["2"]) == ["Compare ", "[green]", " and ", "[blue]",
                                  f". Which is larger?\nA. The first\nB. The second\n{MC}"]
    # Row 4's image cell is "3": it reuses row 3's image.
    assert pieces(items["4"])[0] == "[yellow]" == pieces(items["3"])[1]
    assert items["5"].meta["question_type"] == "open" and items["5"].meta["options"] == []
    assert pieces(items["6"]) == ["[cyan]", " Which century does this map come from?\nA. 15th\nB. 17th\nC. 19th\n"
                                            f"D. 20th\n{MC}"]


def test_max_image_pixels_downscales():
    full = items_of("mmmu_pro_vision")["test_Biology_2"]
    small = next(i for i in iter_items(load_task("mmmu_pro_vision"), data_dir=HUB, max_image_pixels=108)
                 if i.item_id == "test_Biology_2")
    assert decode(full.messages[0]["content"][0]["image_url"]["url"]).size == (24, 18)
    image = decode(small.messages[0]["content"][0]["image_url"]["url"])
    assert image.size == (12, 9)
    assert fixtures.nearest_color(image.getpixel((6, 4))) == "red"


def test_missing_dataset_is_one_clear_line(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(UserError) as info:
        next(iter_items(load_task("mmmu"), data_dir=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MMMU: dataset lmms-lab/MMMU (revision 364f2e2eb107b36e07ff4c5a15f5947a759cef47) is "
                              "not in the offline cache")
    assert "--data-dir" in message and "huggingface-cli download lmms-lab/MMMU --repo-type dataset" in message


def test_a_copy_still_holding_a_loading_script_is_one_clear_line(tmp_path):
    """A revision still holding a loading script (google/fleurs had `fleurs.py` as of 2025-11) is refused by
    `datasets` >= 4: one line, pointing at the parquet copy."""
    import shutil

    copy = tmp_path / "google/fleurs"
    shutil.copytree(ROOT / "tests/fixtures/hub/google/fleurs", copy)
    (copy / "fleurs.py").write_text("# the dataset's loading script\n")
    with pytest.raises(UserError) as info:
        next(iter_items(load_task("fleurs_zh"), data_dir=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"FLEURS zh: dataset {copy} config 'cmn_hans_cn' split 'test': ")
    assert "fleurs.py" in message and message.endswith("use a copy of its parquet files (docs/tasks.md, Revisions) "
                                                       f"(nor does it hold {copy}/data/cmn_hans_cn/test.tsv)")


def test_missing_local_file(tmp_path):
    with pytest.raises(UserError, match="MMMU: data file MMMU_DEV_VAL.tsv not found"):
        next(iter_items(load_task("mmmu_tsv"), data_dir=str(tmp_path)))


def _local_task(tmp_path, prompt: str, images: str = "[image]") -> Path:
    Image.new("RGB", (8, 8), fixtures.COLORS["red"]).save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "q1", "image": "red.png", "a": 1}) + "\n")
    path = tmp_path / "local.yaml"
    path.write_text(f"name: local\ntitle: Local\nmodality: vision\ndataset: {{path: data.jsonl}}\nid_field: id\n"
                    f"images: {images}\nprompt: {json.dumps(prompt)}\ngold: a\nscorer: choice\n")
    return path


def test_local_jsonl_with_image_paths(tmp_path):
    item = next(iter_items(load_task(_local_task(tmp_path, "Look: <image 1> now"))))
    assert pieces(item) == ["Look: ", "[red]", " now"]


def test_out_of_range_placeholder_is_an_error_of_that_item(tmp_path):
    """Issue 18: an item-level problem no longer ends the task; the item carries its one-line error."""
    item = next(iter_items(load_task(_local_task(tmp_path, "<image 1> and <image 2>"))))
    assert item.item_id == "q1" and item.messages == []
    assert item.error == "local: item q1: prompt refers to <image 2> but the item has 1 image(s)"


def test_undefined_field_is_an_error_of_that_item_naming_file_and_field(tmp_path):
    item = next(iter_items(load_task(_local_task(tmp_path, "{{ questoin }}"))))
    assert item.error == f"{tmp_path / 'local.yaml'}: prompt: item q1: 'questoin' is undefined"


def test_a_local_dataset_edited_in_place_is_read_again(tmp_path) -> None:
    """`datasets` keys a local folder's cache by its card; ours is keyed by the files, so edits are never stale."""
    import shutil

    for org in ("math-ai", "HuggingFaceH4"):
        shutil.copytree(ROOT / "tests/fixtures/hub" / org, tmp_path / org)
    before = items_of("aime", data_dir=str(tmp_path))
    rows_file = tmp_path / "math-ai/aime25/test.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    rows[0]["problem"] = "Edited: " + rows[0]["problem"]
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    after = items_of("aime", data_dir=str(tmp_path))
    assert before.keys() == after.keys()
    changed = [i for i in after if after[i].messages != before[i].messages]
    assert len(changed) == 1 and "Edited: " in json.dumps(after[changed[0]].messages)


def _colour_b64(name: str) -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), fixtures.COLORS[name]).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


def _file_task(tmp_path, data: str, fmt: str) -> Path:
    path = tmp_path / "file.yaml"
    path.write_text(f"name: file\ntitle: File\nmodality: vision\ndataset: {{path: {data}, format: {fmt}}}\n"
                    "id_field: index\nimages: [image]\nprompt: \"{{ question }} <image 1>\"\ngold: answer\n"
                    "scorer: choice\n")
    return path


def test_tsv_streams_images_and_resolves_references_both_ways(tmp_path):
    """Row 1 refers forward to row 3's image, row 4 back to row 2's; a quoted question spans two lines (the record
    offsets must count it), and `limit` picks the same items as from any other walk."""
    rows = [("1", "Forward?", "3", "A"), ("2", '"Two\nlines?"', _colour_b64("blue"), "B"),
            ("3", "Own", _colour_b64("red"), "C"), ("4", "Back?", "2", "D")]
    (tmp_path / "data.tsv").write_text("index\tquestion\timage\tanswer\n"
                                       + "".join("\t".join(r) + "\n" for r in rows))
    spec = load_task(_file_task(tmp_path, "data.tsv", "tsv-vlmeval"))
    items = {item.item_id: item for item in iter_items(spec)}
    assert {k: pieces(v) for k, v in items.items()} == {
        "1": ["Forward? ", "[red]"], "2": ["Two\nlines? ", "[blue]"], "3": ["Own ", "[red]"], "4": ["Back? ", "[blue]"]}
    assert [items[k].gold for k in items] == ["A", "B", "C", "D"]
    chosen = set(sorted(items, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:2])
    assert [i.item_id for i in iter_items(spec, limit=2)] == [k for k in items if k in chosen]


def test_parquet_streams_batches_with_image_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = ["red", "green", "blue"] * 50  # more rows than one record batch
    images = [{"bytes": base64.b64decode(_colour_b64(c)), "path": None} for c in colours]
    pq.write_table(pa.table({"index": list(range(len(colours))), "question": [f"Q{i}" for i in range(len(colours))],
                             "image": images, "answer": colours}), tmp_path / "data.parquet")
    spec = load_task(_file_task(tmp_path, "data.parquet", "parquet"))
    items = list(iter_items(spec))
    assert [i.item_id for i in items] == [str(i) for i in range(len(colours))]
    assert [pieces(i)[1] for i in items] == [f"[{c}]" for c in colours] and items[4].gold == "green"
    chosen = set(sorted((i.item_id for i in items), key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:7])
    assert [i.item_id for i in iter_items(spec, limit=7)] == [i.item_id for i in items if i.item_id in chosen]


def test_jsonl_error_names_the_line_even_when_the_first_item_is_fine(tmp_path):
    """Preflight asks for the first item with limit=1, whose subset walks every line's text first."""
    (tmp_path / "data.jsonl").write_text(json.dumps({"index": 1, "question": "q", "image": _colour_b64("red"),
                                                     "answer": "A"}) + "\n\n{oops\n")
    with pytest.raises(UserError, match=r"data.jsonl:3: invalid JSON"):
        next(iter_items(load_task(_file_task(tmp_path, "data.jsonl", "jsonl")), limit=1))
