#!/bin/bash
# On the GPU machine, after `validate.sh NAME` stored the run gpu-NAME in /tmp/runs: `flageval-lite bisect` on real
# vLLM + FlagGems, each round a restart of the candidate with a subset of the operators it called.
#   bash benchmarks/gpu/bisect_vllm.sh smollm2_all [MAX_ITEMS]
# Stopped with SIGINT before the device call's limit, it keeps every finished round; the same command in the next
# call goes on from there (--resume). Leaves bisect.json / bisect.md and the rounds' log in $OUT.
set -uo pipefail
run=gpu-${1//_/-}
OUT=${OUT:-/tmp/gpu_out}
RUN_LIMIT_S=${RUN_LIMIT_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site-extra:/tmp/site:/tmp/ep:$PWD
export TRITON_CACHE_DIR=/tmp/triton-cache  # the kernels the run compiled: restarts skip the JIT
start=$(date +%s)
timeout -s INT -k 30 "$RUN_LIMIT_S" python3 -m flageval_lite.cli bisect "$run" --resume --max-items "${2:-8}" \
  --startup-timeout 300 --runs-dir /tmp/runs --reports-dir /tmp/gpu-reports >> "$OUT/$run-bisect.log" 2>&1
echo "exit $? wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/$run-bisect.log"
tail -n 40 "$OUT/$run-bisect.log"
cp /tmp/gpu-reports/$run/bisect.json /tmp/gpu-reports/$run/bisect.md "$OUT/" 2>/dev/null
cp /tmp/runs/$run/bisect.jsonl "$OUT/$run-bisect-rounds.jsonl" 2>/dev/null
true
