#!/bin/bash
# On the offline GPU machine, after the vLLM + FlagGems pieces are installed into /tmp/site
# (../shared/gpu/README.md). Runs the real comparison on the tiny model and leaves the report in $OUT.
#   bash benchmarks/gpu/validate.sh sequential|concurrent     (carry .gpu/tok and .whl on the first call)
set -uo pipefail
placement=$1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/ep:$PWD
# `datasets` (for the benchmark fixtures) is not in the image: carried as wheels.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-extra .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site-extra:$PYTHONPATH
# vLLM finds general plugins through entry points: declare ours without installing the checkout.
ep=/tmp/ep/flageval_lite_gpu-0.1.dist-info
mkdir -p $ep
printf 'Metadata-Version: 2.1\nName: flageval-lite-gpu\nVersion: 0.1\n' > $ep/METADATA
printf '[vllm.general_plugins]\nflageval_lite_flaggems = flageval_lite.servers.vllm_plugin:register\nflageval_lite_evidence = flageval_lite.servers.vllm_plugin:register_evidence\n' > $ep/entry_points.txt
if [ ! -f /tmp/tiny-qwen3/config.json ]; then
  python3 benchmarks/gpu/build_tiny_model.py --tokenizer .gpu/tok --out /tmp/tiny-qwen3 || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$OUT/gpu-$placement.txt"
start=$(date +%s)
python3 -m flageval_lite.cli run --config benchmarks/gpu/tiny_$placement.yaml --run-id gpu-$placement \
  --runs-dir /tmp/runs --reports-dir "$OUT" --quiet 2>&1 | tee "$OUT/run-$placement.log"
echo "wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/run-$placement.log"
cp /tmp/runs/gpu-$placement/manifest.json "$OUT/gpu-$placement/manifest.json" 2>/dev/null
tail -n 40 /tmp/runs/gpu-$placement/logs/candidate.log > "$OUT/gpu-$placement/candidate-log-tail.txt" 2>/dev/null
true
