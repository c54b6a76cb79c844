"""Operator evidence (flaggems_hooks) and `ops RUN` (opcheck) on CPU.

FlagGems itself needs a GPU, so here the "FlagGems" side is (a) a small stand-in module with FlagGems' registration
API that registers numpy kernels for aten ops on the CPU dispatch key, wrapped by our real hooks, and (b) for the
comparison math, a deliberately perturbed CPU implementation of one op (a dispatch mode)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flageval_lite.diagnose import op_calls, op_recipes, op_replay
from flageval_lite.diagnose.op_calls import OpCall
from flageval_lite.diagnose.op_recipes import RECIPES, ModelDims, derived_calls, recipe_for
from flageval_lite.diagnose.op_replay import check_ops, compare
from flageval_lite.diagnose.opcheck import collect_calls, model_dims, ops_command
from flageval_lite.errors import UserError
from flageval_lite.runner.store import Store
from flageval_lite.serving import flaggems as flaggems_hooks
from flageval_lite.serving.flaggems import CallRecorder, Perturbation, encode, perturb_output, read_calls

# Registering over an aten kernel warns once, as FlagGems does on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:Warning only once for all operators")

SMALL = ModelDims(hidden=64, intermediate=96, vocab=200, heads=4, head_dim=16, tokens=(1, 8))


# --------------------------------------------------------------------------- a perturbed CPU "candidate"


class PerturbedOp(TorchDispatchMode):
    """Runs every aten op natively, except `target`, whose floating results are perturbed like FLAGEVAL_PERTURB_OP."""

    def __init__(self, target: str, scale: float = 0.05):
        super().__init__()
        self.target, self.scale = target, scale

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == self.target:
            return perturb_output(out, self.scale, args, kwargs)
        return out


def perturbed(target: str):
    """A candidate whose kernel for the aten op behind registration name `target` is perturbed."""
    packet = recipe_for(target).aten.split(".")[0]
    return lambda op: PerturbedOp(packet)


def all_derived(dtype: str) -> list[OpCall]:
    return [call for op in RECIPES for call in derived_calls(op, "", SMALL, dtype)]


# --------------------------------------------------------------------------- tolerances and recipes


def test_tolerances_are_flaggems_own() -> None:
    assert op_replay.RTOL == {"bfloat16": 0.016, "float16": 1e-3, "float32": 1.3e-6, "float64": 1e-7}
    assert op_replay.ATOL == 1e-4
    errors = compare(torch.full((4,), 1.01), torch.ones(4, dtype=torch.float64), "close", reduce_len=100)
    assert errors.atol == pytest.approx(1e-2) and errors.tol_ratio < 1  # atol × reduction length absorbs 0.01
    assert compare(torch.full((4,), 1.01), torch.ones(4, dtype=torch.float64), "close", 1).tol_ratio > 1


def test_registry_covers_the_ops_a_decoder_calls() -> None:
    wanted = {"mm", "addmm", "bmm", "embedding", "softmax", "log_softmax", "cat", "index", "gather", "argmax", "topk",
              "exp", "mul", "add", "silu", "rsqrt", "mean", "sum"}
    assert wanted <= set(RECIPES)
    assert recipe_for("general_mm") is RECIPES["mm"]  # Hopper's mm logs from general_mm
    assert recipe_for("mul_") is RECIPES["mul"] and recipe_for("frobnicate") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_recipe_builds_inputs_and_passes_against_itself(dtype: str) -> None:
    calls = all_derived(dtype)
    assert {c.op for c in calls} == set(RECIPES) and all(c.source == "model config" for c in calls)
    rows = check_ops(calls, "cpu", candidate=lambda op: contextlib.nullcontext())
    assert {r.op for r in rows} == set(RECIPES)
    assert [r for r in rows if r.status != "pass"] == []
    assert all(r.gems_tol_ratio == r.torch_tol_ratio <= 1 for r in rows)


@pytest.mark.parametrize("target", ["exp", "mm", "softmax", "embedding", "sum", "silu", "cat", "topk"])
def test_a_perturbed_implementation_is_flagged_and_only_it(target: str) -> None:
    rows = check_ops(all_derived("bfloat16"), "cpu", candidate=perturbed(target))
    packet = RECIPES[target].aten.split(".")[0]
    failed = {r.op for r in rows if r.status == "FAIL"}
    # Registration names that share the aten op (sum and sum_dim are both aten::sum) fail together.
    assert failed == {op for op, recipe in RECIPES.items() if recipe.aten.split(".")[0] == packet}
    assert target in failed
    for row in rows:
        if row.op == target:
            assert row.gems_max_rel > 0.03 and row.torch_tol_ratio <= 1 < row.gems_tol_ratio


def test_in_place_variant_and_unknown_op_are_not_dropped() -> None:
    (call, *_) = derived_calls("mul_", "", SMALL, "float32")
    assert call.aten == "mul_.Tensor"
    unknown = derived_calls("frobnicate", "frobnicate", SMALL, "float32")
    other_overload = derived_calls("true_divide", "div.Scalar", SMALL, "float32")
    rows = check_ops([call, *unknown, *other_overload], "cpu", candidate=lambda op: PerturbedOp("mul_"))
    assert [(r.op, r.status) for r in rows] == [("mul_", "FAIL"), ("frobnicate", "not replayed"),
                                                ("true_divide", "not replayed")]
    assert "recipe covers div.Tensor" in rows[2].source


def test_integer_results_are_compared_exactly() -> None:
    ref = torch.tensor([1, 2, 3])
    assert compare(torch.tensor([1, 2, 3]), ref, "exact", 1).tol_ratio == 0
    mismatch = compare(torch.tensor([1, 2, 4]), ref, "exact", 1)
    assert mismatch.mean_rel == pytest.approx(1 / 3) and mismatch.tol_ratio == float("inf")


# --------------------------------------------------------------------------- recorded calls


def test_recorded_arguments_are_rebuilt_with_their_layout() -> None:
    weight = torch.randn(96, 64)
    args = [torch.randn(8, 64), weight.t(), torch.tensor(2.0)]  # a linear's transposed weight, a wrapped scalar
    encoded = encode(args)
    assert encoded[1] == {"tensor": [64, 96], "stride": [1, 64], "dtype": "float32", "device": "cpu"}
    gens = {"cpu": torch.Generator().manual_seed(0), "device": torch.Generator().manual_seed(0)}
    rebuilt = op_replay.build(encoded, "cpu", gens)
    assert [(t.shape, t.stride(), t.dtype) for t in rebuilt] == [(t.shape, t.stride(), t.dtype) for t in args]
    assert encode([torch.float32, torch.device("cpu"), None, [1, -1]]) == [
        {"scalar_type": "float32"}, {"device_arg": "cpu"}, None, [1, -1]]
    with pytest.raises(op_calls.Unreplayable):
        op_replay.build({"unsupported": "Generator"}, "cpu", gens)


def test_per_op_selection_keeps_small_and_large_calls() -> None:
    calls = [OpCall("mm", "mm", [op_recipes._t((n, 8), "float32"), op_recipes._t((8, 8), "float32")]) for n in range(1, 11)]
    chosen = op_replay.select_calls(calls, 3)
    assert [c.args[0]["tensor"][0] for c in chosen] == [1, 5, 10]


def test_model_dims_from_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"thinker_config": {"text_config": {
        "hidden_size": 2048, "intermediate_size": 768, "vocab_size": 151936, "num_attention_heads": 32,
        "head_dim": 128}}}))
    dims, source = model_dims({"model": str(tmp_path)})
    assert (dims.hidden, dims.intermediate, dims.vocab, dims.heads, dims.head_dim) == (2048, 768, 151936, 32, 128)
    assert source.endswith("config.json")
    assert model_dims({"model": "smollm2"})[1].startswith("generic sizes")


# --------------------------------------------------------------------------- flaggems_hooks with a FlagGems stand-in


def _np_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.exp(x.detach().contiguous().numpy()))


def _np_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a.detach().contiguous().numpy() @ b.detach().contiguous().numpy())


_np_exp.__name__, _np_mm.__name__ = "exp", "mm"


@pytest.fixture()
def gems_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """FlagGems' registration API (registrar class, enable/only_enable, lib=) over numpy kernels on CPU."""
    module = types.ModuleType("flag_gems")
    config = (("exp", _np_exp), ("mm", _np_mm))
    libraries: list[torch.library.Library] = []

    class Register:
        def __init__(self, config, user_include_ops=None, user_exclude_ops=None, cpp_patched_ops=None, lib=None,
                     full_config_by_func=None):
            self.lib, self.all_ops = lib, []
            for key, fn in config:
                skipped = user_include_ops and fn.__name__ not in user_include_ops
                if skipped or fn.__name__ in (user_exclude_ops or ()):
                    continue
                self.register_impl(key, fn)

        def register_impl(self, key, fn):
            self.all_ops.append(fn.__name__)
            self.lib.impl(key, fn, "CPU")

    def _lib(lib):
        if lib is None:
            lib = torch.library.Library("aten", "IMPL")
            libraries.append(lib)
        return lib

    def enable(lib=None, unused=None, registrar=Register, record=False, once=False, path=None):
        module.current = registrar(config, user_exclude_ops=unused or [], lib=_lib(lib))

    def only_enable(lib=None, include=None, registrar=Register, record=False, once=False, path=None):
        module.current = registrar(config, user_include_ops=include, lib=_lib(lib))

    module.registrar, module.enable, module.only_enable = Register, enable, only_enable
    module.all_registered_ops = lambda: module.current.all_ops
    monkeypatch.setitem(sys.modules, "flag_gems", module)
    for var in (flaggems_hooks.ENV_PERTURB_OP, flaggems_hooks.ENV_PERTURB_SCALE, flaggems_hooks.ENV_RECORD_SHAPES):
        monkeypatch.delenv(var, raising=False)
    yield module
    for lib in libraries:
        lib._destroy()  # the real aten kernels come back for the other tests


def test_calls_log_names_registered_ops_once(gems_standin, tmp_path: Path) -> None:
    enabled = flaggems_hooks.enable(calls_dir=str(tmp_path))
    assert enabled.mode == "enable" and enabled.registered == ["exp", "mm"]
    x = torch.randn(4, 4)
    for _ in range(3):
        torch.exp(x)
    torch.mm(x, x.t())
    assert read_calls(tmp_path) == [{"op": "exp", "aten": "exp"}, {"op": "mm", "aten": "mm"}]
    assert (tmp_path / f"calls-{os.getpid()}.jsonl").is_file()


def test_record_shapes_logs_each_signature_once(gems_standin, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(flaggems_hooks.ENV_RECORD_SHAPES, "1")
    flaggems_hooks.enable(include=["mm"], calls_dir=str(tmp_path))
    a = torch.randn(3, 8)
    torch.mm(a, torch.randn(5, 8).t())
    torch.mm(a, torch.randn(5, 8).t())  # same signature
    torch.mm(torch.randn(1, 8), torch.randn(8, 2))
    torch.exp(a)  # not included: native, not logged
    entries = read_calls(tmp_path)
    assert [(e["op"], e["args"][0]["tensor"], e["args"][1]["stride"]) for e in entries] == [
        ("mm", [3, 8], [1, 8]), ("mm", [1, 8], [2, 1])]


def test_perturbation_hook_changes_only_that_op(gems_standin, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(flaggems_hooks.ENV_PERTURB_OP, "mm")
    monkeypatch.setenv(flaggems_hooks.ENV_PERTURB_SCALE, "0.1")
    enabled = flaggems_hooks.enable()
    assert enabled.perturb == Perturbation("mm", 0.1)
    a, b = torch.randn(4, 6), torch.randn(6, 4)
    expected = torch.from_numpy(a.numpy() @ b.numpy()).flatten()
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    torch.testing.assert_close(torch.mm(a, b).flatten(), expected * (1 + 0.1 * signs))
    x = torch.randn(5)
    torch.testing.assert_close(torch.exp(x), torch.from_numpy(np.exp(x.numpy())))


def test_perturbing_an_unknown_op_or_without_registrar_fails_loudly(gems_standin, monkeypatch) -> None:
    with pytest.raises(ValueError, match="FLAGEVAL_PERTURB_OP=softmaxx: FlagGems has no operator of that name"):
        flaggems_hooks.enable(perturb=Perturbation("softmaxx"))
    # A bisection restarts the perturbed candidate with subsets that leave the target out: not an error.
    gems_standin.FULL_CONFIG_BY_FUNC = {"exp": [("exp", _np_exp)], "mm": [("mm", _np_mm)]}
    assert flaggems_hooks.enable(include=["exp"], perturb=Perturbation("mm")).registered == ["exp"]
    with pytest.raises(ValueError, match="no operator of that name"):
        flaggems_hooks.enable(include=["exp"], perturb=Perturbation("mmm"))
    del gems_standin.registrar  # an older FlagGems without the registrar hook
    with pytest.raises(RuntimeError, match="no registrar class to hook"):
        flaggems_hooks.enable(perturb=Perturbation("mm"))
    monkeypatch.setenv(flaggems_hooks.ENV_PERTURB_SCALE, "lots")
    with pytest.raises(ValueError, match="is not a number"):
        flaggems_hooks.perturbation_from_env({flaggems_hooks.ENV_PERTURB_OP: "mm",
                                              flaggems_hooks.ENV_PERTURB_SCALE: "lots"})


def test_scoped_registers_for_the_block_only(gems_standin) -> None:
    x = torch.randn(4, 4)
    native = torch.mm(x, x)
    with flaggems_hooks.scoped(["mm"], perturb=Perturbation("mm", 0.5)) as registered:
        assert registered == ["mm"]
        assert not torch.allclose(torch.mm(x, x), native)
    torch.testing.assert_close(torch.mm(x, x), native)
    with flaggems_hooks.scoped(["nothing"], perturb=None) as registered:
        assert registered == []


def test_replay_through_the_flaggems_scope_honours_the_perturbation(gems_standin, monkeypatch) -> None:
    """The GPU path of `ops`, on the stand-in: use_gems-style scope per op, FLAGEVAL_PERTURB_OP read from the env."""
    monkeypatch.setenv(flaggems_hooks.ENV_PERTURB_OP, "mm")
    calls = [c for op in ("mm", "exp", "silu") for c in derived_calls(op, "", SMALL, "float32")[:1]]
    rows = check_ops(calls, "cpu", candidate=op_replay.flaggems_scope)
    assert [(r.op, r.status) for r in rows] == [("mm", "FAIL"), ("exp", "pass"), ("silu", "not replayed")]
    assert rows[1].gems_max_rel < 1e-5  # numpy's exp, within float32 rounding of PyTorch's
    assert "registered nothing" in rows[2].note


class DropsBroadcastDim(TorchDispatchMode):
    """A `mul` that returns the first operand's shape, as FlagGems 5.0.2 did on the H200 (docs/gpu-validation.md)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "mul" and out.shape != args[0].shape:
            return out[..., :1]
        return out


def test_a_kernel_returning_the_wrong_shape_fails_instead_of_erroring() -> None:
    """The call vLLM's rotary cache makes (einsum i,j->ij), as recorded on the GPU: [4096, 1] × [1, 32], stride (1, 1)."""
    call = OpCall("mul", "mul.Tensor", [{"tensor": [4096, 1], "stride": [1, 1], "dtype": "float32"},
                                        {"tensor": [1, 32], "stride": [1, 1], "dtype": "float32"}], {}, "recorded")
    good, bad = (check_ops([call], "cpu", candidate=lambda op: mode)[0]
                 for mode in (contextlib.nullcontext(), DropsBroadcastDim()))
    assert good.status == "pass" and good.gems_max_rel < 1e-6
    assert bad.status == "FAIL" and bad.note == "FlagGems: result shape [4096, 1] where float64 PyTorch gives [4096, 32]"
    assert bad.torch_max_rel < 1e-6  # PyTorch's own kernel on the same inputs is right
    # Without recorded shapes, the model-config recipes include that broadcast too.
    derived = check_ops(derived_calls("mul", "", SMALL, "float32"), "cpu", candidate=lambda op: DropsBroadcastDim())
    assert [r.shapes for r in derived if r.status == "FAIL"] == ["float32[8×1], float32[1×8]"]
    assert len(derived) == 3


def test_recorder_ignores_repeats_cheaply_and_keeps_a_cap(tmp_path: Path) -> None:
    recorder = CallRecorder(tmp_path, shapes=True)
    for n in range(flaggems_hooks.MAX_SIGNATURES_PER_OP + 5):
        recorder.note("cat", "cat", ([torch.zeros(n + 1)],), {})
    assert len(read_calls(tmp_path)) == flaggems_hooks.MAX_SIGNATURES_PER_OP
    (tmp_path / "calls-1.jsonl").write_text('{"op": "mm", "aten": "mm"}\n{"op": "mm", "at')  # cut short by a kill
    assert len(read_calls(tmp_path)) == flaggems_hooks.MAX_SIGNATURES_PER_OP + 1


# --------------------------------------------------------------------------- the command


def make_run(runs: Path, run_id: str, calls: list[dict[str, Any]], evidence: dict[str, Any]) -> Path:
    run_dir = runs / run_id
    store = Store(run_dir / "results.sqlite")
    store.set_meta("specs", {"candidate": {"name": "cand", "engine": "embedded", "model": "", "dtype": "bfloat16"}})
    store.set_meta("servers", {"candidate": evidence})
    store.close()
    folder = run_dir / "oplogs" / "candidate"
    folder.mkdir(parents=True)
    (folder / "calls-42.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    return run_dir


def test_ops_command_replays_recorded_calls_and_writes_the_report(tmp_path: Path, capsys) -> None:
    x, w = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(24, 16, dtype=torch.bfloat16)
    calls = [{"op": "mm", "aten": "mm", "args": encode([x, w.t()]), "kwargs": {}},
             {"op": "exp", "aten": "exp", "args": encode([x]), "kwargs": {}},
             {"op": "silu", "aten": "silu"},  # names only: shapes from the model config (generic here)
             {"op": "_fused_thing", "aten": "_fused_thing"}]
    run_dir = make_run(tmp_path / "runs", "r1", calls, {})
    code = ops_command("r1", tmp_path / "runs", tmp_path / "reports", candidate=perturbed("mm"), device="cpu",
                       gate=True)
    assert code == 1
    out = capsys.readouterr().out
    assert "outside tolerance: mm" in out and "not replayed: _fused_thing" in out
    report = json.loads((tmp_path / "reports" / "r1" / "ops.json").read_text())
    by_op = {r["op"]: r for r in report["results"]}
    assert by_op["mm"]["status"] == "FAIL" and by_op["mm"]["source"] == "recorded"
    assert by_op["mm"]["shapes"] == "bfloat16[3×16], bfloat16[16×24] strided"
    assert by_op["exp"]["status"] == by_op["silu"]["status"] == "pass"
    assert by_op["silu"]["source"] == "model config" and by_op["_fused_thing"]["status"] == "not replayed"
    md = (tmp_path / "reports" / "r1" / "ops.md").read_text()
    assert "| mm | mm | bfloat16 |" in md and "FAIL" in md and "generic sizes" in md
    assert Store(run_dir / "results.sqlite").get_meta("opcheck")["failed"] == ["mm"]


def test_ops_falls_back_to_the_op_log_names_of_the_evidence(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "runs", "r2", [], {"ops_called": ["general_mm", "softmax"]})
    calls, source = collect_calls(run_dir, {"candidate": {"ops_called": ["general_mm", "softmax"]}},
                                  {"model": "", "dtype": "auto"})
    assert source.startswith("FlagGems op log (names only)")
    assert {(c.op, c.aten) for c in calls} == {("mm", "mm"), ("softmax", "_softmax")}
    assert {c.args[0]["dtype"] for c in calls} == {"bfloat16"}


def test_ops_on_a_machine_without_gpu_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as info:
        ops_command("missing-run", tmp_path / "runs", tmp_path / "reports")
    assert "needs a CUDA GPU" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check_ops([OpCall("mm")])
    with pytest.raises(UserError, match="unknown dtype 'bf16'"):
        ops_command("missing-run", tmp_path / "runs", tmp_path / "reports", dtypes=["bf16"])


class SlowOp(TorchDispatchMode):
    """Runs every aten op natively, `target` after a fixed delay: a candidate kernel that is slow, not wrong."""

    def __init__(self, target: str, delay_s: float):
        super().__init__()
        self.target, self.delay_s = target, delay_s

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket.__name__ == self.target:
            time.sleep(self.delay_s)
        return func(*args, **(kwargs or {}))


def test_timing_names_the_slow_kernel_first(tmp_path: Path, capsys) -> None:
    x, w = torch.randn(8, 16), torch.randn(16, 24)
    calls = [{"op": "mm", "aten": "mm", "args": encode([x, w]), "kwargs": {}},
             {"op": "exp", "aten": "exp", "args": encode([x]), "kwargs": {}},
             {"op": "add", "aten": "add.Tensor", "args": encode([x, x]), "kwargs": {}}]
    make_run(tmp_path / "runs", "slow", calls, {})
    code = ops_command("slow", tmp_path / "runs", tmp_path / "reports", candidate=lambda op: SlowOp("exp", 0.02),
                       device="cpu", timing_repeats=5)
    assert code == 0  # slow is not wrong: every kernel is within tolerance
    report = json.loads((tmp_path / "reports" / "slow" / "ops.json").read_text())
    by_op = {r["op"]: r for r in report["results"]}
    assert by_op["exp"]["gems_ms"] >= 20 and by_op["exp"]["torch_ms"] < 5
    assert by_op["mm"]["gems_ms"] < 10 and by_op["add"]["gems_ms"] < 10
    assert report["summary"]["slowest"][0]["op"] == "exp"
    md = (tmp_path / "reports" / "slow" / "ops.md").read_text()
    timing = md.split("## Time per call", 1)[1]
    assert timing.index("| exp |") < timing.index("| mm |") and timing.index("| exp |") < timing.index("| add |")
    assert "slow: exp (float32[8×16]): FlagGems" in capsys.readouterr().out
    # Without --timing the report has no timing table and the rows no times.
    ops_command("slow", tmp_path / "runs", tmp_path / "reports", candidate=lambda op: contextlib.nullcontext(),
                device="cpu")
    assert "## Time per call" not in (tmp_path / "reports" / "slow" / "ops.md").read_text()
    with pytest.raises(UserError, match="--timing must be a positive"):
        ops_command("slow", tmp_path / "runs", tmp_path / "reports", candidate=lambda op: contextlib.nullcontext(),
                    device="cpu", timing_repeats=-1)
