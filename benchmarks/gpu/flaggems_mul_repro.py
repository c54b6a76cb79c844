"""Minimal reproduction of the FlagGems finding of docs/gpu-validation.md: `mul.Tensor` with a broadcast operand.

vLLM builds its rotary cos/sin cache with `torch.einsum("i,j -> ij", positions, inv_freq)`, which reaches
`aten::mul` as [N, 1] × [1, D] with the second operand's stride (1, 1).  `flageval-lite ops` replayed that recorded
call and FlagGems returned shape [N, 1] instead of [N, D].  This script checks it directly on the GPU:

    PYTHONPATH=<site with flag_gems> python3 benchmarks/gpu/flaggems_mul_repro.py
"""
import json

import torch

import flag_gems


def cases() -> dict:
    positions = torch.arange(4096, dtype=torch.float32, device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32, device="cuda") / 64))
    column = positions.reshape(4096, 1)
    row_strided = torch.empty_strided((1, 32), (1, 1), dtype=torch.float32, device="cuda").copy_(inv_freq[None])
    return {
        "einsum i,j->ij (vLLM rotary cache)": lambda: torch.einsum("i,j -> ij", positions, inv_freq),
        "mul [4096,1] x [1,32] stride (1,1)": lambda: column * row_strided,
        "mul [4096,1] x [1,32] contiguous": lambda: column * inv_freq[None].contiguous(),
        "outer": lambda: torch.outer(positions, inv_freq),
    }


def main() -> None:
    results = {}
    for name, make in cases().items():
        native = make()
        with flag_gems.use_gems():
            gems = make()
        same_shape = tuple(gems.shape) == tuple(native.shape)
        results[name] = {"native": list(native.shape), "flag_gems": list(gems.shape), "same_shape": same_shape,
                         "max_abs_diff": float((gems - native).abs().max()) if same_shape else None}
    print(json.dumps({"torch": torch.__version__, "flag_gems": flag_gems.__version__,
                      "device": torch.cuda.get_device_name(0), "results": results}, indent=2))


if __name__ == "__main__":
    main()
