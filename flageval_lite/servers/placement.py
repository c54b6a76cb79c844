"""Can both backends share the GPU at once, and with how much memory each?

vLLM's `--gpu-memory-utilization` is a fraction of the device's *total* memory, per instance.  Two
instances on one GPU each need their weights, a minimum KV cache and some working memory (CUDA
context, activations, sampler buffers); concurrent placement is allowed only when both fit in what
is free.  Otherwise the run is refused with the numbers, or, when fallback is allowed, run one
backend after the other (each with the whole GPU), as FlagRelease does.

Engines that do not take GPU memory from a shared pool (embedded on CPU, stub, external) always fit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from ..records import ServeSpec

GiB = 1024**3
GPU_ENGINES = ("vllm", "flagscale")
DEFAULT_KV_MIN_BYTES = 4 * GiB  # a useful KV cache for 32k-token contexts at modest batch sizes
DEFAULT_OVERHEAD_BYTES = 3 * GiB  # CUDA context, activations, CUDA graphs / Triton workspaces
HEADROOM = 0.95  # never hand out the last 5 % of free memory
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass
class Placement:
    mode: str  # sequential | concurrent
    reason: str
    gpu_memory_utilization: dict[str, float] = field(default_factory=dict)  # role -> fraction; absent = spec's

    def apply(self, spec: ServeSpec, role: str) -> ServeSpec:
        """The spec with this placement's memory fraction for `role` (unchanged when none is set)."""
        fraction = self.gpu_memory_utilization.get(role)
        return dataclasses.replace(spec, gpu_memory_utilization=fraction) if fraction else spec


def plan_placement(ref: ServeSpec, cand: ServeSpec, mode: str, gpu_free_bytes: Optional[int] = None,
                   model_bytes: Optional[int] = None, allow_fallback: bool = False, *,
                   gpu_total_bytes: Optional[int] = None, kv_min_bytes: int = DEFAULT_KV_MIN_BYTES,
                   overhead_bytes: int = DEFAULT_OVERHEAD_BYTES) -> Placement:
    """Decide sequential vs concurrent.  Unknown GPU memory / model size (None) is probed / estimated.

    `model_bytes` is the weight size of one copy; both sides serve the same model.
    """
    if mode not in ("sequential", "concurrent"):
        raise UserError(f"placement must be sequential or concurrent, not {mode!r}")
    if mode == "sequential":
        return Placement("sequential", "one backend at a time, as configured")
    specs = {"reference": ref, "candidate": cand}
    on_gpu = [role for role, spec in specs.items() if spec.engine in GPU_ENGINES]
    if len(on_gpu) < 2:
        return Placement("concurrent", "at most one backend uses a GPU memory pool: nothing to share")
    if _disjoint_devices(ref.cuda_visible_devices, cand.cuda_visible_devices):
        return Placement("concurrent", f"different GPUs ({ref.cuda_visible_devices} vs {cand.cuda_visible_devices})")

    if gpu_free_bytes is None:
        probed = probe_gpu_memory(ref.cuda_visible_devices)
        if probed is not None:
            gpu_free_bytes, gpu_total_bytes = probed[0], gpu_total_bytes or probed[1]
    weights = {role: model_bytes if model_bytes is not None else estimate_model_bytes(spec)
               for role, spec in specs.items()}

    if gpu_free_bytes is None:
        problem = "free GPU memory is unknown (nvidia-smi gave no answer)"
    elif any(w is None for w in weights.values()):
        problem = (f"the size of model {ref.model!r} cannot be estimated (not a local directory with "
                   f"*.safetensors or config.json)")
    else:
        need = {role: w + kv_min_bytes + overhead_bytes for role, w in weights.items()}  # type: ignore[operator]
        usable = gpu_free_bytes * HEADROOM
        if sum(need.values()) <= usable:
            total = gpu_total_bytes or gpu_free_bytes
            fractions = {role: math.floor(100 * usable * need[role] / sum(need.values()) / total) / 100
                         for role in specs}
            return Placement("concurrent", f"both fit: {_gib(sum(need.values()))} needed of "
                                           f"{_gib(gpu_free_bytes)} free", fractions)
        one = need["reference"]
        problem = (f"two copies need {_gib(sum(need.values()))} (each {_gib(one)}: weights "
                   f"{_gib(weights['reference'])} + KV cache minimum {_gib(kv_min_bytes)} + overhead "
                   f"{_gib(overhead_bytes)}) but only {_gib(gpu_free_bytes)} of GPU memory is free")
    if allow_fallback:
        return Placement("sequential", f"concurrent placement refused: {problem}; falling back to sequential")
    raise UserError(f"concurrent placement refused: {problem}; use placement: sequential or allow_fallback: true")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _disjoint_devices(a: str, b: str) -> bool:
    if not a or not b:
        return False
    return not ({d.strip() for d in a.split(",")} & {d.strip() for d in b.split(",")})


def probe_gpu_memory(cuda_visible_devices: str = "") -> Optional[tuple[int, int]]:
    """(free, total) bytes of the first GPU the spec would see, from nvidia-smi (no CUDA context here)."""
    if shutil.which("nvidia-smi") is None:
        return None
    device = (cuda_visible_devices.split(",")[0].strip() if cuda_visible_devices else "") or "0"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits",
                              "-i", device], capture_output=True, text=True, timeout=20, check=True).stdout
        free_mib, total_mib = (int(x) for x in out.strip().splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return free_mib * 1024**2, total_mib * 1024**2


def estimate_model_bytes(spec: ServeSpec) -> Optional[int]:
    """Weight bytes of one copy: the checkpoint's *.safetensors (or *.bin) sizes, else config.json params."""
    folder = Path(spec.model).expanduser() if spec.model else None
    if folder is None or not folder.is_dir():
        return None
    for pattern in ("*.safetensors", "*.bin"):
        files = list(folder.glob(pattern))
        if files:
            return sum(f.stat().st_size for f in files)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    params = params_from_config(config)
    if params is None:
        return None
    dtype = spec.dtype if spec.dtype != "auto" else str(_text_config(config).get("torch_dtype")
                                                         or config.get("torch_dtype") or "bfloat16")
    return params * DTYPE_BYTES.get(dtype, 2)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config (Qwen3-Omni nests it under thinker_config.text_config)."""
    thinker = config.get("thinker_config") or {}
    return thinker.get("text_config") or config.get("text_config") or config


def params_from_config(config: dict[str, Any]) -> Optional[int]:
    """Parameter count of a decoder-only (optionally MoE) transformer from its HF config.

    Counts embeddings, attention and MLP/expert projections; norms, biases and vision/audio towers
    are left out (a few per cent for omni models), so this is a lower bound.
    """
    text = _text_config(config)
    try:
        hidden, layers, vocab = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["vocab_size"])
        heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    experts = int(text.get("num_experts") or text.get("n_routed_experts") or 0)
    if experts:
        expert_width = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
        shared_width = int(text.get("shared_expert_intermediate_size") or 0)
        mlp = experts * 3 * hidden * expert_width + 3 * hidden * shared_width + hidden * experts
    else:
        mlp = 3 * hidden * int(text.get("intermediate_size") or 4 * hidden)
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) else 2)
    return embeddings + layers * (attention + mlp)
