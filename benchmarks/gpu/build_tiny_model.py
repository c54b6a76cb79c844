"""Build the small random-weights Qwen3 model used to validate both stacks on a GPU machine with no network.

Random weights make accuracy meaningless but agreement between two operator stacks fully meaningful.
    python benchmarks/gpu/build_tiny_model.py --tokenizer DIR --out DIR
The tokenizer folder comes from the SmolLM2 GGUF (see docs/gpu-validation.md); it is copied beside the weights.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json + chat template")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=1024, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=64, intermediate_size=3072,
                         max_position_embeddings=4096, tie_word_embeddings=True, torch_dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    out = Path(args.out)
    model.save_pretrained(out)
    for f in Path(args.tokenizer).iterdir():
        shutil.copy(f, out / f.name)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters -> {out}")


if __name__ == "__main__":
    main()
