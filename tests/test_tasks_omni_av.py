"""The omni-av tasks on their fixtures (upstream schemas, tests/fixtures/hub) through the real `datasets` loader:
counts, prompts, where the audio/video parts land and that they carry the fixture's own bytes, gold and meta."""
from __future__ import annotations

import base64
import importlib.util
import io
import wave
from pathlib import Path

from flageval_lite.tasks import iter_items, load_suite, load_task

ROOT = Path(__file__).resolve().parents[1]
HUB = str(ROOT / "tests/fixtures/hub")

_builder = importlib.util.spec_from_file_location("build_fixtures", ROOT / "tests/fixtures/build_fixtures.py")
fixtures = importlib.util.module_from_spec(_builder)
_builder.loader.exec_module(fixtures)

MC = "Answer with the option's letter from the given choices directly."


def items_of(name: str) -> dict:
    return {item.item_id: item for item in iter_items(load_task(name), data_dir=HUB)}


def parts(item) -> list:
    return item.messages[-1]["content"]


def wav_of(part: dict) -> bytes:
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    return base64.b64decode(part["input_audio"]["data"])


def test_suite_order_and_counts():
    assert [s.name for s in load_suite("omni-av")] == ["librispeech", "fleurs_zh", "mmau", "video_mme", "omnibench"]
    full = [s.name for s in load_suite("omni")]  # the card's 14 rows, then the five beyond it
    assert full[:14] == [s.name for s in load_suite("vision") + load_suite("text")]
    assert full[14:] == [s.name for s in load_suite("omni-av")]
    assert [s.name for s in load_suite("omni") if s.beyond_card] == full[14:]
    assert {name: len(items_of(name)) for name in full[14:]} == {
        "librispeech": 4, "fleurs_zh": 3, "mmau": 4, "video_mme": 2, "omnibench": 3}


def test_librispeech_sends_the_utterance_and_keeps_the_raw_transcript():
    item = items_of("librispeech")["121-121726-0000"]
    audio, text = parts(item)
    assert wav_of(audio) == fixtures.tone_wav(440.0)
    with wave.open(io.BytesIO(wav_of(audio))) as wav:
        assert (wav.getframerate(), wav.getnframes()) == (16000, 6400)
    assert text == {"type": "text", "text": "Transcribe the English audio into text without any punctuation marks."}
    assert item.gold == "MISTER BROWN WON'T BE COMING TODAY SAID THE BOY" and item.meta == {"speaker": "121"}


def test_fleurs_gold_is_the_raw_transcription_and_each_recording_an_item():
    fleurs = items_of("fleurs_zh")
    item = fleurs["5863102947751049316"]  # the recording's file name: a sentence id is shared by its speakers
    assert item.gold == "他说：“这本书非常有意思！”" and item.meta == {"sentence_id": 1002, "gender": "female"}
    assert wav_of(parts(item)[0]) == fixtures.tone_wav(390.0)
    assert sorted(i.meta["sentence_id"] for i in fleurs.values()) == [1001, 1001, 1002]


def test_mmau_gold_letter_from_the_answer_text():
    item = items_of("mmau")["mmau-mini-0002"]
    assert parts(item)[1]["text"] == ("Does the pitch rise, fall or stay the same?\nA. rise\nB. fall\nC. stay the same\n"
                                      + MC)
    assert item.gold == "C" and item.meta["letters"] == "ABC" and item.meta["task"] == "music"


def test_video_mme_short_subset_sends_the_mp4_itself():
    items = items_of("video_mme")
    assert sorted(items) == ["001-1", "002-1"]  # the `medium` row is filtered out
    video, text = parts(items["001-1"])
    url = video["video_url"]["url"]
    assert url.startswith("data:video/mp4;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (Path(HUB) / "lmms-lab/Video-MME/data/fx001.mp4").read_bytes()
    assert text["text"].endswith("What colour does the screen turn at the end?\nA. Red.\nB. Blue.\nC. Green.\n"
                                 "D. Yellow.\nThe best answer is:")
    assert items["001-1"].gold == "B" and items["001-1"].meta["task_type"] == "Temporal Perception"


def test_omnibench_sends_audio_then_image_then_the_question():
    item = items_of("omnibench")["1"]
    audio, image, text = parts(item)
    assert wav_of(audio) == fixtures.tone_wav(350.0) and image["type"] == "image_url"
    assert text["text"].startswith(" Where is the speaker most likely standing?\nA. in a green field")
    assert item.gold == "A" and item.meta["audio_type"] == "speech"
