"""The records of the op check: a recorded (or derived) operator call, and what replaying it found."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence


class Unreplayable(Exception):
    """A recorded argument this module cannot rebuild."""


@dataclass
class OpCall:
    """One call to replay: registration name, aten overload, arguments encoded by flaggems_hooks.encode."""

    op: str
    aten: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "recorded"  # recorded | model config | names only (no recipe)

    def shapes_text(self) -> str:
        parts = [_arg_text(a) for a in self.args] + [f"{k}={_arg_text(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def size(self) -> int:
        return sum(math.prod(t["tensor"]) for t in tensor_specs(self.args, self.kwargs))


@dataclass
class OpError:
    """The replay of one call: errors of FlagGems' and PyTorch's kernels against the float64 reference."""

    op: str
    aten: str
    dtype: str
    shapes: str
    source: str
    status: str  # pass | FAIL | not replayed | error
    gems_max_rel: Optional[float] = None
    gems_mean_rel: Optional[float] = None
    torch_max_rel: Optional[float] = None
    torch_mean_rel: Optional[float] = None
    gems_tol_ratio: Optional[float] = None  # worst |err| / allowed; > 1 fails
    torch_tol_ratio: Optional[float] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None  # atol × reduction length
    torch_ms: Optional[float] = None  # median wall time of one call, with --timing
    gems_ms: Optional[float] = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arg_text(value: Any) -> str:
    if isinstance(value, dict):
        if "tensor" in value:
            shape = "×".join(map(str, value["tensor"])) or "scalar"
            stride = value.get("stride")
            contiguous = stride is None or stride == contiguous_stride(value["tensor"])
            return f"{value['dtype']}[{shape}]{'' if contiguous else ' strided'}"
        return str(next(iter(value.values())))
    if isinstance(value, list):
        return "[" + ", ".join(_arg_text(v) for v in value) + "]"
    return repr(value)


def tensor_specs(*values: Any) -> Iterable[dict[str, Any]]:
    for value in values:
        if isinstance(value, dict) and "tensor" in value:
            yield value
        elif isinstance(value, dict):
            yield from tensor_specs(*value.values())
        elif isinstance(value, list):
            yield from tensor_specs(*value)


def contiguous_stride(shape: Sequence[int]) -> list[int]:
    stride, out = 1, []
    for size in reversed(shape):
        out.append(stride)
        stride *= max(size, 1)
    return out[::-1]
