#!/bin/bash
# On the offline GPU machine, after the vLLM + FlagGems pieces are installed into /tmp/site
# (../shared/gpu/README.md). Runs the real comparison on the tiny model and leaves the report in $OUT.
#   bash benchmarks/gpu/validate.sh sequential|concurrent|two_gpus|replicas     (carry .gpu/tok and .whl on the first
#   call; the run config is benchmarks/gpu/tiny_<name>.yaml; two_gpus and replicas need a two-GPU host)
# A rerun with the same placement resumes the stored run (answers already in /tmp/runs are not asked again).
set -uo pipefail
placement=$1  # the run config's name: tiny_$placement.yaml
OUT=${OUT:-/tmp/gpu_out}
RUN_LIMIT_S=${RUN_LIMIT_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/ep:$PWD
# Kernels compiled by the first FlagGems server are reused by later ones while the machine stays up.
export TRITON_CACHE_DIR=/tmp/triton-cache
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
run=gpu-$placement
reports=/tmp/gpu-reports
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv > "$OUT/$run-gpu.txt"
# GPU memory in use every 5 s while the run lasts.
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 5 > "$OUT/$run-memory.csv" &
smi=$!
start=$(date +%s)
# SIGINT before the call's limit: the CLI stops its servers and keeps every stored answer for a resuming rerun.
timeout -s INT -k 30 "$RUN_LIMIT_S" python3 -m flageval_lite.cli run --config benchmarks/gpu/tiny_$placement.yaml \
  --run-id $run --runs-dir /tmp/runs --reports-dir $reports --quiet > "$OUT/$run.log" 2>&1
echo "exit $? wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/$run.log"
kill $smi
tail -n 30 "$OUT/$run.log"
cp $reports/$run/report.md "$OUT/$run-report.md" 2>/dev/null; cp $reports/$run/summary.json "$OUT/$run-summary.json" 2>/dev/null
# Everything else (report.html, the run's store, manifest and server logs) in one file: $OUT returns at most 8.
tar czf "$OUT/$run.tgz" -C /tmp gpu-reports/$run runs/$run 2>/dev/null
true
