"""lm-eval's `local-chat-completions` client (a real third-party harness) against the embedded server."""
from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest

from helpers_servers import free_port, launch_server

TASK_DIR = Path(__file__).parent / "fixtures" / "lmeval_task"
MODEL = "smollm2-lmeval"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    argv = [sys.executable, "-m", "flageval_lite.servers.embedded", "--port", str(port), "--model", "smollm2",
            "--served-model-name", MODEL, "--device", "cpu", "--dtype", "float32"]
    with launch_server(argv, port, tmp_path_factory.mktemp("embedded") / "server.log", timeout_s=300) as handle:
        yield handle


def test_lm_eval_generate_until_task(server, monkeypatch, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to its folder
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        # No tokenizer_backend: the requests are chat messages, so lm-eval needs no tokenizer (and no hub access).
        model_args=f"model={MODEL},base_url={server.base_url}/chat/completions,num_concurrent=4,"
                   "tokenized_requests=False,max_retries=1",
        tasks=["flageval_tiny_qa"],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        apply_chat_template=True,
        log_samples=True,
        limit=6,
    )
    samples = results["samples"]["flageval_tiny_qa"]
    assert len(samples) == 6
    score = results["results"]["flageval_tiny_qa"]["exact_match,none"]
    assert 0.0 <= score <= 1.0
    # Each response is what the server answers to the same messages and parameters directly.
    client = openai.OpenAI(base_url=f"{server.base_url}/", api_key="EMPTY", max_retries=0)
    for sample in samples:
        (response,) = sample["resps"][0]
        assert isinstance(response, str)
        question = f"Answer with a single word.\nQuestion: {sample['doc']['question']}\nAnswer:"
        direct = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16, stop=["\n"],
        ).choices[0].message.content
        assert response == direct
    assert sum(sample["exact_match"] for sample in samples) == pytest.approx(score * 6)
