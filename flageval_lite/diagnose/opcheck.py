"""`flageval-lite ops RUN`: replay the operators the candidate ran, FlagGems' kernels and PyTorch's own, each
against a float64 reference, and judge them by FlagGems' own accuracy tolerances.

Where the calls come from (first that exists):
1. `runs/RUN/oplogs/candidate/calls-*.jsonl` written with FLAGEVAL_RECORD_SHAPES=1 (`serving/flaggems.py`):
   the exact argument shapes, strides, dtypes and values the model used;
2. the same files without shapes (names only, the default), or the names in the candidate's evidence
   (`ops_called`, parsed from FlagGems' own op log): shapes are derived from the model's config (hidden size,
   intermediate size, vocabulary, heads, head dim) at a few token counts, by each operator's recipe.

Each call is built once (seeded random inputs on the device), then run three ways: on float64 copies of the inputs
(the reference, PyTorch on the same device), natively, and with FlagGems' implementation of that one operator
switched on (`serving/flaggems.py` `scoped([op])`, i.e. `flag_gems.use_gems(include=[op])`). The verdict follows FlagGems'
`gems_assert_close`: the reference is cast to the result's dtype and every element must satisfy
|result − ref| ≤ atol × K + rtol × |ref|, with rtol 0.016 (bf16), 1e-3 (fp16), 1.3e-6 (fp32), atol 1e-4 and K the
reduction length (the inner dimension of a matmul, the reduced size of a sum or mean, else 1).

An operator without a recipe, or whose recorded arguments cannot be rebuilt, is listed as "not replayed": nothing
is dropped silently.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import UserError
from ..serving.flaggems import ENV_PERTURB_OP, ENV_PERTURB_SCALE, perturbation_from_env, read_calls
from .op_calls import OpCall, OpError
from .op_recipes import DEFAULT_TOKENS, ModelDims, derived_calls
from .op_replay import RTOL, CandidateScope, check_ops, require_gpu

# --------------------------------------------------------------------------- the command


def model_dims(spec: dict[str, Any], tokens: Sequence[int] = DEFAULT_TOKENS) -> tuple[ModelDims, str]:
    """Sizes for derived shapes from the candidate's model config, or generic ones; second value says which."""
    model = str(spec.get("model") or "")
    config: dict[str, Any] = {}
    path = Path(model).expanduser() / "config.json" if model else None
    if path is not None and path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
    for nested in ("thinker_config", "text_config"):  # multimodal models keep the language model's sizes inside
        inner = config.get(nested)
        if isinstance(inner, dict):
            config = inner.get("text_config", inner) if nested == "thinker_config" else inner
    if not config.get("hidden_size"):
        return ModelDims(tokens=tuple(tokens)), "generic sizes (no model config.json found)"
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 16)
    dims = ModelDims(hidden=hidden, intermediate=int(config.get("intermediate_size") or 4 * hidden),
                     vocab=int(config.get("vocab_size") or 32000), heads=heads,
                     head_dim=int(config.get("head_dim") or hidden // heads), tokens=tuple(tokens))
    return dims, f"{path}"


def collect_calls(run_dir: Path, servers: dict[str, Any], spec: dict[str, Any]) -> tuple[list[OpCall], str]:
    """The candidate's operator calls: recorded ones where there are, derived ones for the rest."""
    entries = read_calls(Path(run_dir) / "oplogs" / "candidate")
    names: dict[tuple[str, str], None] = {}
    recorded: list[OpCall] = []
    for entry in entries:
        key = (entry["op"], str(entry.get("aten") or ""))
        names.setdefault(key)
        if "args" in entry:
            recorded.append(OpCall(key[0], key[1], list(entry["args"]), dict(entry.get("kwargs") or {})))
    if entries:
        source = "calls log with shapes" if recorded else "calls log (names only)"
    else:
        names = {(op, ""): None for op in (servers.get("candidate") or {}).get("ops_called") or ()}
        source = "FlagGems op log (names only)"
    dtype = str(spec.get("dtype") or "auto")
    dtype = "bfloat16" if dtype == "auto" else dtype
    dims, dims_source = model_dims(spec)
    with_shapes = {(c.op, c.aten) for c in recorded}
    calls = list(recorded)
    for op, aten in names:
        if (op, aten) not in with_shapes:
            calls += derived_calls(op, aten, dims, dtype)
    if len(with_shapes) < len(names):
        source += f"; other shapes from {dims_source}"
    return calls, source


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def render_markdown(run_id: str, rows: Sequence[OpError], facts: dict[str, str]) -> str:
    failed = sorted({r.op for r in rows if r.status == "FAIL"})
    skipped = sorted({r.op for r in rows if r.status in ("not replayed", "error")})
    lines = [f"# Operator check: {run_id}", ""]
    lines += [f"- {name}: {value}" for name, value in facts.items()]
    lines += [f"- outside FlagGems' tolerance: {', '.join(failed) or 'none'}",
              f"- not replayed or failed to run: {', '.join(skipped) or 'none'}", "",
              "Errors are against a float64 reference computed by PyTorch on the same device. Relative error = "
              "|x − ref| / max(|ref|, atol·K); \"/ tol\" = worst |x − ref| over FlagGems' allowed "
              "atol·K + rtol·|ref| "
              "(≤ 1 passes, as in FlagGems' own accuracy tests). PyTorch's columns show what the native kernel does "
              "on the same inputs.", "",
              "| op | aten | dtype | inputs | source | FlagGems max rel | FlagGems mean rel | FlagGems / tol | "
              "torch max rel | torch mean rel | torch / tol | rtol | atol·K | result | note |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cells = [r.op, r.aten, r.dtype, r.shapes, r.source, _fmt(r.gems_max_rel), _fmt(r.gems_mean_rel),
                 _fmt(r.gems_tol_ratio), _fmt(r.torch_max_rel), _fmt(r.torch_mean_rel), _fmt(r.torch_tol_ratio),
                 _fmt(r.rtol), _fmt(r.atol), r.status, r.note]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    timed = slowest(rows)
    if timed:
        lines += ["", "## Time per call", "",
                  "Median wall time of one call on the same inputs (CUDA events on a GPU), after two untimed calls; "
                  "slowest first by the time FlagGems adds per call. A kernel many times slower than PyTorch's at "
                  "the shapes the model ran is where a slow candidate spends its time.", "",
                  "| op | aten | dtype | inputs | torch ms | FlagGems ms | FlagGems / torch |",
                  "|---|---|---|---|---:|---:|---:|"]
        for r in timed:
            cells = [r.op, r.aten, r.dtype, r.shapes, f"{r.torch_ms:.4g}", f"{r.gems_ms:.4g}",
                     f"{_time_ratio(r):.3g}×"]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _time_ratio(row: OpError) -> float:
    return row.gems_ms / row.torch_ms if row.torch_ms else math.inf


def slowest(rows: Sequence[OpError]) -> list[OpError]:
    """The timed rows, the largest time FlagGems adds per call first."""
    timed = [r for r in rows if r.gems_ms is not None and r.torch_ms is not None]
    return sorted(timed, key=lambda r: r.gems_ms - r.torch_ms, reverse=True)


def summarize(rows: Sequence[OpError]) -> dict[str, Any]:
    timed = [{"op": r.op, "shapes": r.shapes, "torch_ms": r.torch_ms, "gems_ms": r.gems_ms}
             for r in slowest(rows)[:5]]
    return {"operators": len({r.op for r in rows}),
            "replayed": len({r.op for r in rows if r.status in ("pass", "FAIL")}),
            "failed": sorted({r.op for r in rows if r.status == "FAIL"}),
            "not_replayed": sorted({r.op for r in rows if r.status == "not replayed"}),
            "errors": sorted({r.op for r in rows if r.status == "error"}),
            **({"slowest": timed} if timed else {})}


def ops_command(run: str, runs_dir: Path = Path("runs"), reports_dir: Path = Path("reports"), *,
                dtypes: Optional[Sequence[str]] = None, calls_per_op: int = 3, gate: bool = False,
                candidate: Optional[CandidateScope] = None, device: str = "cuda", timing_repeats: int = 0) -> int:
    """Replay the candidate's operators of stored run `run`; writes reports/RUN/ops.md and ops.json. With
    `timing_repeats`, each replayed call is also timed under both kernels (ops.md "Time per call").

    Returns 1 with `gate` when an operator is outside FlagGems' tolerance, else 0."""
    from ..runner.run_dir import open_run

    unknown = [d for d in dtypes or () if d not in RTOL]
    if unknown:
        raise UserError(f"ops: --dtypes: unknown dtype {unknown[0]!r} (known: {', '.join(RTOL)})")
    if calls_per_op < 1:
        raise UserError(f"ops: --calls-per-op must be at least 1, not {calls_per_op}")
    if timing_repeats < 0:
        raise UserError(f"ops: --timing must be a positive number of timed calls, not {timing_repeats}")
    if candidate is None:
        require_gpu()
    store, run_id, run_dir = open_run(run, Path(runs_dir))
    try:
        specs, servers = store.get_meta("specs", {}), store.get_meta("servers", {})
        spec = specs.get("candidate") or {}
        calls, source = collect_calls(run_dir, servers, spec)
        if not calls:
            raise UserError(f"{run}: the candidate recorded no FlagGems operator calls (no calls-*.jsonl under "
                            f"{run_dir / 'oplogs' / 'candidate'} and no ops_called in its evidence)")
        rows = check_ops(calls, device, dtypes, candidate=candidate, calls_per_op=calls_per_op,
                         timing_repeats=timing_repeats)
        facts = {"calls from": source, "device": _device_name(device), "packages": _versions()}
        perturb = perturbation_from_env()
        if perturb is not None:
            facts["perturbation"] = (f"{ENV_PERTURB_OP}={perturb.op} {ENV_PERTURB_SCALE}={perturb.scale:g}: FlagGems' "
                                     f"{perturb.op} is deliberately perturbed (test mode)")
        out_dir = Path(reports_dir) / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"md": out_dir / "ops.md", "json": out_dir / "ops.json"}
        summary = summarize(rows)
        paths["md"].write_text(render_markdown(run_id, rows, facts), encoding="utf-8")
        paths["json"].write_text(json.dumps({"run_id": run_id, **facts, "summary": summary,
                                             "results": [r.to_dict() for r in rows]}, indent=2, default=str) + "\n",
                                 encoding="utf-8")
        store.set_meta("opcheck", {**summary, "calls_from": source, "report": str(paths["md"])})
    finally:
        store.close()
    print(f"operators: {summary['operators']} ({summary['replayed']} replayed); outside tolerance: "
          f"{', '.join(summary['failed']) or 'none'}; not replayed: {', '.join(summary['not_replayed']) or 'none'}")
    for row in slowest(rows)[:3]:
        print(f"slow: {row.op} ({row.shapes}): FlagGems {row.gems_ms:.4g} ms vs torch {row.torch_ms:.4g} ms")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 1 if gate and summary["failed"] else 0


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _versions() -> str:
    import importlib.metadata

    out = [f"torch {torch.__version__}"]
    for dist in ("flag_gems", "triton"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(out)
