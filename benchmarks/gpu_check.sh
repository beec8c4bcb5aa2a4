#!/usr/bin/env bash
# One-shot check on a CUDA machine without network (python3 there already has torch, triton, transformers):
# build vitos_ext with its CUDA kernels, run the CUDA tests (under compute-sanitizer memcheck when installed),
# then print the benchmark tables; "profile" prints where the end-to-end stages spend their time, and "trainer" (last)
# runs the trainer's CUDA tests (bf16 autocast, packed forward, LoRA).
# Usage: bash benchmarks/gpu_check.sh [ops|attention|e2e|profile|trainer|all] (default all).
# Logs go to $OUT (if set) or /tmp/vitos_gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
log_dir=${OUT:-/tmp/vitos_gpu_check}
mkdir -p "$log_dir"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "build"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pip install --no-build-isolation --no-deps -e . >"$log_dir/build.log" 2>&1 || { tail -40 "$log_dir/build.log"; exit 1; }
python3 -c "import torch, vitos_ext; assert vitos_ext.has_cuda_kernels(), 'no CUDA kernels built'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

tests_for() {
  case $1 in
    ops) echo "tests/test_region_mask.py tests/test_compaction.py" ;;
    attention) echo "tests/test_attention.py" ;;
    e2e) echo "tests/test_models.py tests/test_pipeline.py tests/test_integrations_packed.py tests/test_gpu_e2e.py" ;;
    trainer) echo "tests/test_train_cli.py" ;;
  esac
}
parts=$([ "$what" = all ] && echo "ops attention e2e profile trainer" || echo "$what")
# each step has its own limit so that one slow step cannot starve the rest of a short GPU lease
step_limit=${VITOS_STEP_TIMEOUT:-150}

# per part: its CUDA tests, then its benchmark table
for part in $parts; do
  if [ -n "$(tests_for "$part")" ]; then
    step "CUDA tests: $part"
    timeout "$step_limit" python3 -m pytest -q --maxfail=10 -m cuda -p no:cacheprovider $(tests_for "$part") 2>&1 \
      | tee "$log_dir/tests_$part.log" | tail -25 || status=1
  fi
  if [ "$part" = ops ]; then  # this file runs every test on the GPU when there is one, not only the cuda-marked
    step "fused RMSNorm / SwiGLU / rotary tests on CUDA"
    timeout "$step_limit" python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_fused_ops.py 2>&1 \
      | tee "$log_dir/tests_fused.log" | tail -25 || status=1
  fi
  [ -f "benchmarks/gpu_$part.py" ] || continue  # the trainer part has tests only
  step "benchmark: benchmarks/gpu_$part.py"
  timeout "$step_limit" python3 "benchmarks/gpu_$part.py" 2>&1 | tee "$log_dir/bench_$part.log" || status=1
done

if command -v compute-sanitizer >/dev/null && [[ " $parts " == *" ops "* ]]; then
  step "compute-sanitizer memcheck: core-op CUDA tests (anchor shapes, errors, determinism)"
  timeout "$step_limit" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m cuda \
    -p no:cacheprovider -k "anchor or invalid or deterministic or out_capacity or backward" $(tests_for ops) \
    >"$log_dir/sanitizer.log" 2>&1 && echo "memcheck: clean" || { status=1; tail -30 "$log_dir/sanitizer.log"; }
fi
exit $status
