"""Peak RSS of a real `flageval-lite run` of an image task read from a VLMEvalKit TSV (goal: <= 1 GB at 10,000 items).

    .venv/bin/python benchmarks/memory_rss.py [--n 10000] [--image-px 160] [--concurrency 16] [--refs 0.1]

Writes `MMMU_DEV_VAL.tsv` into a temp dir: N validation rows of the `mmmu_tsv` task, each with its own random-noise
JPEG (base64; no two share bytes) and multiple-choice options, a share `--refs` of them reusing an earlier row's
image by its `index` as VLMEvalKit does.  Then runs the CLI as users do (`python -m flageval_lite.cli run --tasks
mmmu_tsv --data-dir TMP --reference stub --candidate stub --quiet`): both stub servers, the loader, the runner, the
store, scoring and the report.  RSS is sampled from /proc every 0.2 s for the harness process and, separately, for
its children (the stub servers); the kernel's high-water mark of the harness (`wait4` ru_maxrss, the largest of the
harness and its reaped children) checks the sampled peak.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def noise_jpeg_b64(side: int, rng: random.Random) -> str:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(out, "JPEG", quality=90)
    return base64.b64encode(out.getvalue()).decode("ascii")


def write_tsv(path: Path, n: int, side: int, refs: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    own: list[int] = []  # rows holding their own image: VLMEvalKit's references point at one of those
    with path.open("w", encoding="utf-8") as out:
        out.write("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tsplit\timage\n")
        for i in range(1, n + 1):
            if own and rng.random() < refs:
                image = str(rng.choice(own))
            else:
                image = noise_jpeg_b64(side, rng)
                own.append(i)
            answer = "ABCD"[rng.randrange(4)]
            out.write(f"{i}\t<image 1> Item {i}: which option fits?\tred\tgreen\tblue\tgrey\t{answer}\t"
                      f"Subject_{i % 30}\tvalidation\t{image}\n")


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def children(pid: int) -> list[int]:
    """Descendants of `pid`, whichever of its threads started them (the harness spawns servers from a thread)."""
    direct = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            direct += [int(p) for p in listing.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return direct + [grand for child in direct for grand in children(child)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--image-px", type=int, default=160, help="side of each square noise image")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--refs", type=float, default=0.1, help="share of rows that reuse an earlier row's image")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "MMMU_DEV_VAL.tsv"
        write_tsv(tsv, args.n, args.image_px, args.refs)
        config = Path(tmp) / "run.yaml"
        config.write_text(f"concurrency: {args.concurrency}\n")
        command = [sys.executable, "-m", "flageval_lite.cli", "run", "--config", str(config), "--tasks", "mmmu_tsv",
                   "--data-dir", tmp, "--reference", "stub", "--candidate", "stub", "--run-id", "memory",
                   "--runs-dir", f"{tmp}/runs", "--reports-dir", f"{tmp}/reports", "--quiet"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        peak = {"harness_mb": 0.0, "children_mb": 0.0, "children_max_one_mb": 0.0}
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak["harness_mb"] = max(peak["harness_mb"], rss_mb(proc.pid))
                each = [rss_mb(c) for c in children(proc.pid)]
                peak["children_mb"] = max(peak["children_mb"], sum(each))
                peak["children_max_one_mb"] = max([peak["children_max_one_mb"], *each])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output = proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        db_mb = sum(f.stat().st_size for f in (Path(tmp) / "runs/memory").glob("results.sqlite*")) / 2 ** 20
        tsv_mb = tsv.stat().st_size / 2 ** 20
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):  # 1: the gate's verdict, not a failure of the run
        raise SystemExit(f"run failed (exit {code}):\n{output[-3000:]}")
    print(json.dumps({"items": args.n, "image_px": args.image_px, "tsv_mb": round(tsv_mb, 1),
                      "concurrency": args.concurrency, "wall_s": round(wall, 1),
                      "harness_peak_rss_sampled_mb": round(peak["harness_mb"], 1),
                      "harness_tree_ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
                      "children_peak_rss_sum_mb": round(peak["children_mb"], 1),
                      "children_peak_rss_one_mb": round(peak["children_max_one_mb"], 1),
                      "results_db_mb": round(db_mb, 1), "command": " ".join(command[1:])}, indent=2))
    print(output.strip().splitlines()[-1] if output.strip() else "")


if __name__ == "__main__":
    main()
