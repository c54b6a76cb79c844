"""Peak RSS of the runner on a 10,000-item task with a distinct ~1 MB image per item (goal: <= 1 GB).

    .venv/bin/python benchmarks/memory_rss.py [--n 10000] [--concurrency 16] [--image-kb 1000]

Items are generated lazily (random-noise JPEGs, so no two share pixels or bytes) and sent to the stub
server, which answers at once; the runner stores each item (with its thumbnail) and record in SQLite.
The runner runs in this process; RSS is sampled from /proc every 0.2 s and checked against the kernel's
own high-water mark (ru_maxrss).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image  # noqa: E402

from flageval_lite.records import Endpoint, GenParams, Item  # noqa: E402
from flageval_lite.runner import Job, Runner  # noqa: E402
from flageval_lite.store import Store  # noqa: E402
from helpers_servers import launch_stub  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def noise_jpeg(side: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "JPEG", quality=92)
    return out.getvalue()


def side_for(target_bytes: int) -> int:
    """Noise JPEG size grows with the pixel count: scale one probe to the target."""
    probe = 400
    return int(probe * (target_bytes / len(noise_jpeg(probe))) ** 0.5)


def items(n: int, side: int) -> Iterator[Item]:
    for i in range(n):
        url = "data:image/jpeg;base64," + base64.b64encode(noise_jpeg(side)).decode("ascii")
        yield Item("mm-bench", f"img-{i}", [{"role": "user", "content": [
            {"type": "text", "text": f"Item {i}: what is in <image 1>?"},
            {"type": "image_url", "image_url": {"url": url}}]}], gold="A")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--image-kb", type=int, default=1000)
    args = p.parse_args()

    side = side_for(args.image_kb * 1000)
    image_bytes = len(noise_jpeg(side))
    peak = {"sampled_mb": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak["sampled_mb"] = max(peak["sampled_mb"], rss_mb())

    with tempfile.TemporaryDirectory() as tmp:
        with launch_stub(tmp, "--answer-mode", "fixed") as stub, Store(Path(tmp) / "results.sqlite") as store:
            baseline = rss_mb()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            runner = Runner(store, "memory", concurrency=args.concurrency, progress=False)
            job = Job(Endpoint("reference", "stub", stub.base_url, "stub"), "mm-bench", items(args.n, side),
                      GenParams(max_tokens=16), total=args.n)
            started = time.perf_counter()
            stats = asyncio.run(runner.run_jobs([job]))[("reference", "mm-bench")]
            wall = time.perf_counter() - started
            done.set()
            sampler.join()
            db_mb = sum(f.stat().st_size for f in Path(tmp).glob("results.sqlite*")) / 2 ** 20
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"items": args.n, "ok": stats.ok, "image_bytes": image_bytes, "image_px": side,
                      "concurrency": args.concurrency, "wall_s": round(wall, 1), "items_per_s": round(args.n / wall, 1),
                      "rss_baseline_mb": round(baseline, 1), "rss_peak_sampled_mb": round(peak["sampled_mb"], 1),
                      "ru_maxrss_mb": round(max_rss_mb, 1), "results_db_mb": round(db_mb, 1)}, indent=2))
    if stats.ok != args.n:
        raise SystemExit(f"only {stats.ok} of {args.n} items succeeded")


if __name__ == "__main__":
    main()
