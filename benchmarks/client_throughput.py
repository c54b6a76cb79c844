"""Client overhead: our runner vs lm-eval's `local-chat-completions` against the same no-op stub server.

    .venv/bin/python benchmarks/client_throughput.py [--n 3000] [--concurrency 64] [--repeats 3]

Each client runs in a fresh subprocess against a fresh stub (answers at once, no faults), so import
costs, CPU and the stub's `first_request_at` are clean per run.  Reported per client: requests/s over
the request phase (median of the repeats), client CPU time per request (steadier than the rate on a
shared machine) and the time from the command starting to the stub seeing its first request.  lm-eval
is driven through `LocalChatCompletion.generate_until` with `num_concurrent`; both call aiohttp
directly.  Our runner also stores every item and record in SQLite as it goes; lm-eval keeps results
in memory.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]


def child_ours(base_url: str, n: int, concurrency: int, stream: bool) -> tuple[float, float]:
    from flageval_lite.records import Endpoint, GenParams, Item
    from flageval_lite.runner import Job, Runner
    from flageval_lite.store import Store

    items = (Item("bench", str(i), messages(i), gold="") for i in range(n))
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "results.sqlite") as store:
        runner = Runner(store, "bench", concurrency=concurrency, progress=False)
        job = Job(Endpoint("reference", "stub", base_url, "stub"), "bench", items, GenParams(stream=stream, max_tokens=16))
        started, cpu = time.perf_counter(), time.process_time()
        stats = asyncio.run(runner.run_jobs([job]))[("reference", "bench")]
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert stats.ok == n, stats
    return elapsed, cpu


def child_lmeval(base_url: str, n: int, concurrency: int) -> tuple[float, float]:
    import logging

    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    logging.disable(logging.WARNING)
    model = LocalChatCompletion(base_url=f"{base_url}/chat/completions", model="stub", num_concurrent=concurrency,
                                tokenizer_backend=None, tokenized_requests=False, max_gen_toks=16)
    requests = [Instance("generate_until", {}, (JsonChatStr(json.dumps(messages(i))), {"until": [], "max_gen_toks": 16}),
                         i) for i in range(n)]
    started, cpu = time.perf_counter(), time.process_time()
    answers = model.generate_until(requests, disable_tqdm=True)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert len(answers) == n and answers[1] == messages(1)[0]["content"], answers[:2]
    return elapsed, cpu


def run_client(client: str, n: int, concurrency: int, tmp: Path) -> dict:
    from helpers_servers import launch_stub

    with launch_stub(tmp) as stub:
        command_start = time.time()
        out = subprocess.run([sys.executable, __file__, "--child", client, "--base-url", stub.base_url, "--n", str(n),
                              "--concurrency", str(concurrency)], capture_output=True, text=True, check=True)
        elapsed, cpu = json.loads(out.stdout.strip().splitlines()[-1])
        stats = stub.get("/stats")
    assert stats["total"] == n, stats["total"]
    return {"rps": n / elapsed, "cpu_ms_per_request": 1000 * cpu / n,
            "startup_s": stats["first_request_at"] - command_start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=("ours", "ours-stream", "lmeval"), help=argparse.SUPPRESS)
    p.add_argument("--base-url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        timing = (child_lmeval(args.base_url, args.n, args.concurrency) if args.child == "lmeval" else
                  child_ours(args.base_url, args.n, args.concurrency, stream=args.child == "ours-stream"))
        print(json.dumps(timing))
        return

    clients = ("ours", "lmeval", "ours-stream")
    results: dict[str, list[dict]] = {c: [] for c in clients}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternate, so background load hits every client alike
            for client in clients:
                results[client].append(run_client(client, args.n, args.concurrency, Path(tmp)))
    summary = {c: {"rps_median": statistics.median(r["rps"] for r in runs),
                   "rps_runs": [round(r["rps"], 1) for r in runs],
                   "cpu_ms_per_request_median": statistics.median(r["cpu_ms_per_request"] for r in runs),
                   "startup_s_median": statistics.median(r["startup_s"] for r in runs)}
               for c, runs in results.items()}
    ours, lmeval = summary["ours"], summary["lmeval"]
    print(json.dumps({"n": args.n, "concurrency": args.concurrency, "clients": summary,
                      "ratio_ours_vs_lmeval": ours["rps_median"] / lmeval["rps_median"],
                      "ratio_ours_vs_lmeval_by_cpu":
                          lmeval["cpu_ms_per_request_median"] / ours["cpu_ms_per_request_median"]},
                     indent=2))


if __name__ == "__main__":
    main()
