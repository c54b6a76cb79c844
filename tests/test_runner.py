"""Runner against real servers on loopback (stub subprocesses, or raw sockets for exact bytes) and real SQLite."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_stub_job
from helpers_servers import ServerPool, spawn_group

from flageval_lite.errors import UserError
from flageval_lite.records import Endpoint, GenParams, Item
from flageval_lite.runner.jobs import Job
from flageval_lite.runner.runner import Runner
from flageval_lite.runner.store import Store

RUN = "run-1"


@pytest.fixture
def pool(tmp_path):
    servers = ServerPool(tmp_path)
    yield servers
    servers.stop_all()


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "results.sqlite") as s:
        yield s


def make_items(task: str, n: int, prefix: str = "question"):
    return [Item(task, f"{task}-{i}", [{"role": "user", "content": f"{prefix} {i} about {task}"}], gold=str(i))
            for i in range(n)]


def endpoint(server, role: str = "reference") -> Endpoint:
    return Endpoint(role, f"stub-{server.port}", server.base_url, "stub")


def run_jobs(store, jobs, interleave: bool = True, **runner_kw):
    runner_kw = {"progress": False, "backoff_base_s": 0.01, **runner_kw}
    return asyncio.run(Runner(store, RUN, **runner_kw).run_jobs(jobs, interleave=interleave))


@pytest.mark.parametrize("stream", [True, False])
def test_faults_are_counted_and_never_become_answers(pool, store, stream):
    server = pool.stub("--fault-rate", "0.2", "--faults", "500,429,hang,reset,malformed,truncated",
                       "--hang-s", "30", "--seed", str(int(stream)))
    items = make_items("faulty", 150)
    stats = run_jobs(store, [Job(endpoint(server), "faulty", items, GenParams(stream=stream))],
                     concurrency=16, request_timeout_s=0.5)[("reference", "faulty")]

    served = server.get("/stats")
    assert set(served["faults"]) == {"500", "429", "hang", "reset", "malformed", "truncated"}
    records = {r.item_id: r for r in store.records(RUN)}
    assert len(records) == 150 and stats.sent == 150
    # Every request the stub saw is one of the runner's attempts, prompt by prompt.
    per_prompt = served["requests"]["/v1/chat/completions"]
    assert {r.prompt_hash: r.attempts for r in records.values()} == per_prompt
    assert stats.attempts == served["total"] == sum(r.attempts for r in records.values())
    # Faults = attempts that did not produce the stored answer.
    n_ok = sum(r.ok for r in records.values())
    assert sum(served["faults"].values()) == stats.attempts - n_ok
    assert stats.ok == n_ok and sum(stats.errors.values()) == 150 - n_ok
    for item in items:
        rec = records[item.item_id]
        if rec.ok:
            assert rec.response_text == item.messages[0]["content"] and rec.finish_reason == "stop"
        else:
            assert rec.response_text == "" and rec.error_kind and rec.attempts == 4


def test_each_fault_gets_its_error_kind(pool, tmp_path):
    expected = {"500": "http_5xx", "429": "rate_limit", "hang": "timeout", "reset": "connection",
                "malformed": "malformed", "truncated": "stream_cut", "404": "http_4xx", "wrong_model": "wrong_model",
                "empty_choices": "empty_choices"}
    for fault, kind in expected.items():
        server = pool.stub("--fail-first", "1", "--faults", fault)
        for stream in (True, False):  # distinct prompts: each one's first request fails
            with Store(tmp_path / f"{fault}-{stream}.sqlite") as store:
                job = Job(endpoint(server), "f", make_items("f", 1, prefix=f"stream={stream}"), GenParams(stream=stream))
                stats = run_jobs(store, [job], max_attempts=1, request_timeout_s=0.5)[("reference", "f")]
                [rec] = store.records(RUN)
            assert stats.errors == {kind: 1} and rec.error_kind == kind and rec.response_text == "", (fault, rec)
            assert rec.attempt_errors == [kind] and stats.failed_attempts == {kind: 1}


@pytest.mark.parametrize("stream", [True, False])
def test_wrong_model_and_empty_choices_are_retried_and_never_answers(pool, store, stream):
    server = pool.stub("--fail-first", "2", "--faults", "wrong_model,empty_choices", "--seed", "3")
    items = make_items("odd", 20, prefix=f"stream={stream}")
    stats = run_jobs(store, [Job(endpoint(server), "odd", items, GenParams(stream=stream))])[("reference", "odd")]
    served = server.get("/stats")["faults"]
    assert stats.ok == 20 and stats.attempts == 60  # two bad answers per prompt, each retried
    assert stats.failed_attempts == {"wrong_model": served["wrong_model"], "empty_choices": served["empty_choices"]}
    records = {r.item_id: r for r in store.records(RUN)}
    for item in items:
        rec = records[item.item_id]
        assert rec.response_text == item.messages[0]["content"] and len(rec.attempt_errors) == 2
        assert set(rec.attempt_errors) <= {"wrong_model", "empty_choices"}


def test_http_4xx_is_recorded_and_not_retried(pool, store):
    server = pool.stub("--fail-first", "1", "--faults", "400")
    stats = run_jobs(store, [Job(endpoint(server), "bad", make_items("bad", 10), GenParams())])[("reference", "bad")]
    assert stats.errors == {"http_4xx": 10} and stats.attempts == 10
    assert set(server.get("/stats")["requests"]["/v1/chat/completions"].values()) == {1}
    assert store.error_counts(RUN) == {("reference", "bad", "http_4xx"): 10}
    assert store.finished_keys(RUN) == set()
    assert all(r.response_text == "" and "400" in r.error for r in store.records(RUN))


def test_429_waits_for_retry_after(pool, store):
    server = pool.stub("--fail-first", "1", "--faults", "429", "--retry-after", "0.6")
    started = time.perf_counter()
    stats = run_jobs(store, [Job(endpoint(server), "busy", make_items("busy", 8), GenParams())],
                     concurrency=8, backoff_base_s=0.001)[("reference", "busy")]
    assert stats.ok == 8 and stats.attempts == 16
    assert time.perf_counter() - started >= 0.6  # jittered backoff alone would retry within 1 ms
    assert all(r.attempts == 2 for r in store.records(RUN))


def test_endpoint_gone_for_good_fails_the_run_and_a_rerun_resumes(pool, store):
    dying = pool.stub("--exit-after", "10", "--latency-ms", "5")
    items = make_items("gone", 40)
    job = Job(endpoint(dying), "gone", items, GenParams())
    with pytest.raises(UserError, match=f"reference endpoint {dying.base_url} is unreachable"):
        run_jobs(store, [job], concurrency=2, max_attempts=2)
    finished = store.finished_keys(RUN)
    assert 0 < len(finished) <= 10

    revived = pool.stub(port=dying.port)
    stats = run_jobs(store, [Job(endpoint(revived), "gone", items, GenParams())], concurrency=2)[("reference", "gone")]
    assert stats.skipped == len(finished) and stats.ok == 40 - len(finished)
    assert revived.get("/stats")["total"] == 40 - len(finished)
    assert len(store.finished_keys(RUN)) == 40 and len(list(store.records(RUN))) == 40


class RestartingSupervisor:
    """Brings a crashed stub back on the same port, as the lifecycle stage does for managed servers."""

    def __init__(self, pool: ServerPool, server, budget: int):
        self.pool, self.server, self.budget, self.restarts = pool, server, budget, 0

    def ensure_alive(self) -> None:
        if self.server.healthy():
            return
        if self.restarts == self.budget:
            raise UserError(f"server on port {self.server.port} died {self.restarts + 1} times; giving up")
        self.restarts += 1
        self.server.stop()
        self.server = self.pool.stub("--exit-after", "15", port=self.server.port)


def test_supervisor_restarts_a_dead_server(pool, store):
    server = pool.stub("--exit-after", "15")
    supervisor = RestartingSupervisor(pool, server, budget=5)
    stats = run_jobs(store, [Job(endpoint(server), "crashy", make_items("crashy", 40), GenParams())],
                     concurrency=4, supervisor_for=lambda role: supervisor)[("reference", "crashy")]
    assert stats.ok == 40 and supervisor.restarts >= 2


def test_supervisor_giving_up_ends_the_run(pool, store):
    server = pool.stub("--exit-after", "15")
    runner = Runner(store, RUN, concurrency=4, progress=False, backoff_base_s=0.01)
    runner.supervisors["reference"] = RestartingSupervisor(pool, server, budget=0)
    with pytest.raises(UserError, match="giving up"):
        asyncio.run(runner.run_jobs([Job(endpoint(server), "crashy", make_items("crashy", 40), GenParams())]))
    assert 0 < len(store.finished_keys(RUN)) <= 15


def test_two_endpoints_never_share_a_cache_entry(pool, store):
    first, second = pool.stub(), pool.stub()
    items = make_items("shared", 12)
    run_jobs(store, [Job(endpoint(first), "shared", items, GenParams())])
    keys_first = store.finished_keys(RUN)
    stats = run_jobs(store, [Job(endpoint(second), "shared", items, GenParams())])[("reference", "shared")]
    assert stats.skipped == 0 and stats.sent == 12 and second.get("/stats")["total"] == 12
    assert len(store.finished_keys(RUN) - keys_first) == 12
    # The same endpoint again: everything resumes, nothing is sent.
    again = run_jobs(store, [Job(endpoint(first), "shared", items, GenParams())])[("reference", "shared")]
    assert again.skipped == 12 and again.sent == 0 and first.get("/stats")["total"] == 12


def test_concurrency_is_bounded_per_endpoint(pool, store):
    server = pool.stub("--latency-ms", "40")
    run_jobs(store, [Job(endpoint(server), "a", make_items("a", 30), GenParams()),
                     Job(endpoint(server), "b", make_items("b", 30), GenParams())], interleave=False, concurrency=5)
    assert server.get("/stats")["max_in_flight"] == 5
    other = pool.stub("--latency-ms", "40")
    runner = Runner(store, RUN, concurrency=5, progress=False)  # a perf sweep overrides it per call
    asyncio.run(runner.run_jobs([Job(endpoint(other), "c", make_items("c", 20), GenParams())], concurrency=3))
    assert other.get("/stats")["max_in_flight"] == 3


def _start_gaps(store) -> list[float]:
    started = {(r.role, r.item_id): r.started_at for r in store.records(RUN)}
    ids = {item_id for _, item_id in started}
    return [abs(started[("reference", i)] - started[("candidate", i)]) for i in ids]


@pytest.mark.parametrize("interleave", [True, False])
def test_interleaving_keeps_roles_on_the_same_items(pool, tmp_path, interleave):
    fast, slow = pool.stub("--latency-ms", "2"), pool.stub("--latency-ms", "40")
    items = make_items("paired", 30)
    with Store(tmp_path / f"paired-{interleave}.sqlite") as store:
        run_jobs(store, [Job(endpoint(fast, "reference"), "paired", items, GenParams()),
                         Job(endpoint(slow, "candidate"), "paired", items, GenParams())],
                 interleave=interleave, concurrency=2)
        gap = statistics.median(_start_gaps(store))
    if interleave:
        assert gap < 0.05  # both roles get item i within the same dispatch step
    else:
        assert gap > 0.1  # the fast role runs ahead on its own


def test_roles_must_see_the_same_items(pool, store):
    ref, cand = pool.stub(), pool.stub()
    with pytest.raises(UserError, match="different items at position 0"):
        run_jobs(store, [Job(endpoint(ref, "reference"), "t", make_items("t", 3), GenParams()),
                         Job(endpoint(cand, "candidate"), "t", make_items("t", 3)[::-1], GenParams())])


def test_items_are_pulled_lazily(pool, store):
    server = pool.stub("--latency-ms", "20")
    pulled = []

    def generate():
        for item in make_items("lazy", 40):
            pulled.append(item.item_id)
            yield item

    class Watcher:  # records how far the iterator ran ahead of the finished requests
        ahead = 0

    async def main():
        runner = Runner(store, RUN, concurrency=4, progress=False)
        job = Job(endpoint(server), "lazy", generate(), GenParams())
        task = asyncio.create_task(runner.run_jobs([job]))
        while not task.done():
            done = sum(1 for _ in store.records(RUN))
            Watcher.ahead = max(Watcher.ahead, len(pulled) - done)
            await asyncio.sleep(0.005)
        return task.result()

    asyncio.run(main())
    assert len(pulled) == 40 and Watcher.ahead <= 4 + 1


def test_streaming_timings_reasoning_and_logprobs(pool, store):
    server = pool.stub("--reasoning", "--latency-ms", "30", "--itl-ms", "10")
    items = [Item("timed", "x", [{"role": "user", "content": "one two three four"}], gold="")]
    params = GenParams(stream=True, logprobs=True, top_logprobs=3)
    run_jobs(store, [Job(endpoint(server), "timed", items, params)])
    rec = next(store.records(RUN))
    assert rec.response_text == "one two three four" and rec.finish_reason == "stop"
    assert rec.reasoning_content.startswith("Thinking about prompt ")
    assert rec.completion_tokens == 4 and rec.prompt_tokens == 4
    assert [e["token"] for e in rec.logprobs] == ["one", " two", " three", " four"]
    assert len(rec.logprobs[0]["top_logprobs"]) == 3
    # Server: 30 ms before the first chunk, 10 ms after each (role, reasoning, 4 tokens, finish).
    assert 0.03 <= rec.ttft_s < rec.latency_s and rec.latency_s >= 0.08
    assert len(rec.itl_s) == 4 and sum(rec.itl_s) >= 0.03  # gaps after the reasoning chunk


def test_non_streaming_keeps_reasoning_and_logprobs(pool, store):
    server = pool.stub("--reasoning")
    items = [Item("plain", "x", [{"role": "user", "content": "alpha beta"}], gold="")]
    run_jobs(store, [Job(endpoint(server), "plain", items, GenParams(stream=False, logprobs=True, top_logprobs=2))])
    rec = next(store.records(RUN))
    assert rec.response_text == "alpha beta" and rec.reasoning_content and rec.ttft_s is None
    assert [e["token"] for e in rec.logprobs] == ["alpha", " beta"]


def test_quiet_mode_prints_one_line_per_task(pool, store, capsys):
    server = pool.stub()
    run_jobs(store, [Job(endpoint(server), "a", make_items("a", 3), GenParams()),
                     Job(endpoint(server), "b", make_items("b", 2), GenParams())])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("reference/a: 3 ok, 0 failed, 0 resumed")
    assert lines[1].startswith("reference/b: 2 ok")


def _child(tmp_path: Path, server, n: int, concurrency: int) -> subprocess.Popen:
    script = Path(__file__).with_name("run_stub_job.py")
    return spawn_group([sys.executable, str(script), str(tmp_path / "crash.sqlite"), server.base_url, str(n),
                        str(concurrency)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_requests(server, at_least: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.get("/stats")["total"] < at_least:
        assert time.monotonic() < deadline, "the child runner never got going"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_runner_resumes_without_repeating_finished_requests(pool, tmp_path, sig):
    n = 120
    server = pool.stub("--latency-ms", "25")
    child = _child(tmp_path, server, n, concurrency=4)
    _wait_for_requests(server, 30)
    os.killpg(child.pid, sig) if sig == signal.SIGKILL else os.kill(child.pid, sig)
    out, _ = child.communicate(timeout=30)
    if sig == signal.SIGINT:
        assert child.returncode == 130 and "interrupted" in out, out
    with Store(tmp_path / "crash.sqlite") as store:
        finished_before = {r.prompt_hash for r in store.records(run_stub_job.RUN_ID) if r.ok}
    assert 0 < len(finished_before) < n

    rerun = _child(tmp_path, server, n, concurrency=4)
    out, _ = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, out
    assert f"{len(finished_before)} resumed" in out

    counts = server.get("/stats")["requests"]["/v1/chat/completions"]
    expected = {item.prompt_hash() for item in run_stub_job.items(n)}
    assert set(counts) == expected
    assert all(counts[h] == 1 for h in finished_before)  # nothing finished was asked again
    db = sqlite3.connect(tmp_path / "crash.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM records").fetchone() == (n, n)
    assert db.execute("SELECT COUNT(*) FROM records WHERE error = ''").fetchone() == (n,)
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT item_id) FROM items").fetchone() == (n, n)
    db.close()


def test_tricky_items_resume_by_their_cache_key(pool, store, tmp_path):
    """The runner computes prompt hashes and cache keys without a second serialisation; they must equal
    Item.prompt_hash() and Record.cache_key(), or a rerun would send everything again."""
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, "PNG")
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    items = [
        Item("tricky", "ünïcode-id ✓", [{"content": "Grüße, 世界 \"quoted\" \\ back", "role": "user"}],
             gold="a"),
        Item("tricky", "two-turns", [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "look <image 1>"},
                                                                  {"type": "image_url", "image_url": {"url": image}}]}],
             gold="b"),
        Item("tricky", "emoji-\U0001F600", [{"role": "user", "content": "\U0001F600 \t tab\nnewline"}], gold="c"),
    ]
    server = pool.stub()
    params = GenParams(max_tokens=3, stop=("\n",), extra_body=(("chat_template_kwargs", {"enable_thinking": False}),))
    run_jobs(store, [Job(endpoint(server), "tricky", items, params)])
    counts = server.get("/stats")["requests"]["/v1/chat/completions"]
    assert counts == {item.prompt_hash(): 1 for item in items}
    records = list(store.records(RUN))
    assert {r.prompt_hash for r in records} == set(counts) and all(r.ok for r in records)

    again = run_jobs(store, [Job(endpoint(server), "tricky", items, params)])[("reference", "tricky")]
    assert again.skipped == 3 and again.sent == 0 and server.get("/stats")["total"] == 3


class RawServer:
    """A loopback HTTP/1.1 server whose answers the test writes byte by byte (chunked for streams).

    `answer(request_json) -> (status, headers, pieces, chunked)`; it counts connections and keeps
    every request's headers and JSON body."""

    def __init__(self, answer):
        self.answer, self.connections, self.requests = answer, 0, []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.base_url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:]) if k}
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                self.requests.append((headers, body))
                status, extra, pieces, chunked = self.answer(body)
                framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {sum(map(len, pieces))}"
                writer.write(f"HTTP/1.1 {status} X\r\n{framing}\r\n{extra}\r\n".encode())
                for piece in pieces:  # separate writes with pauses: the client sees lines cut anywhere
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)
                if chunked:
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()  # the client went away (or the loop is ending): nothing left to answer


def _sse(*events: bytes, cut_every: int = 7) -> list[bytes]:
    """SSE bytes in CRLF form with a comment and an event field, cut into pieces of `cut_every` bytes."""
    raw = b": keep-alive\r\n\r\n" + b"".join(b"event: message\r\n" + event + b"\r\n\r\n" for event in events)
    return [raw[i:i + cut_every] for i in range(0, len(raw), cut_every)]


def _chunk(delta: dict, finish=None) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode()


def test_sse_parsing_by_hand_and_keep_alive(store):
    events = [_chunk({"role": "assistant", "content": ""}), _chunk({"reasoning": "think"}),
              _chunk({"content": "multi"}).replace(b'"multi"', b'\r\ndata: "multi"'),  # one event, two data lines
              _chunk({"content": " line"}), _chunk({}, "stop"),
              b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}', b"data: [DONE]"]

    def answer(request):
        if request.get("stream"):
            return 200, "Content-Type: text/event-stream\r\n", _sse(*events), True
        whole = {"choices": [{"message": {"content": "whole"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
        return 200, "Content-Type: application/json\r\n", [json.dumps(whole).encode()], False

    async def main():
        async with RawServer(answer) as server:
            ep = Endpoint("reference", "raw", server.base_url, "raw-model", api_key="secret")
            params = GenParams(max_tokens=5, stop=("END",), extra_body=(("chat_template_kwargs", {"x": 1}),))
            runner = Runner(store, RUN, concurrency=2, progress=False)
            stats = await runner.run_jobs([Job(ep, "s", make_items("s", 10), params),
                                           Job(ep, "w", make_items("w", 10), GenParams(stream=False))])
            return server, stats

    server, stats = asyncio.run(main())
    assert stats[("reference", "s")].ok == 10 and stats[("reference", "w")].ok == 10
    # Answers read to their end keep their connection: at most 2 (the concurrency) for the streams, which go
    # through our own client, and 2 for the whole answers, which go through aiohttp.
    assert server.connections <= 4
    headers, body = server.requests[0]
    assert headers["authorization"] == "Bearer secret" and headers["content-type"] == "application/json"
    assert body == {"model": "raw-model", "messages": make_items("s", 1)[0].messages, "temperature": 0.0,
                    "max_tokens": 5, "seed": 0, "stop": ["END"], "chat_template_kwargs": {"x": 1}, "stream": True,
                    "stream_options": {"include_usage": True}}
    streamed = next(store.records(RUN, task="s"))
    assert streamed.response_text == "multi line" and streamed.reasoning_content == "think"
    assert streamed.finish_reason == "stop" and (streamed.prompt_tokens, streamed.completion_tokens) == (7, 2)
    assert 0 < streamed.ttft_s < streamed.latency_s and len(streamed.itl_s) == 2
    assert next(store.records(RUN, task="w")).response_text == "whole"


def test_error_event_inside_a_200_stream_is_a_server_error(store):
    errors = {"e-0": b'data: {"error": {"message": "engine died", "code": 500}}',  # the two forms vLLM uses
              "e-1": b'data: {"object": "error", "message": "engine died", "code": 500}'}

    def answer(request):
        item_id = "e-" + request["messages"][0]["content"].split()[1]
        return 200, "Content-Type: text/event-stream\r\n", _sse(_chunk({"content": "partial"}), errors[item_id]), True

    async def main():
        async with RawServer(answer) as server:
            job = Job(Endpoint("reference", "raw", server.base_url, "m"), "e", make_items("e", 2), GenParams())
            return await Runner(store, RUN, max_attempts=2, backoff_base_s=0.001, progress=False).run_jobs([job])

    stats = asyncio.run(main())[("reference", "e")]
    assert stats.errors == {"http_5xx": 2} and stats.attempts == 4
    assert all("engine died" in r.error and r.response_text == "" for r in store.records(RUN))


def test_nothing_is_reported_done_before_it_is_committed(pool, store):
    """Writes are grouped into one transaction per event-loop turn; a request slot (and so the next item)
    must only be handed on once its record is committed, as another connection sees it."""
    server = pool.stub("--latency-ms", "2")
    reader = sqlite3.connect(store.path)
    concurrency, behind = 4, []

    def generate():
        for n, item in enumerate(make_items("durable", 200)):
            committed = reader.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            behind.append(n - committed)  # pulled so far minus committed: at most the slots in use
            yield item

    stats = run_jobs(store, [Job(endpoint(server), "durable", generate(), GenParams())], concurrency=concurrency)
    assert max(behind) <= concurrency and stats[("reference", "durable")].ok == 200
    assert reader.execute("SELECT COUNT(*) FROM records WHERE error = ''").fetchone()[0] == 200
    reader.close()


def test_odd_bodies_are_classified_and_never_end_the_run(store):
    whole = {"o-0": {"choices": "x"}, "o-1": {"choices": [{"message": {"content": 5}}]}, "o-2": {"choices": [5]},
             "o-3": {"choices": []}, "o-4": {"model": "other", "choices": [{"message": {"content": "hi"}}]},
             "o-5": [1, 2], "o-6": {"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}],
                                    "usage": [1]}}
    streams = {"o-7": [_chunk({"content": 5}, "stop")], "o-8": [b'data: {"choices": []}'],
               "o-9": [b'data: {"model": "other", "choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}']}
    expected = {"o-0": "malformed", "o-1": "malformed", "o-2": "malformed", "o-3": "empty_choices",
                "o-4": "wrong_model", "o-5": "malformed", "o-6": "", "o-7": "malformed", "o-8": "empty_choices",
                "o-9": "wrong_model"}

    def answer(request):
        item_id = "o-" + request["messages"][0]["content"].split()[1]
        if item_id in streams:
            return 200, "Content-Type: text/event-stream\r\n", _sse(*streams[item_id], b"data: [DONE]"), True
        return 200, "Content-Type: application/json\r\n", [json.dumps(whole[item_id]).encode()], False

    async def main():
        async with RawServer(answer) as server:
            ep = Endpoint("reference", "raw", server.base_url, "m")
            items = make_items("o", 10)
            runner = Runner(store, RUN, max_attempts=2, backoff_base_s=0.001, progress=False)
            return await runner.run_jobs([Job(ep, "o", items[:7], GenParams(stream=False)),
                                          Job(ep, "o2", [Item("o2", i.item_id, i.messages, i.gold) for i in items[7:]],
                                              GenParams())])

    asyncio.run(main())
    kinds = {r.item_id: r.error_kind for r in store.records(RUN)}
    assert kinds == expected
    for r in store.records(RUN):
        assert r.attempt_errors == ([r.error_kind] * 2 if r.error_kind else [])
    assert next(r for r in store.records(RUN) if r.item_id == "o-6").response_text == "fine"
