"""The embedded server, started for real on SmolLM2, driven by the real `openai` client."""
from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import flageval_lite
from helpers_servers import free_port, launch_server

MODEL = "smollm2-test"
PROMPTS = [
    "What is 2+2?",
    "Write a haiku about the sea.",
    "Name three colors.",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
    "List the prime numbers under 20.",
    "Translate 'good morning' to French.",
    "What is the capital of Japan?",
]


def embedded_argv(port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "flageval_lite.servers.embedded", "--port", str(port), *flags]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    argv = embedded_argv(port, "--model", "smollm2", "--served-model-name", MODEL, "--dtype", "float32",
                         "--device", "cpu", "--max-model-len", "2048", "--max-batch", "8")
    with launch_server(argv, port, tmp_path_factory.mktemp("embedded") / "server.log", timeout_s=300) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/", api_key="EMPTY", max_retries=0, timeout=120)


def ask(client, prompt: str, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kwargs)


def test_version_models_and_health(server, client):
    version = server.get("/version")
    assert version["version"] == flageval_lite.__version__
    stack = (version["engine"], version["model"], version["dtype"], version["ops"], version["device"], version["gpu"])
    assert stack == ("embedded", "SmolLM2-135M-Instruct", "float32", "aten", "cpu", "")
    assert version["packages"]["torch"] == importlib.metadata.version("torch")
    assert version["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert version["batching"]["mode"] == "packed" and version["batching"]["row_invariant"] is True
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert server.get("/health") == {"status": "ok"}


def test_chat_greedy_with_logprobs(client):
    response = ask(client, PROMPTS[0], logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens
    for entry in entries:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        ranked = [alternative.logprob for alternative in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and all(lp <= 0 for lp in ranked)
        # Greedy takes the most likely token, so it heads its own top list.
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)
    # log-probabilities of a full distribution: the top 3 hold at most all of the mass
    assert sum(math.exp(a.logprob) for a in entries[0].top_logprobs) <= 1.0 + 1e-5


def test_stream_with_usage_matches_non_streamed(client):
    whole = ask(client, PROMPTS[1], max_tokens=32)
    chunks = list(ask(client, PROMPTS[1], max_tokens=32, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_string_cuts_text(client):
    full = ask(client, "Count from 1 to 10, separated by commas.", max_tokens=40).choices[0].message.content
    stop = "5"
    assert stop in full, full
    expected = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(ask(client, "Count from 1 to 10, separated by commas.", max_tokens=40, stop=[stop, "zzz"],
                              stream=True))
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            reason = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices[0].finish_reason][0]
        else:
            choice = ask(client, "Count from 1 to 10, separated by commas.", max_tokens=40, stop=stop).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        assert (text, reason) == (expected, "stop")


def test_max_tokens_gives_length(client):
    response = ask(client, PROMPTS[4], max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5
    response = ask(client, PROMPTS[4], max_completion_tokens=3)
    assert (response.choices[0].finish_reason, response.usage.completion_tokens) == ("length", 3)


def test_seed_reproducible_at_temperature_one(client):
    def sample(seed):
        return ask(client, "Tell me a short story.", temperature=1, seed=seed, max_tokens=16).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1


def test_completions_legacy_logprobs(client):
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                         logprobs=2)
    choice = response.choices[0]
    assert response.usage.completion_tokens == len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert "".join(choice.logprobs.tokens).startswith(choice.text)
    assert choice.logprobs.text_offset[0] == 0
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                   choice.logprobs.top_logprobs):
        assert top[token] == logprob and len(top) == 2  # greedy: the chosen token is one of the top two


@pytest.mark.parametrize(
    "change, param",
    [
        ({"model": "no-such-model"}, "model"),
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
         "messages[0].content[1]"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"max_tokens": 2048}, "max_tokens"),
        ({"max_completion_tokens": 4096}, "max_completion_tokens"),
    ],
)
def test_bad_requests_get_400(client, change, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["param"] == param
    assert caught.value.body["message"]


def test_invalid_json_gets_400(server):
    request = urllib.request.Request(f"{server.base_url}/chat/completions", data=b'{"model": ', method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    error = json.load(caught.value)["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_concurrent_greedy_equals_sequential(client):
    def run(prompt):
        response = ask(client, prompt, max_tokens=32, logprobs=True)
        return response.choices[0].message.content, [entry.logprob for entry in response.choices[0].logprobs.content]

    sequential = [run(prompt) for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(run, PROMPTS))
    # Same text and bit-identical log-probabilities, whatever was batched alongside.
    assert concurrent == sequential


def test_flaggems_on_cpu_fails_fast():
    result = subprocess.run(embedded_argv(free_port(), "--ops", "flaggems", "--device", "cpu"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FlagGems needs a CUDA GPU" in lines[0]


@pytest.mark.slow
def test_bfloat16_concurrent_greedy_equals_sequential(tmp_path):
    """bfloat16 on CPU needs its own row multiple (2, where float32 needs 4): the probe must find it."""
    port = free_port()
    argv = embedded_argv(port, "--model", "smollm2", "--served-model-name", MODEL, "--dtype", "bfloat16",
                         "--device", "cpu", "--max-batch", "8")
    with launch_server(argv, port, tmp_path / "server.log", timeout_s=300) as handle:
        assert handle.get("/version")["batching"]["row_invariant"] is True
        client = openai.OpenAI(base_url=f"{handle.base_url}/", api_key="EMPTY", max_retries=0, timeout=120)

        def run(prompt):
            response = ask(client, prompt, max_tokens=24, logprobs=True)
            return response.choices[0].message.content, [e.logprob for e in response.choices[0].logprobs.content]

        sequential = [run(prompt) for prompt in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(run, PROMPTS)) == sequential


# --------------------------------------------------------------------------- vLLM extensions for teacher forcing


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def tokenize(server, **body) -> dict:
    status, answer = post(server, "/tokenize", body)
    assert status == 200, answer
    return answer


def test_tokenize_has_vllms_shape_and_the_chat_prompt_ids(server, client):
    messages = [{"role": "user", "content": PROMPTS[3]}]
    answer = tokenize(server, model=MODEL, messages=messages)
    assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
    assert (answer["count"], answer["max_model_len"], answer["token_strs"]) == (len(answer["tokens"]), 2048, None)
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"return_token_ids": True})
    # The exact ids the chat endpoint generated from, and the generated ones beside them.
    assert chat.model_extra["prompt_token_ids"] == answer["tokens"]
    assert len(chat.choices[0].model_extra["token_ids"]) == chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True}))
    # Streamed: each chunk carries its own token ids, the prompt ids come once.
    streamed = [token for chunk in chunks if chunk.choices
                for token in chunk.choices[0].model_extra.get("token_ids", [])]
    assert streamed == chat.choices[0].model_extra["token_ids"]
    prompt_ids = [chunk.model_extra["prompt_token_ids"] for chunk in chunks if "prompt_token_ids" in chunk.model_extra]
    assert prompt_ids == [answer["tokens"]]
    without = tokenize(server, messages=messages, add_generation_prompt=False)["tokens"]
    assert answer["tokens"][: len(without)] == without and len(answer["tokens"]) > len(without)

    text = tokenize(server, prompt="Hello world", return_token_strs=True)
    assert len(text["token_strs"]) == text["count"] == len(text["tokens"]) and text["token_strs"][-1] == "Ġworld"
    status, error = post(server, "/tokenize", {"prompt": "x", "messages": messages})
    assert status == 400 and error["error"]["param"] == "prompt"


def test_prompt_logprobs_on_a_token_id_prompt(server, client):
    text = "The capital of France is Paris."
    ids = tokenize(server, prompt=text, add_special_tokens=False)["tokens"]
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                         extra_body={"prompt_logprobs": 3, "return_token_ids": True})
    choice = response.choices[0].model_extra
    entries = choice["prompt_logprobs"]
    assert choice["prompt_token_ids"] == ids and response.usage.prompt_tokens == len(ids)
    assert len(choice["token_ids"]) == 1 and entries[0] is None and len(entries) == len(ids)
    for position, entry in enumerate(entries[1:], start=1):
        token = str(ids[position])
        assert next(iter(entry)) == token  # the prompt token first, as vLLM
        top = sorted((v["rank"], v["logprob"]) for v in entry.values() if v["rank"] <= 3)
        assert [rank for rank, _ in top] == [1, 2, 3]
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert len(entry) == (3 if entry[token]["rank"] <= 3 else 4)
        assert sum(lp >= entry[token]["logprob"] for _, lp in top) == min(entry[token]["rank"], 3)
    # decoded_token is each token's own text: after the first token ("The") they spell the rest of the prompt.
    assert "".join(entry[str(token)]["decoded_token"] for entry, token in zip(entries[1:], ids[1:])) == text[3:]

    # The same prompt sent as text scores the same tokens the same way.
    as_text = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0,
                                        extra_body={"prompt_logprobs": 3, "add_special_tokens": False})
    assert as_text.choices[0].model_extra["prompt_logprobs"] == entries


def test_chat_prompt_logprobs_sit_at_the_top_level(client):
    response = ask(client, PROMPTS[0], max_tokens=2, extra_body={"prompt_logprobs": 0})
    entries = response.model_extra["prompt_logprobs"]
    assert len(entries) == response.usage.prompt_tokens and entries[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1 for entry in entries[1:])


@pytest.mark.parametrize(
    "change, param",
    [
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_bad_token_requests_get_400(server, change, param):
    status, error = post(server, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1, **change})
    assert status == 400 and error["error"]["param"] == param and error["error"]["message"]
