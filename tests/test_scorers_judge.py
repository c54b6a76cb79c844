"""MM-Vet judge: a real OpenAI client against a small OpenAI-compatible judge served on loopback."""
import importlib.util
import json
import re
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import yaml

from flageval_lite.config.run import load_run_config
from flageval_lite.errors import UserError
from flageval_lite.records import ScoreResult
from flageval_lite.scoring import JudgeClient, get_scorer
from flageval_lite.scoring.judge_prompts import (file_prompt, flagevalmm_score, judge_prompt, official_score,
                                                 parse_verdict)
from flageval_lite.scoring.apply import judge_prompt_of, make_judge, outcome_of

mmvet_judge = get_scorer("mmvet_judge")
QUESTION = "What is x in the equation?<image 1>"

# What the judge answers, keyed by the prediction it is asked about: a list is played in order, per item.
SCRIPTS = {
    "x = -1 or x = -5": ['{"score": 1.0}'],
    "x = -5": ['```json\n{"score": 0.5}\n```'],
    "flaky": ["I would say it is fine", '{"score": 0.3}'],
    "thinking judge": ['<think>compare both</think>{"score": 0.8}'],
    "out of range": ['{"score": 7}'],
    "garbage": ["Looks good to me!"],
    "server error": [500],
    "bare number judge": ["0.7"],
    "unusable twice, then a number": ["I would say", "correct", "0.6"],
    "unusable twice, then json": ["I would say", "correct", '{"score": 0.6}'],
    "never a score": ["It depends."],
    "fault, unusable, then a number": [500, "hmm", "0.4"],
    "timeout, then json": ["hang", '{"score": 0.9}'],
    "a new score every run": ['{"score": 0.2}', '{"score": 0.5}', '{"score": 0.8}'],
}
HANG_S = 1.0


class JudgeServer:
    def __init__(self):
        self.requests = []
        self._served = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                prompt = body["messages"][0]["content"]
                # the item is the last table row: closed (`| q | g | p |`) or left open for the score (`| q | g | p | `)
                prediction = re.findall(r"^\| .* \| .* \| (.*?) \| ?$", prompt, flags=re.M)[-1]
                turn = server._served.get(prediction, 0)
                server._served[prediction] = turn + 1
                script = SCRIPTS[prediction]
                answer = script[min(turn, len(script) - 1)]
                if answer == "hang":  # longer than the client's timeout: the request fails, the reply is lost
                    time.sleep(HANG_S)
                    return
                if answer == 500:
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "judge overloaded"}}')
                    return
                reply = {
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def asked(self, prediction):
        """(temperature, prompt) of every request about `prediction`, in order."""
        return [(body["temperature"], body["messages"][0]["content"]) for body in self.requests
                if f"| {prediction} |" in body["messages"][0]["content"]]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server():
    judge_server = JudgeServer()
    yield judge_server
    judge_server.close()


@pytest.fixture()
def judge(server, tmp_path):
    return JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite")


@pytest.mark.parametrize(
    "prediction,score",
    [("x = -1 or x = -5", 1.0), ("x = -5", 0.5), ("thinking judge", 0.8)],
)
def test_judge_scores_and_request_shape(server, judge, prediction, score):
    result = mmvet_judge(prediction, "-1<AND>-5", {"question": QUESTION}, judge=judge)
    assert (result.value, result.extracted, result.parsed) == (score, prediction, True)
    assert result.detail == {"judge": f"{server.base_url}|judge-model", "cached": False, "runs": [
        {"score": score, "attempts": 1, "temperatures": [0.0], "gave_up": False, "faults": 0, "cached": False}]}
    request = server.requests[-1]
    assert request["model"] == "judge-model" and request["temperature"] == 0.0
    assert "| What is x in the equation?<image 1> | -1 <AND> -5 | " + prediction + " |" in request["messages"][0]["content"]


def test_verdicts_are_cached_per_item_and_judge(server, judge, tmp_path):
    meta = {"question": QUESTION}
    first = mmvet_judge("x = -5", "-1<AND>-5", meta, judge=judge)
    again = mmvet_judge("x = -5", "-1<AND>-5", meta, judge=judge)
    assert (first.detail["cached"], again.detail["cached"], len(server.requests)) == (False, True, 1)
    reopened = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite")
    assert mmvet_judge("x = -5", "-1<AND>-5", meta, judge=reopened).detail["cached"] is True
    assert len(server.requests) == 1
    other_judge = JudgeClient(server.base_url, "another-judge", cache_path=tmp_path / "judge.sqlite")
    assert mmvet_judge("x = -5", "-1<AND>-5", meta, judge=other_judge).detail["cached"] is False
    assert len(server.requests) == 2


def test_unusable_reply_is_asked_again_warmer(server, judge):
    result = mmvet_judge("flaky", "yes", {"question": "Is it a cat?<image 1>"}, judge=judge)
    assert (result.value, result.parsed) == (0.3, True)
    assert [t for t, _ in server.asked("flaky")] == [0.0, 0.5]
    assert result.detail["runs"][0] | {"cached": None} == {"score": 0.3, "attempts": 2, "temperatures": [0.0, 0.5],
                                                            "gave_up": False, "faults": 0, "cached": None}


@pytest.mark.parametrize("prediction,problem,requests", [
    ("out of range", "no usable score at temperatures 0, 0.5, 1: last reply '{\"score\": 7}'", 3),
    ("garbage", "no usable score at temperatures 0, 0.5, 1", 3),
    ("server error", "2 failed requests (an infrastructure fault, not a verdict): InternalServerError", 2)])
def test_our_prompt_reports_a_judge_failure_apart_and_never_caches_it(server, tmp_path, prediction, problem,
                                                                      requests):
    judge = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite", max_retries=2,
                        retry_backoff_s=0.01)
    result = mmvet_judge(prediction, "yes", {"question": "Is it a cat?"}, judge=judge)
    assert (result.value, result.extracted, result.parsed) == (0.0, "", False)
    assert problem in result.detail["judge_error"]
    assert len(server.requests) == requests
    mmvet_judge(prediction, "yes", {"question": "Is it a cat?"}, judge=judge)
    assert len(server.requests) == 2 * requests  # failures are asked again, never served from the cache


def test_empty_reply_is_unparsed_without_asking(server, judge):
    assert mmvet_judge("<think>cut off", "yes", {"question": "Q"}, judge=judge) == ScoreResult(0.0, "", parsed=False)
    assert server.requests == []


def test_configuration_errors():
    with pytest.raises(UserError, match="no judge"):
        mmvet_judge("a", "b", {"question": "Q"})
    with pytest.raises(UserError, match="'question'"):
        mmvet_judge("a", "b", {}, judge=JudgeClient("http://127.0.0.1:9/v1", "m"))
    with pytest.raises(UserError, match="max_retries"):
        JudgeClient("http://127.0.0.1:9/v1", "m", max_retries=0)


@pytest.mark.parametrize(
    "content,score",
    [
        ('{"score": 0.7}', 0.7),
        ('{"score": 1}', 1.0),
        ('{"score": "0.4"}', 0.4),
        ('Here you go: {"score": 0.2}', 0.2),
        ('```json\n{"score": 0.9}\n```', 0.9),
        ('{"score": -0.1}', None),
        ('{"score": 1.5}', None),
        ('{"score": true}', None),
        ('{"correctness": 0.5}', None),
        ("0.5", None),
        ("", None),
    ],
)
def test_parse_verdict(content, score):
    assert parse_verdict(content) == score


def test_prompt_escapes_table_cells():
    prompt = judge_prompt("Line one\nline two | pipe", "a<OR>b", "pred")
    assert "| Line one<br>line two \\| pipe | a <OR> b | pred |" in prompt
    assert prompt.rstrip().endswith('{"score": <number from 0.0 to 1.0>}.')


OFFICIAL_STYLE = "Grade the prediction against the ground truth ({AND}/{OR} braces are kept as they are).\n" \
                 "| Question | Ground truth | Prediction | Score |\n| --- | --- | --- | --- |\n"


def test_prompt_file_with_slots_is_filled_in_and_cached_under_its_own_hash(server, tmp_path):
    prompt_file = tmp_path / "official.txt"
    prompt_file.write_text(OFFICIAL_STYLE + "| {question} | {gold} | {prediction} |\n")
    judge = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite", prompt_file=prompt_file)
    result = mmvet_judge("x = -5", "-1<AND>-5", {"question": QUESTION}, judge=judge)
    assert result.value == 0.5
    sent = server.requests[-1]["messages"][0]["content"]
    assert sent == OFFICIAL_STYLE + f"| {QUESTION} | -1 <AND> -5 | x = -5 |\n"
    # our own prompt does not reuse the file prompt's verdict (and vice versa)
    own = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite")
    assert mmvet_judge("x = -5", "-1<AND>-5", {"question": QUESTION}, judge=own).detail["cached"] is False
    prompt_file.write_text(OFFICIAL_STYLE + "Edited.\n| {question} | {gold} | {prediction} |\n")
    edited = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite", prompt_file=prompt_file)
    assert mmvet_judge("x = -5", "-1<AND>-5", {"question": QUESTION}, judge=edited).detail["cached"] is False


def test_prompt_file_without_slots_gets_the_item_as_the_row_to_complete():
    assert file_prompt(OFFICIAL_STYLE, "Which?<image 1>\nSay", "a<OR>b", "b\nc") == \
        OFFICIAL_STYLE + "| Which?<image><br>Say | a <OR> b | b<br>c | "


@pytest.mark.parametrize("content, score", [("0.7", 0.7), (" 1.0\n", 1.0), ("0", 0.0), ("0.4 partly", 0.4), ("1.5", None), ("5 people", None),
                                            ("about 0.5", None)])
def test_a_bare_number_reply_is_the_score_with_a_prompt_file(content, score):
    assert parse_verdict(content, bare_number=True) == score


def test_unreadable_or_empty_prompt_file_is_one_line(tmp_path, server):
    with pytest.raises(UserError, match=r"^judge.prompt_file .*missing.txt: cannot read: "):
        JudgeClient(server.base_url, "m", prompt_file=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match=r"^judge.prompt_file .*empty.txt: empty$"):
        JudgeClient(server.base_url, "m", prompt_file=tmp_path / "empty.txt")


SOURCES = Path(__file__).parent / "fixtures" / "judge_sources"
OFFICIAL_SOURCE, FLAGEVALMM_SOURCE = SOURCES / "mm-vet-v2_evaluator.py", SOURCES / "flagevalmm_evaluate.py"
ITEM_QUESTION = "What is x?<image 1>\nExplain"


def _module(path):
    """The fixture imported as Python would: an independent reading of the constant the parser must find."""
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", [{"prompt": "official", "source": OFFICIAL_SOURCE}, {"source": OFFICIAL_SOURCE}])
def test_official_prompt_is_read_from_the_evaluator_and_the_item_appended_as_its_row(server, tmp_path, config):
    judge = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite", **config)
    result = mmvet_judge("bare number judge", "-1<AND>-5", {"question": ITEM_QUESTION}, judge=judge)
    assert (result.value, result.parsed) == (0.7, True)  # the evaluator's completion: the reply is the bare number
    sent = server.requests[-1]["messages"][0]["content"]
    assert sent == _module(OFFICIAL_SOURCE).prompt + "| What is x?<image><br>Explain | -1 <AND> -5 | bare number judge | "


def test_flagevalmm_prompt_is_formatted_with_the_item_and_wants_json(server, tmp_path):
    judge = JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite", prompt="flagevalmm",
                        source=FLAGEVALMM_SOURCE, max_retries=1)
    result = mmvet_judge("x = -1 or x = -5", "-1<AND>-5", {"question": ITEM_QUESTION}, judge=judge)
    assert (result.value, result.parsed) == (1.0, True)
    sent = server.requests[-1]["messages"][0]["content"]
    expected = _module(FLAGEVALMM_SOURCE).MM_VET_PROMPT.format(
        DATA="| What is x?<image 1><br>Explain | -1 <AND> -5 | x = -1 or x = -5 | ")
    assert sent == expected and '{"score": correctness_score}' in sent
    # its evaluator json-loads the reply: a bare number holds no score, so it is asked again warmer, then scored 0.0
    result = mmvet_judge("bare number judge", "-1<AND>-5", {"question": ITEM_QUESTION}, judge=judge)
    assert (result.value, result.parsed, result.detail["runs"][0]["gave_up"]) == (0.0, True, True)
    assert [t for t, _ in server.asked("bare number judge")] == [0.0, 0.5, 1.0, 1.5]


def test_each_prompt_source_caches_its_own_verdicts(server, tmp_path):
    meta, cache = {"question": ITEM_QUESTION}, tmp_path / "judge.sqlite"
    judges = [JudgeClient(server.base_url, "judge-model", cache_path=cache, **config)
              for config in ({}, {"source": OFFICIAL_SOURCE}, {"prompt": "flagevalmm", "source": FLAGEVALMM_SOURCE})]
    assert [mmvet_judge("x = -5", "-1<AND>-5", meta, judge=j).detail["cached"] for j in judges] == [False] * 3
    assert [mmvet_judge("x = -5", "-1<AND>-5", meta, judge=j).detail["cached"] for j in judges] == [True] * 3


def test_the_manifest_names_the_prompt_source():
    assert judge_prompt_of({"source": str(OFFICIAL_SOURCE)}).startswith(
        f"official prompt: `prompt` of {OFFICIAL_SOURCE} (v2/mm-vet-v2_evaluator.py of github.com/yuweihao/MM-Vet; sha256 ")
    assert judge_prompt_of({}).startswith("own prompt (mmvet-judge-1)")
    assert judge_prompt_of({"source": str(OFFICIAL_SOURCE), "runs": 5}).endswith(
        "; an unusable reply is asked again with the re-ask appended (temperatures 0, 0, 0.5, 1, 1.5), then 0.0; "
        "5 runs per item, scored by their mean")


@pytest.mark.parametrize("text, problem", [
    ("prompt_text = 'x'\n", r"no module-level string `prompt`, where v2/mm-vet-v2_evaluator.py of "
                            r"github.com/yuweihao/MM-Vet keeps the official judge prompt$"),
    ("def f():\n    prompt = 'inside a function'\n", "no module-level string `prompt`"),
    ("prompt = ['a', 'list']\n", "no module-level string `prompt`"),
    ('prompt = """unclosed\n', "not Python source"),
])
def test_an_evaluator_without_the_prompt_constant_is_one_line(tmp_path, text, problem):
    source = tmp_path / "mm-vet-v2_evaluator.py"
    source.write_text(text)
    with pytest.raises(UserError, match=rf"^judge.source {re.escape(str(source))}: {problem}") as error:
        JudgeClient("http://127.0.0.1:9/v1", "m", prompt="official", source=source)
    assert "\n" not in str(error.value)


def test_swapped_or_broken_sources_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"flagevalmm_evaluate.py: no module-level string `prompt`"):
        JudgeClient("http://127.0.0.1:9/v1", "m", prompt="official", source=FLAGEVALMM_SOURCE)
    with pytest.raises(UserError, match=r"mm-vet-v2_evaluator.py: no module-level string `MM_VET_PROMPT`, where "
                                        r"tasks/mmvet/evaluate.py of github.com/flageval-baai/FlagEvalMM"):
        JudgeClient("http://127.0.0.1:9/v1", "m", prompt="flagevalmm", source=OFFICIAL_SOURCE)
    (tmp_path / "no_slot.py").write_text('MM_VET_PROMPT = """rate {{it}}"""\n')
    with pytest.raises(UserError, match=r"no_slot.py: `MM_VET_PROMPT` has no \{DATA\} slot"):
        JudgeClient("http://127.0.0.1:9/v1", "m", prompt="flagevalmm", source=tmp_path / "no_slot.py")
    (tmp_path / "stray.py").write_text('MM_VET_PROMPT = """{DATA} {score}"""\n')
    with pytest.raises(UserError, match=r"stray.py: `MM_VET_PROMPT` does not format with DATA alone"):
        JudgeClient("http://127.0.0.1:9/v1", "m", prompt="flagevalmm", source=tmp_path / "stray.py")
    with pytest.raises(UserError, match=r"^judge.source .*absent.py: cannot read: "):
        JudgeClient("http://127.0.0.1:9/v1", "m", source=tmp_path / "absent.py")


@pytest.mark.parametrize("config, problem", [
    ({"prompt": "official"}, r"judge.prompt: official needs judge.source, the path of your checkout of "
                             r"v2/mm-vet-v2_evaluator.py of github.com/yuweihao/MM-Vet"),
    ({"prompt": "flagevalmm"}, "judge.prompt: flagevalmm needs judge.source"),
    ({"prompt": "own", "source": OFFICIAL_SOURCE}, "judge.source is read only with prompt: official or flagevalmm"),
    ({"prompt_file": OFFICIAL_SOURCE, "source": OFFICIAL_SOURCE}, "prompt_file is an alternative to prompt/source"),
    ({"prompt": "gpt4"}, "judge.prompt: 'gpt4' is not one of own, official, flagevalmm"),
])
def test_prompt_key_combinations_that_cannot_work_are_refused(config, problem):
    with pytest.raises(UserError, match=problem):
        JudgeClient("http://127.0.0.1:9/v1", "m", **config)


REASK = "\n\nPLACEHOLDER re-ask, the digit only: "  # what the official fixture's grading loop appends


def _judge(server, tmp_path, style, **kwargs):
    config = {"official": {"source": OFFICIAL_SOURCE}, "own": {},
              "flagevalmm": {"prompt": "flagevalmm", "source": FLAGEVALMM_SOURCE}}[style]
    return JudgeClient(server.base_url, "judge-model", cache_path=tmp_path / "judge.sqlite", retry_backoff_s=0.01,
                       **config, **kwargs)


def test_official_style_reasks_with_its_sentence_at_the_temperature_it_just_used(server, tmp_path):
    judge = _judge(server, tmp_path, "official")
    prediction = "unusable twice, then a number"
    result = mmvet_judge(prediction, "yes", {"question": "Is it a cat?<image 1>"}, judge=judge)
    assert (result.value, result.parsed) == (0.6, True)
    asked = server.asked(prediction)
    assert [t for t, _ in asked] == [0.0, 0.0, 0.5]
    first = asked[0][1]
    assert first.endswith(f"| {prediction} | ") and [p for _, p in asked[1:]] == [first + REASK] * 2
    assert result.detail["runs"][0] | {"cached": None} == {"score": 0.6, "attempts": 3, "cached": None,
                                                            "temperatures": [0.0, 0.0, 0.5], "gave_up": False,
                                                            "faults": 0}


@pytest.mark.parametrize("style, temperatures", [("official", [0.0, 0.0, 0.5, 1.0, 1.5]),
                                                 ("flagevalmm", [0.0, 0.5, 1.0, 1.5])])
def test_upstream_styles_score_zero_after_their_last_unusable_reply_and_keep_it(server, tmp_path, style,
                                                                               temperatures):
    judge = _judge(server, tmp_path, style)
    result = mmvet_judge("never a score", "yes", {"question": "Is it a cat?"}, judge=judge)
    assert (result.value, result.extracted, result.parsed) == (0.0, "never a score", True)
    assert [t for t, _ in server.asked("never a score")] == temperatures
    assert result.detail["runs"] == [{"score": 0.0, "attempts": len(temperatures), "temperatures": temperatures,
                                      "gave_up": True, "faults": 0, "cached": False}]
    assert outcome_of(result) == "wrong"  # the evaluator's 0.0, not a judge failure
    again = mmvet_judge("never a score", "yes", {"question": "Is it a cat?"}, judge=_judge(server, tmp_path, style))
    assert (again.value, again.detail["cached"], again.detail["runs"][0]["gave_up"]) == (0.0, True, True)
    assert len(server.asked("never a score")) == len(temperatures)  # the evaluator keeps its 0.0 too


def test_flagevalmm_style_asks_the_same_prompt_warmer(server, tmp_path):
    judge = _judge(server, tmp_path, "flagevalmm")
    prediction = "unusable twice, then json"
    result = mmvet_judge(prediction, "yes", {"question": "Is it a cat?<image 1>"}, judge=judge)
    assert result.value == 0.6
    asked = server.asked(prediction)
    assert [t for t, _ in asked] == [0.0, 0.5, 1.0] and len({p for _, p in asked}) == 1


def test_a_transport_fault_is_retried_apart_from_the_reask_and_never_scored(server, tmp_path):
    judge = _judge(server, tmp_path, "official", max_retries=2)
    prediction = "fault, unusable, then a number"
    result = mmvet_judge(prediction, "yes", {"question": "Q"}, judge=judge)
    # the 500 is sent again unchanged at the same temperature; then one unusable reply and one re-ask
    asked = server.asked(prediction)
    assert [t for t, _ in asked] == [0.0, 0.0, 0.0] and asked[0][1] == asked[1][1] and asked[2][1].endswith(REASK)
    assert result.value == 0.4
    assert result.detail["runs"][0] | {"cached": None} == {"score": 0.4, "attempts": 2, "temperatures": [0.0, 0.0],
                                                            "gave_up": False, "faults": 1, "cached": None}


@pytest.mark.parametrize("style", ["official", "flagevalmm", "own"])
def test_a_judge_that_stays_down_is_a_judge_failure_in_every_style(server, tmp_path, style):
    judge = _judge(server, tmp_path, style, max_retries=3, runs=2)
    result = mmvet_judge("server error", "yes", {"question": "Q"}, judge=judge)
    assert (result.value, result.parsed) == (0.0, False) and "infrastructure fault" in result.detail["judge_error"]
    assert [t for t, _ in server.asked("server error")] == [0.0] * 3  # never warmer: no reply was unusable
    assert outcome_of(result) == "error"
    mmvet_judge("server error", "yes", {"question": "Q"}, judge=judge)
    assert len(server.asked("server error")) == 6  # nothing was cached


def test_a_timeout_is_a_transport_fault(server, tmp_path):
    judge = JudgeClient(server.base_url, "judge-model", timeout_s=HANG_S / 4, retry_backoff_s=0.01)
    result = mmvet_judge("timeout, then json", "yes", {"question": "Q"}, judge=judge)
    assert result.value == 0.9
    assert result.detail["runs"][0] | {"cached": None} == {"score": 0.9, "attempts": 1, "temperatures": [0.0],
                                                            "gave_up": False, "faults": 1, "cached": None}


def test_runs_are_graded_and_cached_one_by_one_and_averaged(server, tmp_path):
    prediction, meta = "a new score every run", {"question": "Q"}
    result = mmvet_judge(prediction, "yes", meta, judge=_judge(server, tmp_path, "own", runs=3))
    assert result.value == pytest.approx(0.5)
    assert [run["score"] for run in result.detail["runs"]] == [0.2, 0.5, 0.8]
    assert [t for t, _ in server.asked(prediction)] == [0.0, 0.0, 0.0]  # each run starts cold, as upstream's do
    again = mmvet_judge(prediction, "yes", meta, judge=_judge(server, tmp_path, "own", runs=3))
    assert (again.value, again.detail["cached"], len(server.requests)) == (result.value, True, 3)
    more = mmvet_judge(prediction, "yes", meta, judge=_judge(server, tmp_path, "own", runs=4))
    assert [run["cached"] for run in more.detail["runs"]] == [True, True, True, False]
    assert more.value == pytest.approx((0.2 + 0.5 + 0.8 + 0.8) / 4) and len(server.requests) == 4


def test_a_deterministic_judge_gives_every_run_the_same_verdict(server, tmp_path):
    result = mmvet_judge("x = -5", "-1<AND>-5", {"question": QUESTION}, judge=_judge(server, tmp_path, "own", runs=3))
    assert [run["score"] for run in result.detail["runs"]] == [0.5] * 3 and len(server.requests) == 3


def test_an_official_source_without_the_reask_is_one_line(tmp_path):
    source = tmp_path / "mm-vet-v2_evaluator.py"
    source.write_text(OFFICIAL_SOURCE.read_text().replace("question_try", "asked_again"))
    with pytest.raises(UserError, match=r"^judge.source .*: no `question_try = question \+ \"...\"`, the re-ask "
                                        r"that v2/mm-vet-v2_evaluator.py of github.com/yuweihao/MM-Vet sends"):
        JudgeClient("http://127.0.0.1:9/v1", "m", source=source)


@pytest.mark.parametrize("content, score", [("0.7", 0.7), ("0.7 because", 0.7), ("1.0\n", 1.0), ("0.7\nwhy", None),
                                            (" 0.7", None), ("0.7.", None), ("nan", None), ("1.5", None),
                                            ('{"score": 0.7}', None), ("<think>hm</think>0.3", 0.3), (None, None)])
def test_official_reading_is_the_first_space_separated_word(content, score):
    assert official_score(content) == score


@pytest.mark.parametrize("content, score", [('{"score": 0.7}', 0.7), (' {"score": 1} ', 1.0), ('{"score": true}', 1.0),
                                            ('{"score": "0.7"}', None), ('{"score": 7}', None), ('[0.7]', None),
                                            ('```json\n{"score": 0.7}\n```', None), ('{"grade": 0.7}', None),
                                            ("0.7", None), ('{"score": NaN}', None), ("", None)])
def test_flagevalmm_reading_is_the_whole_reply_as_json(content, score):
    assert flagevalmm_score(content) == score


def test_the_run_configs_judge_mapping_reaches_the_client(server, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"judge": {"base_url": server.base_url, "model": "judge-model", "runs": 2,
                                              "source": str(OFFICIAL_SOURCE), "retry_backoff_s": 0.01}}))
    judge = make_judge(load_run_config(path).judge, SimpleNamespace(path=tmp_path / "results.sqlite"))
    result = mmvet_judge("unusable twice, then a number", "yes", {"question": "Q"}, judge=judge)
    # run 0 needs two re-asks; run 1 is asked from scratch and the script's last reply is the number at once
    assert [(run["score"], run["temperatures"]) for run in result.detail["runs"]] == [(0.6, [0.0, 0.0, 0.5]),
                                                                                      (0.6, [0.0])]
    assert (tmp_path / "judge.sqlite").exists()
