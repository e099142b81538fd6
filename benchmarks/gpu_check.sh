#!/usr/bin/env bash
# One script for a lent GPU (see DEVELOPERS.md), run from the repository root:
#
#   device run: bash benchmarks/gpu_check.sh        (carry .whl: the cp312 megatron-core wheel)
#
# 1. installs the carried wheels into /tmp/site (the GPU image has torch but no megatron-core);
# 2. single-GPU correctness checks in fp32 and bf16 (benchmarks/gpu_checks.py);
# 3. the GRPO-vs-VP2O step benchmark at a size that fills a good part of an H100
#    (benchmarks/bench_step.py), with the diagnostics-only GRPO as a third column;
# 4. an operator profile of one forward + backward, megatron's layers against VP2O's
#    (benchmarks/profile_step.py: host and device time, kernel launches);
# 5. the Stein transport of one layer against a plain A @ G (benchmarks/bench_transport.py);
# 6. the demo pipeline (SFT, GRPO, VP2O, report) at a short budget, end to end on the GPU;
# then a short table. Each stage has its own time limit; the limits add up to under 10 minutes
# (one device call); on a warm H200 the whole script took about 3.
#
#   device run: bash benchmarks/gpu_check.sh speed  (a second call: issue 21's options on the GPU)
#
# runs instead, after the same set-up: the step benchmark with vp2o's grouped experts and the fused
# attention; bench_attention.py's time and peak memory, local vs sdpa attention on padded vs
# packed micro-batches; and bench_check.py (VP2O's post-update check in its own forward or in the
# next update's, the demo's VP2O phase from a short SFT). Its limits add up to under 10 minutes too.
set -uo pipefail
MODE=${1:-checks}
failed=0  # stages run on after a failure; the exit status says whether any failed
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

if [ "$MODE" = speed ]; then
  echo "== step benchmark, grouped experts + sdpa (bf16)"
  timeout 180 python3 benchmarks/bench_step.py --rounds 10 --instances 1 --layers 4 --hidden 1024 \
    --experts 64 --topk 8 --expert-ffn 768 --seq 4096 --batch 8 --micro-batch 4 --dtype bf16 \
    --set model.moe_grouped_gemm=true model.core_attention=sdpa 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_step_fast.txt" || failed=1
  echo "== attention and packing: learner forward + backward time and peak memory (bf16)"
  timeout 200 python3 benchmarks/bench_attention.py --layers 4 --hidden 1024 --heads 16 --groups 4 \
    --experts 64 --topk 8 --expert-ffn 768 --seq 4096 --batch 8 --micro-batch 4 --dtype bf16 \
    --repeats 3 2>&1 | grep -v -i -E "warn|USDT" | tee "$OUT/bench_attention.txt" || failed=1
  echo "== the post-update check in its own forward or in the next update's"
  timeout 60 python3 -m vp2o.cli sft --config examples/vp2o/configs/demo_sft.yaml sft.steps=200 \
    train.run_dir=/tmp/speed_sft train.wandb_mode=disabled 2>&1 | tail -n 2
  timeout 150 python3 benchmarks/bench_check.py --rounds 2 --steps 8 \
    --set data.tokenizer_path=/tmp/speed_sft/tokenizer.model \
    train.init_checkpoint=/tmp/speed_sft/checkpoints 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_check.txt" || failed=1
  echo "== summary"
  printf '%-44s %s\n' "GPU" "$(cat "$OUT/gpu.txt")"
  printf '%-44s %s\n' "grouped + sdpa (bench_step, bf16)" "$(tail -n 1 "$OUT/bench_step_fast.txt")"
  printf '%-44s %s\n' "check in the next forward" "$(tail -n 1 "$OUT/bench_check.txt")"
  exit $failed
fi

echo "== correctness (fp32, bf16)"
timeout 150 python3 benchmarks/gpu_checks.py 2>&1 | grep -v -i -E "warn|USDT" | tee "$OUT/checks.txt" || failed=1

echo "== step benchmark"
# One model per mode: three instances of this size (~12 GB each with the distributed optimizer's
# state) plus activations would not fit an 80 GB card; the CPU default of 3 is for the CPU's
# per-instance layout effects.
timeout 180 python3 benchmarks/bench_step.py --rounds 10 --instances 1 --layers 4 --hidden 1024 \
  --experts 64 --topk 8 --expert-ffn 768 --seq 4096 --batch 8 --micro-batch 4 --dtype bf16 \
  --with-diagnostics 2>&1 | grep -v -i warn | tee "$OUT/bench_step.txt" || failed=1

echo "== where VP2O's forward + backward time goes (operator profile, bf16)"
timeout 100 python3 benchmarks/profile_step.py --layers 4 --hidden 1024 --experts 64 --topk 8 \
  --expert-ffn 768 --seq 4096 --dtype bf16 --repeats 8 --profiled 2 --rows 30 2>&1 \
  | grep -v -i -E "warn|USDT" | tee "$OUT/profile_step.txt" || failed=1

echo "== transport of one layer vs A @ G (fp32)"
timeout 60 python3 benchmarks/bench_transport.py --device cuda --experts 8 64 128 --repeats 20 \
  2>&1 | grep -v -i warn | tee "$OUT/bench_transport.txt" || failed=1

echo "== demo pipeline, short budget"
timeout 100 python3 -m vp2o.cli demo --out /tmp/demo sft.steps=40 train.steps=12 \
  data.num_eval_prompts=64 2>&1 | grep -v -i -E "warn|^wandb" | tail -n 20 | tee "$OUT/demo.txt" || failed=1
cp /tmp/demo/report.md "$OUT/demo_report.md" 2>/dev/null || true

echo "== summary"
printf '%-44s %s\n' "GPU" "$(cat "$OUT/gpu.txt")"
printf '%-44s %s\n' "correctness checks" "$(tail -n 1 "$OUT/checks.txt")"
printf '%-44s %s\n' "step time ratio (bench_step, bf16)" "$(tail -n 1 "$OUT/bench_step.txt")"
printf '%-44s %s\n' "demo pipeline" "$(tail -n 3 "$OUT/demo.txt" | tr '\n' ' ')"
exit $failed
