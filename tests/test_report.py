"""report.py: the Markdown table in card order, an HTML file with no network reference, summary.json round trip."""
from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from flageval_lite.analysis.comparison import Comparison, compare_run
from flageval_lite.records import FlagGemsSpec, Score, ServerEvidence, ServeSpec
from flageval_lite.report.render import render_report, summary_dict

TITLES = ["MMMU (val)", "GPQA Diamond", "CII-Bench | zh", "LiveBench"]
HOSTILE = '<script>alert("pwn")</script> & <img src="https://example.com/x.png"> \'quoted\' </div>'


def thumbnail() -> str:
    image = Image.new("RGB", (96, 64))
    image.putdata([(x * 2, y * 4, 160) for y in range(64) for x in range(96)])
    out = io.BytesIO()
    image.save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _scores(task, n, lost=0, gained=0, graded=False, groups=("",)):
    ref, cand = [], []
    for i in range(n):
        value = (i % 4) / 3 if graded else float(i % 2 == 0)
        group = groups[i % len(groups)]
        ref.append(Score(role="reference", task=task, item_id=f"{task}-{i}", value=value,
                         outcome="correct" if value == 1 else "wrong" if value == 0 else "partial",
                         extracted="A" if value == 1 else "B", gold="A", response_text=f"The answer is {i}.",
                         finish_reason="stop", completion_tokens=7, group=group))
        cand.append(Score(**{**ref[-1].to_dict(), "role": "candidate"}))
    right = [s for s in cand if s.value == 1]
    wrong = [s for s in cand if s.value == 0]
    for s in right[:lost]:
        s.value, s.outcome, s.extracted, s.response_text = 0.0, "wrong", "C", s.response_text + " Actually C."
    for s in wrong[:gained]:
        s.value, s.outcome, s.extracted = 1.0, "correct", "A"
    return ref, cand


def synthetic_inputs() -> tuple[Comparison, dict]:
    """Four tasks in card order, one regression (GPQA), perf at two loads, evidence, an A/A floor."""
    specs = [("mmmu", 300, 2, 1, False, ("",)), ("gpqa", 198, 30, 0, False, ("",)),
             ("cii", 120, 1, 1, False, ("art", "life")),
             ("livebench", 90, 2, 0, True, ("math/amps", "math/comp", "reasoning/zebra"))]
    tasks, aa_tasks = [], []
    for (name, n, lost, gained, graded, groups), title in zip(specs, TITLES):
        ref, cand = _scores(name, n, lost, gained, graded, groups)
        items = {s.item_id: {"prompt_text": f"Question {s.item_id}: pick A, B or C.", "images": []} for s in ref}
        if name == "gpqa":
            first_flip = next(s for s in cand if s.outcome == "wrong" and s.extracted == "C")
            first_flip.response_text = HOSTILE
            items[first_flip.item_id]["images"] = [thumbnail()]
        metric = "livebench" if name == "livebench" else "accuracy"
        tasks.append({"task": name, "title": title, "metric": metric, "reference": ref, "candidate": cand,
                      "items": items})
        aa_ref, aa_cand = _scores(name, n, 1 if name == "mmmu" else 0, 0, graded, groups)
        aa_tasks.append({"task": name, "title": title, "metric": metric, "reference": aa_ref, "candidate": aa_cand})

    def samples(e2el, tokens=64):
        return [{"started_at": 0.05 * i, "latency_s": e2el + 0.01 * (i % 5), "ttft_s": 0.08,
                 "itl_s": [(e2el - 0.08) / (tokens - 1)] * (tokens - 1), "completion_tokens": tokens, "error": ""}
                for i in range(32)]

    perf = {"reference": {"perf@c1": samples(0.9), "perf@c8": samples(1.2)},
            "candidate": {"perf@c1": samples(1.0), "perf@c8": samples(1.7)}}
    comparison = compare_run(tasks, margin=1.0, release_gate=5.0, perf=perf,
                             noise_floor=compare_run(aa_tasks, margin=1.0, release_gate=5.0))
    reference = ServeSpec(name="native-cuda", engine="vllm", model="Qwen/Qwen3-Omni-30B-A3B-Instruct",
                          dtype="bfloat16", device="cuda", ops="aten")
    candidate = ServeSpec(name="flaggems", engine="vllm", model="Qwen/Qwen3-Omni-30B-A3B-Instruct",
                          dtype="bfloat16", device="cuda", ops="flaggems", flaggems=FlagGemsSpec(route="plugin"))
    evidence = {
        "reference": ServerEvidence(role="reference", spec=reference.to_dict(), command=["vllm", "serve", "Qwen"],
                                    version={"version": "0.11.0"}, models=["qwen3-omni"],
                                    packages={"vllm": "0.11.0", "torch": "2.8.0"}, gpu="NVIDIA H200"),
        "candidate": ServerEvidence(role="candidate", spec=candidate.to_dict(), command=["vllm", "serve", "Qwen"],
                                    env_switches={"USE_FLAGGEMS": "1"}, version={"version": "0.11.0"},
                                    models=["qwen3-omni"], gpu="NVIDIA H200",
                                    packages={"vllm": "0.11.0", "torch": "2.8.0", "flag_gems": "5.0.2"},
                                    ops_registered=["aten::mm", "aten::addmm", "aten::softmax", "aten::rms_norm"],
                                    ops_called=["aten::mm", "aten::softmax"]),
    }
    manifest = {
        "run_id": "demo-20260101-120000",
        "config": {"suite": "qwen3-omni", "limit": 300, "started": "2026-01-01T12:00:00", "margin": 1.0,
                   "release_gate": 5.0},
        "specs": {"reference": reference.to_dict(), "candidate": candidate.to_dict()},
        "servers": {role: ev.to_dict() for role, ev in evidence.items()},
        "errors": {"candidate/gpqa/timeout": 1},
    }
    return comparison, manifest


def _md_table(markdown: str, heading: str) -> list[str]:
    block = markdown.split(f"### {heading}\n", 1)[1].strip().split("\n\n", 1)[0]
    return block.splitlines()


def test_markdown_table_columns_and_card_order(tmp_path):
    comparison, manifest = synthetic_inputs()
    paths = render_report(comparison, manifest, tmp_path)
    assert set(paths) == {"md", "html", "json"} and all(p.is_file() for p in paths.values())
    md = paths["md"].read_text()

    lines = _md_table(md, "Scores")
    assert lines[0] == ("| Metrics | native-cuda | flaggems | Δ | 95 % CI of Δ | p (Holm) | flips (−/+) | verdict "
                        "| decided by |")
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines[2:]]
    assert [r[0].strip().replace("\\|", "|") for r in rows] == TITLES
    gpqa = dict(zip(["title", "ref", "cand", "delta", "ci", "p", "flips", "verdict", "rule"],
                    [c.strip() for c in rows[1]]))
    assert re.fullmatch(r"50\.00 \[\d+\.\d\d, \d+\.\d\d\]", gpqa["ref"])
    assert gpqa["delta"] == "-15.15" and gpqa["flips"] == "30/0" and gpqa["verdict"] == "regression"
    assert gpqa["p"] == "<0.001" and gpqa["rule"] == "non-inferiority −5"

    for fact in ("vllm", "Qwen/Qwen3-Omni-30B-A3B-Instruct", "bfloat16", "flaggems", "NVIDIA H200", "0.11.0",
                 "flag_gems 5.0.2", "USE_FLAGGEMS=1", "demo-20260101-120000", "2026-01-01T12:00:00",
                 "qwen3-omni", "first 300", "equivalence ±1 points", "non-inferiority −5 points"):
        assert fact in md, fact
    assert "| FlagGems ops registered / called | 0 / 0 | 4 / 2 |" in md
    assert _md_table(md, "Performance, concurrency 1")[0] == \
        "| metric | native-cuda | flaggems | candidate / reference | gate |"
    assert _md_table(md, "Noise floor: A/B beside A/A")[2].startswith("| MMMU (val) |")
    assert "candidate/gpqa/timeout ×1" in md
    assert md.rstrip().endswith("exit code 1 (0 consistent, 1 regression, 3 inconclusive, 4 incomplete)")
    plan_rows = _md_table(md, "What this run certifies, and what it would take")[2:]
    assert len(plan_rows) == len(TITLES) and "non-inferiority −5:" in plan_rows[0]


def test_html_is_self_contained_and_escapes_model_text(tmp_path):
    comparison, manifest = synthetic_inputs()
    html = render_report(comparison, manifest, tmp_path)["html"].read_text()

    resource = re.compile(r"""(?:src|href|action|srcset|xlink:href)\s*=\s*["']?\s*(?!data:|#)[a-z]+:|"""
                          r"""(?:src|href)\s*=\s*["']?\s*//|url\(|@import""", re.I)
    assert not resource.findall(html)
    assert "http://" not in html.replace("https://example.com/x.png", "") and "<script" not in html
    escaped = ("&lt;script&gt;alert(&#34;pwn&#34;)&lt;/script&gt; &amp; "
               "&lt;img src=&#34;https://example.com/x.png&#34;&gt;")
    assert escaped in html
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{100,}" alt="image 1 of item gpqa-', html)
    assert "default-src 'none'" in html
    assert html.count("<svg") == 4  # forest, flips, one perf chart per load
    assert "release gate −5" in html  # the gate line is drawn: GPQA's CI reaches past it
    assert "aten::rms_norm" in html and "4 ops registered, 2 called" in html
    for title in TITLES:
        assert title in html


def test_summary_json_round_trips(tmp_path):
    comparison, manifest = synthetic_inputs()
    paths = render_report(comparison, manifest, tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert summary == json.loads(json.dumps(summary_dict(comparison, manifest), default=str))
    assert (summary["verdict"], summary["exit_code"]) == ("regression", 1)
    assert summary["manifest"]["run_id"] == "demo-20260101-120000"
    assert [t["title"] for t in summary["comparison"]["tasks"]] == TITLES

    restored = Comparison.from_dict(summary["comparison"])
    assert restored.to_dict() == summary["comparison"]
    again = render_report(restored, summary["manifest"], tmp_path / "again")
    assert again["md"].read_text() == paths["md"].read_text()
    assert again["html"].read_text() == paths["html"].read_text()


def test_hardware_of_each_side_is_stated_and_a_difference_is_flagged(tmp_path):
    comparison, manifest = synthetic_inputs()
    same = render_report(comparison, manifest, tmp_path / "same")["md"].read_text()
    assert "Hardware differs" not in same
    assert "| parallelism | TP 1 × PP 1 | TP 1 × PP 1 |" in same
    assert "Hardware: native-cuda on NVIDIA H200, TP 1 × PP 1; flaggems on NVIDIA H200, TP 1 × PP 1." in same

    manifest["servers"]["candidate"]["gpu"] = "NVIDIA H100 80GB HBM3 (driver 570.86)"
    for role, gpus in (("reference", "0"), ("candidate", "1")):
        manifest["specs"][role]["cuda_visible_devices"] = gpus
    paths = render_report(comparison, manifest, tmp_path / "differs")
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert ("> **Hardware differs:** The two sides ran on different hardware (reference: NVIDIA H200; candidate: "
            "NVIDIA H100 80GB HBM3 (driver 570.86)): score and performance differences may come from the hardware, "
            "not from the operators.") in md
    assert "| parallelism | TP 1 × PP 1 on GPU 0 | TP 1 × PP 1 on GPU 1 |" in md
    assert 'id="hardware"' in html and "NVIDIA H100 80GB HBM3" in html
    assert json.loads(paths["json"].read_text())["hardware_warnings"][0].startswith("The two sides ran on different")

    manifest["servers"]["candidate"]["gpu"] = "NVIDIA H200"
    manifest["specs"]["candidate"]["tensor_parallel_size"] = 2
    md = render_report(comparison, manifest, tmp_path / "boards")["md"].read_text()
    assert "different parallelism (TP 1 × PP 1 on GPU 0 vs TP 2 × PP 1 on GPU 1)" in md
    assert "different GPUs of the same model (reference 0, candidate 1)" in md


def test_divergence_headline_says_whether_outputs_differ_beyond_the_noise_floor(tmp_path):
    comparison, manifest = synthetic_inputs()
    md = render_report(comparison, manifest, tmp_path / "a")["md"].read_text()
    headline = next(line for line in md.splitlines() if line.startswith("**Output divergence beyond the noise floor:**"))
    tested = [t for t in comparison.tasks if t.noise_test]
    assert tested and f"of {len(tested)} tasks" in headline
    assert _md_table(md, "Noise floor: A/B beside A/A")[0].endswith("| outputs beyond A/A |")
    comparison.noise_floor = None
    paths = render_report(comparison, manifest, tmp_path / "b")
    assert "**Output divergence beyond the noise floor:** not tested: without the A/A noise floor" in \
        paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["divergence_beyond_noise"]["status"] == "not tested"
    assert 'id="divergence-headline"' in paths["html"].read_text()


def test_replicas_are_stated_and_a_given_up_replica_is_a_fact(tmp_path):
    comparison, manifest = synthetic_inputs()
    manifest["replicas"] = {"reference": [manifest["servers"]["reference"]] * 2,
                            "candidate": [manifest["servers"]["candidate"]]}
    manifest["replica_failures"] = [{"role": "reference", "replica": 1, "base_url": "http://127.0.0.1:9001/v1",
                                     "error": "connection refused after 2 restarts"}]
    md = render_report(comparison, manifest, tmp_path)["md"].read_text()
    assert "| parallelism | TP 1 × PP 1, 2 replicas | TP 1 × PP 1 |" in md
    assert "Hardware differs" not in md  # replica counts are not hardware
    assert ("- replica given up: reference replica 1 (http://127.0.0.1:9001/v1): connection refused after 2 "
            "restarts") in md


def test_a_macro_row_shows_micro_beside_it_in_its_group_table(tmp_path):
    ref, cand = _scores("blink", 30, lost=3, groups=("Art_Style", "Counting", "IQ_Test", "IQ_Test"))
    comparison = compare_run([{"task": "blink", "title": "Blink", "metric": "macro", "reference": ref,
                               "candidate": cand}], margin=1.0, release_gate=5.0)
    [row] = comparison.tasks
    md = render_report(comparison, {"run_id": "r", "config": {}}, tmp_path)["md"].read_text()
    micro = "Micro (mean over all 30 items): 50.00 vs 40.00, Δ -10.00."  # 15/30 vs 12/30: three right items lost
    assert "Headline: macro average, the mean of these 3 group scores." in md and micro in md
    assert row.candidate_score == pytest.approx((75 + 0 + 100 * 6 / 14) / 3)  # macro, not the micro 40
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["comparison"]["tasks"][0]["micro"] == pytest.approx(row.micro)


def test_a_livebench_row_with_an_unscored_task_says_it_is_not_the_official_average(tmp_path):
    ref, cand = _scores("livebench", 12, groups=("coding/code_generation", "math/AMPS_Hard", "coding/agentic_coding"))
    for side in (ref, cand):
        for s in side:
            if s.group == "coding/agentic_coding":  # refused by the scorer: an error of that item on both sides
                s.value, s.outcome, s.error = 0.0, "error", "bad_item: livebench scorer: task agentic_coding needs ..."
    comparison = compare_run([{"task": "livebench", "title": "LiveBench", "metric": "livebench", "reference": ref,
                               "candidate": cand}], margin=1.0, release_gate=5.0)
    md = render_report(comparison, {"run_id": "r", "config": {}}, tmp_path)["md"].read_text()
    assert "Not LiveBench's official average: coding/agentic_coding went unscored" in md
    assert "LiveBench: headline without coding/agentic_coding" in md  # among the run's warnings too
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["comparison"]["tasks"][0]["unscored_groups"] == ["coding/agentic_coding"]


def test_a_server_that_is_not_row_invariant_is_flagged(tmp_path):
    """The warning a server's /version carries (here a real stub reporting the embedded server's batching block)
    goes through the lifecycle's evidence into report.md, report.html and summary.json."""
    from flageval_lite.serving.lifecycle import ManagedServer

    comparison, manifest = synthetic_inputs()
    assert "Server warning" not in render_report(comparison, manifest, tmp_path / "clean")["md"].read_text()
    spec = ServeSpec(name="batched-stub", engine="stub", args=("--row-variant-batching", "8"), warmup=False)
    with ManagedServer(spec, "candidate", tmp_path / "run") as server:
        evidence = server.evidence
    assert evidence.version["batching"] == {"mode": "packed", "max_batch": 8, "row_multiple": 1,
                                            "row_invariant": False}
    (warning,) = evidence.version["warnings"]
    manifest["servers"]["candidate"] = evidence.to_dict()
    paths = render_report(comparison, manifest, tmp_path / "flagged")
    md, html = paths["md"].read_text(), paths["html"].read_text()
    line = (f"The candidate server (flaggems) warned: {warning}. Differences between the sides may come from "
            "batching rather than from the operators.")
    assert f"> **Server warning:** {line}" in md
    assert "| batching | — | packed, up to 8 rows, padded to 1, NOT row-invariant |" in md
    assert 'id="server-warnings"' in html and "NOT row-invariant" in html
    assert json.loads(paths["json"].read_text())["server_warnings"] == [line]


def test_a_disagreeing_audio_item_plays_its_clip_in_the_html(tmp_path):
    """The drill-down of an item that flipped carries its audio as a data: URL player, allowed by the page's CSP."""
    clip = "data:audio/wav;base64,UklGRiQAAABXQVZF"
    ref, cand = _scores("asr", 40, lost=1)
    flipped = next(s.item_id for s in cand if s.extracted == "C")
    items = {s.item_id: {"prompt_text": "Transcribe.", "images": [clip] if s.item_id == flipped else []} for s in ref}
    comparison = compare_run([{"task": "asr", "title": "Audio task", "reference": ref, "candidate": cand,
                               "items": items}])
    html = render_report(comparison, synthetic_inputs()[1], tmp_path)["html"].read_text()
    assert "media-src data:" in html
    assert f'<audio controls preload="none" src="{clip}" aria-label="audio 1 of item {flipped}">' in html

