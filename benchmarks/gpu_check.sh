#!/usr/bin/env bash
# One script for a lent GPU (see DEVELOPERS.md), run from the repository root:
#
#   device run: bash benchmarks/gpu_check.sh        (carry .whl: the cp312 megatron-core wheel)
#
# 1. installs the carried wheels into /tmp/site (the GPU image has torch but no megatron-core);
# 2. single-GPU correctness checks in fp32 and bf16 (benchmarks/gpu_checks.py);
# 3. the GRPO-vs-VP2O step benchmark at a size that fills a good part of an H100
#    (benchmarks/bench_step.py), then a short table. Stays well under 8 minutes.
set -euo pipefail
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)"

echo "== correctness (fp32, bf16)"
timeout 240 python3 benchmarks/gpu_checks.py 2>&1 | grep -v -i warn | tee "$OUT/checks.txt"

echo "== step benchmark"
# One model per mode: three instances of this size (~12 GB each with the distributed optimizer's
# state) plus activations would not fit an 80 GB card; the CPU default of 3 is for the CPU's
# per-instance layout effects.
timeout 300 python3 benchmarks/bench_step.py --rounds 10 --instances 1 --layers 4 --hidden 1024 \
  --experts 64 --topk 8 --expert-ffn 768 --seq 4096 --batch 8 --micro-batch 4 --dtype bf16 2>&1 \
  | grep -v -i warn | tee "$OUT/bench_step.txt"

echo "== summary"
printf '%-44s %s\n' "GPU" "$(cat "$OUT/gpu.txt")"
printf '%-44s %s\n' "correctness checks" "$(tail -n 1 "$OUT/checks.txt")"
printf '%-44s %s\n' "step time ratio (bench_step, bf16)" "$(tail -n 1 "$OUT/bench_step.txt")"
