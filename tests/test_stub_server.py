"""The stub server over real loopback HTTP with the real openai client."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from flageval_lite.records import stable_hash
from helpers_servers import ServerPool, free_port, launch_server, launch_stub, stub_argv


@pytest.fixture
def pool(tmp_path):
    servers = ServerPool(tmp_path)
    yield servers
    servers.stop_all()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5)


def chat(server, text: str, **kw):
    return client(server).chat.completions.create(model="stub", messages=[{"role": "user", "content": text}], **kw)


def outcome(server, text: str) -> str:
    try:
        return chat(server, text, timeout=0.3).choices[0].message.content
    except openai.APIStatusError as exc:
        return str(exc.status_code)
    except Exception as exc:  # noqa: BLE001 - the fault's type is what is compared
        return type(exc).__name__


def test_metadata_routes(pool):
    server = pool.stub("--model", "tiny")
    assert server.get("/v1/models")["data"][0]["id"] == "tiny"
    assert server.get("/version")["version"].startswith("stub-")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/nope")
    assert err.value.code == 404


def test_answers_are_deterministic_and_counted_per_prompt(pool):
    server = pool.stub()
    messages = [{"role": "user", "content": "the quick brown fox"}]
    first = client(server).chat.completions.create(model="stub", messages=messages)
    again = client(server).chat.completions.create(model="stub", messages=messages)
    assert first.choices[0].message.content == again.choices[0].message.content == "the quick brown fox"
    assert first.usage.completion_tokens == 4 and first.choices[0].finish_reason == "stop"
    stats = server.get("/stats")
    assert stats["requests"]["/v1/chat/completions"] == {stable_hash(messages): 2} and stats["total"] == 2


def test_max_tokens_truncates_with_length(pool):
    server = pool.stub()
    reply = chat(server, "a b c d e f", max_tokens=3)
    assert reply.choices[0].message.content == "a b c" and reply.choices[0].finish_reason == "length"


def test_letter_mode_picks_among_the_prompt_options(pool):
    server = pool.stub("--answer-mode", "letter")
    prompt = "Which?\nA. red\nB. green\nC. blue"
    answers = {chat(server, prompt + f"\n(variant {i})").choices[0].message.content for i in range(12)}
    assert answers <= {"The answer is (A).", "The answer is (B).", "The answer is (C)."} and len(answers) > 1
    assert chat(server, prompt).choices[0].message.content == chat(server, prompt).choices[0].message.content


def test_streaming_with_usage_and_reasoning(pool):
    server = pool.stub("--reasoning")
    stream = chat(server, "x y z", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content", "") for c in chunks if c.choices)
    assert text == "x y z" and reasoning.startswith("Thinking about prompt")
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_endpoint(pool):
    server = pool.stub("--answer-mode", "fixed", "--fixed-text", "forty two")
    reply = client(server).completions.create(model="stub", prompt="anything", max_tokens=5)
    assert reply.choices[0].text == "forty two" and reply.usage.completion_tokens == 2
    assert server.get("/stats")["requests"]["/v1/completions"] == {stable_hash("anything"): 1}


def test_fault_sequence_is_deterministic_per_seed(pool):
    args = ("--fault-rate", "0.5", "--faults", "500,429,reset,malformed", "--hang-s", "1")
    same_a, same_b, other = pool.stub(*args, "--seed", "3"), pool.stub(*args, "--seed", "3"), pool.stub(*args)
    runs = [[outcome(s, f"q {i}") for i in range(30)] for s in (same_a, same_b, other)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert {"500", "429", "APIConnectionError", "JSONDecodeError"} <= set(runs[0])
    failed = sum(answer != f"q {i}" for i, answer in enumerate(runs[0]))
    assert sum(same_a.get("/stats")["faults"].values()) == failed


def test_fail_first_and_retry_after(pool):
    server = pool.stub("--fail-first", "2", "--faults", "429", "--retry-after", "1.5")
    with pytest.raises(openai.RateLimitError) as err:
        chat(server, "hello")
    assert err.value.response.headers["retry-after"] == "1.5"
    assert outcome(server, "hello") == "429" and outcome(server, "hello") == "hello"


def test_hang_and_truncated_faults(pool):
    hanging = pool.stub("--fail-first", "1", "--faults", "hang", "--hang-s", "30")
    started = time.monotonic()
    assert outcome(hanging, "wait") == "APITimeoutError" and time.monotonic() - started < 5
    assert hanging.get("/stats")["in_flight"] == 0  # the hang ended with the client's disconnect
    cut = pool.stub("--fail-first", "1", "--faults", "truncated")
    stream = chat(cut, "one two three four five six", stream=True)
    assert all(c.choices[0].finish_reason is None for c in stream if c.choices)  # no finish, no [DONE]


def test_max_in_flight_and_stats_file(pool, tmp_path):
    stats_file = tmp_path / "stats.json"
    # long enough that all six requests overlap even on a loaded machine
    server = pool.stub("--latency-ms", "1000", "--stats-file", str(stats_file))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as executor:
        list(executor.map(lambda i: chat(server, f"p{i}"), range(6)))
    time.sleep(0.5)
    written = json.loads(stats_file.read_text())
    assert written["max_in_flight"] == 6 and written["total"] == 6
    server.stop()
    assert json.loads(stats_file.read_text())["total"] == 6


def test_exit_after_simulates_a_crash(pool):
    server = pool.stub("--exit-after", "2")
    assert outcome(server, "a") == "a" and outcome(server, "b") == "b"
    server.proc.wait(5)
    assert not server.alive() and not server.healthy()


def test_bad_options_and_bodies(pool, tmp_path):
    port = free_port()
    with pytest.raises(RuntimeError, match="unknown fault"):
        launch_server(stub_argv(port, "--fault-rate", "0.1", "--faults", "explode"), port, tmp_path / "bad.log", 10)
    server = pool.stub()
    request = urllib.request.Request(server.base_url + "/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 400


def test_launch_server_handle_stops_its_group(tmp_path):
    with launch_stub(tmp_path) as server:
        assert server.healthy()
    assert not server.alive()
