"""Is FlagGems' broadcasting `mul` behind the NaN logits of a transformers forward with all FlagGems operators on?

docs/gpu-validation.md: with `flag_gems.enable()` a forward of the tiny random Qwen3 gave NaN logits and an illegal
memory access, and `flageval-lite ops` found `mul.Tensor` returning [N, 1] for [N, 1] × [1, D].  This runs one
forward of that model (same config as build_tiny_model.py, random weights, 64 random token ids) per variant, each in
its own process (an illegal memory access poisons the CUDA context), and prints one JSON line per variant:
native, all FlagGems operators, all but `mul`, and `mul` alone.

    PYTHONPATH=<site with flag_gems> python3 benchmarks/gpu/flaggems_forward_check.py
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VARIANTS = {"native": None, "all": {}, "all-but-mul": {"exclude": ["mul"]}, "mul-only": {"include": ["mul"]}}


def forward(variant: str, device: str) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=49152, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=64, intermediate_size=3072, max_position_embeddings=4096,
                         tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        native = model(ids).logits.float()
        scope = VARIANTS[variant]
        if scope is None:
            logits = native
        else:
            import flag_gems

            with flag_gems.use_gems(**scope):
                logits = model(ids).logits.float()
        torch.cuda.synchronize() if device == "cuda" else None
    finite = bool(torch.isfinite(logits).all())
    return {"variant": variant, "finite": finite,
            "max_abs_diff": float((logits - native).abs().max()) if finite else None,
            "top1_agreement": float((logits.argmax(-1) == native.argmax(-1)).float().mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(forward(args.variant, args.device)), flush=True)
        return 0
    for variant in args.variants.split(","):
        started = time.monotonic()
        try:
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--device", args.device],
                                  capture_output=True, text=True, timeout=args.timeout_s)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"variant": variant, "exit_code": done.returncode,
                                                       "stderr_tail": done.stderr.strip().splitlines()[-3:]}
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "timed_out_s": args.timeout_s}
        row["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
