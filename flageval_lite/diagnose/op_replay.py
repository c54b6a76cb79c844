"""Replaying one recorded operator call three ways (float64 reference, native, FlagGems' kernel alone) and judging
it by FlagGems' `gems_assert_close` tolerances (see `opcheck.py`)."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

from ..errors import UserError
from ..serving.flaggems import FlagGemsUnavailable, dtype_name, import_flag_gems, scoped
from .op_calls import OpCall, OpError, Unreplayable, contiguous_stride, tensor_specs
from .op_recipes import recipe_for

# FlagGems' RESOLUTION (flag_gems.testing) and default atol.
RTOL = {"bfloat16": 0.016, "float16": 1e-3, "float32": 1.3e-6, "float64": 1e-7}


ATOL = 1e-4


CandidateScope = Callable[[str], ContextManager[Optional[list[str]]]]


def aten_overload(key: str) -> Any:
    name, _, overload = key.partition(".")
    try:
        return getattr(getattr(torch.ops.aten, name), overload or "default")
    except AttributeError:
        raise Unreplayable(f"torch has no aten::{key}") from None


def _make_tensor(spec: dict[str, Any], device: str, gens: dict[str, torch.Generator]) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise Unreplayable(f"dtype {spec['dtype']}")
    where = "cpu" if spec.get("device") == "cpu" else device
    gen = gens["cpu" if where == "cpu" else "device"]
    shape = tuple(spec["tensor"])
    stride = tuple(spec.get("stride") or contiguous_stride(shape))
    # Broadcast (stride 0) dimensions are made as size 1 and expanded back.
    base_shape = tuple(1 if st == 0 and n > 1 else n for n, st in zip(shape, stride))

    def fill(size: tuple[int, ...]) -> torch.Tensor:
        if dtype == torch.bool:
            return torch.randint(0, 2, size, generator=gen, device=where).bool()
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(size, generator=gen, device=where, dtype=torch.float32).to(dtype)
        return torch.randint(0, 8, size, generator=gen, device=where, dtype=dtype)

    if base_shape != shape:
        return fill(base_shape).expand(shape)
    values = fill(shape)
    if list(stride) == contiguous_stride(shape):
        return values
    try:
        strided = torch.empty_strided(shape, stride, dtype=dtype, device=where)
        strided.copy_(values)
        return strided
    except RuntimeError:  # overlapping strides: replay contiguous rather than not at all
        return values


def build(value: Any, device: str, gens: dict[str, torch.Generator], dtype: Optional[str] = None) -> Any:
    """Rebuild an encoded argument; `dtype` replaces the dtype of floating tensors."""
    if isinstance(value, list):
        return [build(v, device, gens, dtype) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        if dtype and getattr(torch, value["dtype"], torch.int64).is_floating_point:
            value = {**value, "dtype": dtype}
        return _make_tensor(value, device, gens)
    if "scalar_type" in value:
        return getattr(torch, value["scalar_type"])
    if "device_arg" in value:
        return torch.device(device)
    if "memory_format" in value:
        return getattr(torch, value["memory_format"])
    if "layout" in value:
        return getattr(torch, value["layout"])
    raise Unreplayable(f"argument of type {value.get('unsupported', value)}")


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _clone(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.clone())


def _upcast(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.to(torch.float64) if t.is_floating_point() else t.clone())


def _first_dtype(args: Any, kwargs: Any) -> str:
    for spec in tensor_specs(args, kwargs):
        if getattr(torch, spec["dtype"], torch.int64).is_floating_point:
            return spec["dtype"]
    return next((spec["dtype"] for spec in tensor_specs(args, kwargs)), "")


class ShapeMismatch(ValueError):
    """A kernel returned a result of another shape than PyTorch's float64 reference."""


@dataclass
class _Errors:
    max_rel: float
    mean_rel: float
    tol_ratio: float
    rtol: float
    atol: float


def compare(out: Any, ref: Any, mode: str, reduce_len: int) -> _Errors:
    """Errors of `out` against the float64 `ref`, in FlagGems' terms (see the module docstring).

    Relative error per element is |out − ref| / max(|ref|, atol × K): relative where the reference is not tiny."""
    if mode == "first" or isinstance(out, (tuple, list)):
        out, ref = out[0], ref[0]
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise TypeError(f"expected tensors, got {type(out).__name__} and {type(ref).__name__}")
    if out.shape != ref.shape:
        raise ShapeMismatch(f"result shape {list(out.shape)} where float64 PyTorch gives {list(ref.shape)}")
    if mode == "exact" or not out.is_floating_point():
        mismatch = (out.to(ref.device) != ref.to(out.dtype)).double()
        share = float(mismatch.mean()) if mismatch.numel() else 0.0
        return _Errors(1.0 if share else 0.0, share, 0.0 if share == 0 else math.inf, 0.0, 0.0)
    rtol, atol = RTOL.get(dtype_name(out.dtype), 0.0), ATOL * max(reduce_len, 1)
    out64, ref64 = out.double(), ref.double()
    ref_cast = ref.to(out.dtype).double()  # FlagGems compares against the reference in the result's dtype
    both_nan = torch.isnan(out64) & torch.isnan(ref64)
    same_inf = torch.isinf(out64) & (out64 == ref64)
    settled = both_nan | same_inf
    rel = ((out64 - ref64).abs() / ref64.abs().clamp_min(atol)).masked_fill(settled, 0).nan_to_num(nan=math.inf)
    ratio = ((out64 - ref_cast).abs() / (atol + rtol * ref_cast.abs())).masked_fill(settled, 0)
    ratio = ratio.nan_to_num(nan=math.inf)
    if rel.numel() == 0:
        return _Errors(0.0, 0.0, 0.0, rtol, atol)
    return _Errors(float(rel.max()), float(rel.mean()), float(ratio.max()), rtol, atol)


def flaggems_scope(op: str) -> ContextManager[Optional[list[str]]]:
    return scoped([op])


def time_call(fn: Callable[..., Any], args: Any, kwargs: Any, device: str, repeats: int) -> float:
    """Median milliseconds of one call on the same inputs, after two untimed calls (Triton compiles on the first).

    On CUDA each call is bracketed by events, so the time is the kernels' own, not the launch queue's."""
    args, kwargs = _clone(args), _clone(kwargs)
    for _ in range(2):
        fn(*args, **kwargs)
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args, **kwargs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            fn(*args, **kwargs)
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def _replay(call: OpCall, device: str, dtype: Optional[str], candidate: CandidateScope, seed: int,
            timing_repeats: int = 0) -> OpError:
    recipe = recipe_for(call.op)
    shapes = call.shapes_text()
    row = OpError(op=call.op, aten=call.aten, dtype=dtype or _first_dtype(call.args, call.kwargs), shapes=shapes,
                  source=call.source, status="not replayed")
    if recipe is None:
        row.note = "no input recipe for this operator"
        return row
    if not call.args and not call.kwargs:
        row.note = call.source
        return row
    try:
        fn = aten_overload(call.aten or recipe.aten)
        gens = {"cpu": torch.Generator().manual_seed(seed), "device": torch.Generator(device=device).manual_seed(seed)}
        args = build(call.args, device, gens, dtype)
        kwargs = {name: build(value, device, gens, dtype) for name, value in call.kwargs.items()}
        recipe.prepare(args, kwargs, gens["device"])
    except Unreplayable as exc:
        row.note = str(exc)
        return row
    try:
        reduce_len = recipe.reduce(args, kwargs)
        ref_args = _upcast(args)
        if call.op in ("softmax", "log_softmax") and len(ref_args) > 2:
            ref_args[2] = False  # half_to_float applies to float16 inputs only
        reference = fn(*ref_args, **_upcast(kwargs))
        native = fn(*_clone(args), **_clone(kwargs))
        with candidate(call.op) as registered:
            if registered is not None and not registered:
                row.note = f"FlagGems registered nothing for include=[{call.op!r}]"
                return row
            result = fn(*_clone(args), **_clone(kwargs))
            if timing_repeats:
                row.gems_ms = time_call(fn, args, kwargs, device, timing_repeats)
        if timing_repeats:
            row.torch_ms = time_call(fn, args, kwargs, device, timing_repeats)
        torch_err = compare(native, reference, recipe.compare, reduce_len)
        row.torch_max_rel, row.torch_mean_rel = torch_err.max_rel, torch_err.mean_rel
        row.torch_tol_ratio = torch_err.tol_ratio
        try:
            gems = compare(result, reference, recipe.compare, reduce_len)
        except ShapeMismatch as exc:  # PyTorch's kernel got the shape right on the same inputs: FlagGems is wrong
            row.status, row.note = "FAIL", f"FlagGems: {exc}"
            return row
    except Exception as exc:  # one broken replay must not hide the others
        row.status, row.note = "error", f"{type(exc).__name__}: {exc}"[:300]
        return row
    row.status = "pass" if gems.tol_ratio <= 1 else "FAIL"
    row.gems_max_rel, row.gems_mean_rel, row.gems_tol_ratio = gems.max_rel, gems.mean_rel, gems.tol_ratio
    row.rtol, row.atol = gems.rtol, gems.atol
    if recipe.compare == "exact" or gems.rtol == 0:
        row.note = "integer result compared exactly (max/mean = share of elements that differ; ties can differ)"
    elif recipe.compare == "first":
        row.note = "values compared; indices depend on how ties are broken"
    return row


def select_calls(calls: Sequence[OpCall], per_op: int) -> list[OpCall]:
    """At most `per_op` calls per (operator, overload, source): the smallest, the largest, then ones in between."""
    groups: dict[tuple[str, str, str], list[OpCall]] = {}
    for call in calls:
        groups.setdefault((call.op, call.aten, call.source), []).append(call)
    out = []
    for group in groups.values():
        ordered = sorted(group, key=OpCall.size)
        if len(ordered) <= per_op:
            out += ordered
            continue
        picks = [0, len(ordered) - 1] + [round(i * (len(ordered) - 1) / (per_op - 1)) for i in range(1, per_op - 1)]
        out += [ordered[i] for i in sorted(set(picks))[:per_op]]
    return out


def require_gpu() -> None:
    """FlagGems is a Triton library: `ops` needs a CUDA device and flag_gems."""
    if not torch.cuda.is_available():
        raise UserError("flageval-lite ops needs a CUDA GPU with flag_gems installed (FlagGems' kernels are Triton); "
                        "this machine has none — run it on the GPU machine that served the candidate")
    try:
        import_flag_gems()
    except FlagGemsUnavailable as exc:
        raise UserError(f"flageval-lite ops: cannot import flag_gems ({exc})") from None


def check_ops(ops: Sequence[OpCall], device: str = "cuda", dtypes: Optional[Sequence[str]] = None, *,
              candidate: Optional[CandidateScope] = None, calls_per_op: int = 3, seed: int = 0,
              timing_repeats: int = 0) -> list[OpError]:
    """Replay `ops` (at most `calls_per_op` per operator) in each of `dtypes` (default: as recorded); with
    `timing_repeats`, also time each call that many times under both kernels.

    `candidate(op)` is a context manager under which the operator runs the candidate's kernel; the default switches
    on FlagGems' implementation of that one operator (CUDA only)."""
    if candidate is None:
        require_gpu()
        candidate = flaggems_scope
    rows = []
    for call in select_calls(ops, calls_per_op):
        for dtype in (dtypes or [None]):
            rows.append(_replay(call, device, dtype, candidate, seed, timing_repeats))
    return rows
