"""Placement: two copies on one GPU only when weights + KV minimum + overhead fit, with the numbers when not."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flageval_lite.errors import UserError
from flageval_lite.records import ServeSpec
from flageval_lite.servers.placement import (DEFAULT_KV_MIN_BYTES, DEFAULT_OVERHEAD_BYTES, GiB, estimate_model_bytes,
                                             params_from_config, plan_placement)
from flageval_lite.servers.spec import load_serve_spec

H100_80GB = 79.6 * GiB  # what an idle 80 GB H100 reports (81,559 MiB)
H200 = 139.8 * GiB
NATIVE, FLAGGEMS = load_serve_spec("qwen3_omni_native"), load_serve_spec("qwen3_omni_flaggems")
QWEN3_OMNI_TEXT = {"hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 152064, "num_attention_heads": 32,
                   "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "moe_intermediate_size": 768,
                   "intermediate_size": 768, "tie_word_embeddings": False}


def test_sequential_keeps_the_specs() -> None:
    placement = plan_placement(NATIVE, FLAGGEMS, "sequential")
    assert placement.mode == "sequential" and placement.gpu_memory_utilization == {}
    assert placement.apply(NATIVE, "reference") is NATIVE


def test_30b_bf16_twice_on_an_80gb_h100_is_refused_with_numbers() -> None:
    with pytest.raises(UserError) as info:
        plan_placement(NATIVE, FLAGGEMS, "concurrent", gpu_free_bytes=int(H100_80GB), model_bytes=30 * 10**9 * 2,
                       allow_fallback=False, gpu_total_bytes=int(H100_80GB))
    message = str(info.value)
    assert "two copies need 125.8 GiB" in message  # 2 x (55.9 weights + 4.0 KV + 3.0 overhead)
    assert "weights 55.9 GiB" in message and "only 79.6 GiB of GPU memory is free" in message
    assert "placement: sequential or allow_fallback: true" in message and "\n" not in message


def test_30b_bf16_twice_falls_back_to_sequential_when_allowed() -> None:
    placement = plan_placement(NATIVE, FLAGGEMS, "concurrent", gpu_free_bytes=int(H100_80GB),
                               model_bytes=30 * 10**9 * 2, allow_fallback=True)
    assert placement.mode == "sequential"
    assert placement.reason.startswith("concurrent placement refused: two copies need 125.8 GiB")
    assert placement.reason.endswith("falling back to sequential")
    assert placement.gpu_memory_utilization == {}


def test_small_model_twice_on_an_h200_fits_with_split_memory() -> None:
    tiny = load_serve_spec("tiny_qwen3_native")
    placement = plan_placement(tiny, load_serve_spec("tiny_qwen3_flaggems"), "concurrent",
                               gpu_free_bytes=int(H200), model_bytes=int(0.38 * GiB), gpu_total_bytes=int(H200))
    assert placement.mode == "concurrent" and placement.reason.startswith("both fit")
    assert placement.gpu_memory_utilization == {"reference": 0.47, "candidate": 0.47}
    assert placement.apply(tiny, "reference").gpu_memory_utilization == 0.47


def test_fractions_are_of_total_memory_when_part_is_in_use() -> None:
    placement = plan_placement(NATIVE, FLAGGEMS, "concurrent", gpu_free_bytes=int(100 * GiB), model_bytes=10 * GiB,
                               gpu_total_bytes=int(140 * GiB))
    fractions = placement.gpu_memory_utilization
    assert fractions["reference"] == fractions["candidate"] == 0.33  # 95 GiB usable / 2 / 140 GiB total
    assert sum(fractions.values()) * 140 <= 100


def test_non_gpu_engines_always_fit_concurrently() -> None:
    cpu_ref, cpu_cand = load_serve_spec("embedded_fp32"), load_serve_spec("embedded_bf16")
    placement = plan_placement(cpu_ref, cpu_cand, "concurrent", gpu_free_bytes=0, model_bytes=10**12)
    assert placement.mode == "concurrent" and "nothing to share" in placement.reason
    external = load_serve_spec("external_9010")
    assert plan_placement(NATIVE, external, "concurrent", gpu_free_bytes=0, model_bytes=10**12).mode == "concurrent"


def test_disjoint_gpus_fit() -> None:
    a = dataclasses.replace(NATIVE, cuda_visible_devices="0")
    b = dataclasses.replace(FLAGGEMS, cuda_visible_devices="1")
    assert plan_placement(a, b, "concurrent", gpu_free_bytes=1, model_bytes=10**12).mode == "concurrent"


def test_unknown_model_size_is_refused_or_falls_back() -> None:
    with pytest.raises(UserError, match="size of model 'Qwen/Qwen3-Omni-30B-A3B-Instruct' cannot be estimated"):
        plan_placement(NATIVE, FLAGGEMS, "concurrent", gpu_free_bytes=int(H200))
    assert plan_placement(NATIVE, FLAGGEMS, "concurrent", gpu_free_bytes=int(H200), allow_fallback=True).mode == \
        "sequential"


def test_bad_mode() -> None:
    with pytest.raises(UserError, match="sequential or concurrent"):
        plan_placement(NATIVE, FLAGGEMS, "parallel")


def test_weights_from_safetensors_sizes(tmp_path: Path) -> None:
    for i, size in enumerate((3 * GiB, 2 * GiB)):
        with open(tmp_path / f"model-0000{i}.safetensors", "wb") as fh:
            fh.truncate(size)  # sparse: sizes without the disk use
    spec = dataclasses.replace(NATIVE, model=str(tmp_path))
    assert estimate_model_bytes(spec) == 5 * GiB
    placement = plan_placement(spec, dataclasses.replace(FLAGGEMS, model=str(tmp_path)), "concurrent",
                               gpu_free_bytes=int(H100_80GB))
    expected_need = 2 * (5 * GiB + DEFAULT_KV_MIN_BYTES + DEFAULT_OVERHEAD_BYTES)
    assert placement.mode == "concurrent" and f"{expected_need / GiB:.1f} GiB needed" in placement.reason


def test_weights_from_config_param_count(tmp_path: Path) -> None:
    dense = {"hidden_size": 1024, "num_hidden_layers": 8, "vocab_size": 49152, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 3072, "tie_word_embeddings": True,
             "torch_dtype": "bfloat16"}
    attention = 2 * 1024 * 16 * 64 + 2 * 1024 * 8 * 64
    assert params_from_config(dense) == 49152 * 1024 + 8 * (attention + 3 * 1024 * 3072)
    (tmp_path / "config.json").write_text(json.dumps(dense))
    spec = ServeSpec(name="t", engine="vllm", model=str(tmp_path))
    assert estimate_model_bytes(spec) == params_from_config(dense) * 2
    assert estimate_model_bytes(dataclasses.replace(spec, dtype="float32")) == params_from_config(dense) * 4


def test_qwen3_omni_thinker_config_is_about_30b_params() -> None:
    params = params_from_config({"thinker_config": {"text_config": QWEN3_OMNI_TEXT}})
    assert 29e9 < params < 32e9
    assert params_from_config({"hidden_size": 8}) is None
