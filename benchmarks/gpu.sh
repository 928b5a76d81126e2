#!/usr/bin/env bash
# The prepared GPU check (issue #3): on a machine with an NVIDIA GPU (H100/H200, no network needed),
# build the CUDA extension against this machine's torch, run the GPU tests and the GPU benchmarks,
# and print one table, in under 8 minutes (every step has a timeout cut from one 450 s deadline).
# Every step runs even if an earlier one failed; each step's exit code is recorded and the script
# exits non-zero if any failed. Outputs (logs, gpu_results.md, gpu_bench.json) go to $OUT (default
# ./gpu-out). Needs pytest and pytest-benchmark. Tests run with plain `pytest` (importlib import
# mode, repo root not on sys.path) so that the installed, CUDA-built package is imported.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
: > "$OUT/steps.txt"
START=$(date +%s)
DEADLINE=$(( START + ${LOUPE_GPU_BUDGET_S:-450} ))
failed=0

step() {  # step NAME MAX_SECONDS LOGFILE CMD...: run CMD with a timeout, log it, record its exit code
  local name=$1 cap=$2 log=$3 t0 rc left
  shift 3
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  [ "$left" -lt "$cap" ] && cap=$left
  echo "== $name (timeout ${cap} s)"
  if [ "$cap" -lt 10 ]; then
    rc=124
    echo "no time left" > "$log"
  elif timeout --signal=INT --kill-after=20 "$cap" "$@" > "$log" 2>&1; then
    rc=0
  else
    rc=$?  # 124: timed out (pytest got SIGINT and still wrote its summary)
  fi
  tail -n 30 "$log" || true
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s (log: $log)"
  echo "$name: exit=$rc seconds=$(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  if [ "$rc" -ne 0 ]; then failed=1; fi
  return 0
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi failed"
  python -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || true
  python -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc not on PATH"
} | tee "$OUT/gpu.txt"

# setuptools >= 77, build requirements, numpy, pytest, nvcc of torch's CUDA major version: each problem
# printed with what to install (the later steps still run, and fail with their own logs)
step "preflight: python benchmarks/gpu_preflight.py" 60 "$OUT/preflight.log" python benchmarks/gpu_preflight.py

export LOUPE_CUDA_ARCHS=${LOUPE_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
step "build: pip install --no-build-isolation --no-deps ." 270 "$OUT/build.log" \
  python -m pip install --no-build-isolation --no-deps -v .
# from outside the source tree, so that the installed (CUDA-built) package is imported
step "backends: python -m loupe_kernels.env" 60 "$OUT/env.log" bash -c "cd /tmp && python -m loupe_kernels.env"

# the CUDA kernels' own tests first (skipped, with the reason, if the cuda backend did not build)
CUDA_TESTS=(tests/kernels/test_token_region_similarity_cuda.py tests/kernels/test_shapley_cuda.py)
step "CUDA kernel tests" 120 "$OUT/tests_cuda.log" \
  pytest -q -rfEs -m "not slow" -p no:cacheprovider --durations=10 "${CUDA_TESTS[@]}"

# -m gpu: only the GPU benchmarks (the CPU ones are not marked gpu)
step "GPU benchmarks" 150 "$OUT/bench.log" \
  pytest benchmarks/ --benchmark-only -m gpu -q -rfEs -p no:cacheprovider \
    --results-md "$OUT/gpu_results.md" --benchmark-json "$OUT/gpu_bench.json"

# everything else in tests/kernels and tests/triton (Triton on the device here); no -x, so that one
# failure does not hide the others
IGNORES=()
for f in "${CUDA_TESTS[@]}"; do IGNORES+=(--ignore="$f"); done
step "kernel and Triton tests" 240 "$OUT/tests.log" \
  pytest tests/kernels tests/triton -q -rfEs -m "not slow" -p no:cacheprovider --durations=10 "${IGNORES[@]}"

if [ -f "$OUT/gpu_bench.json" ]; then
  python - "$OUT/gpu_bench.json" <<'PY' | tee "$OUT/gpu_table.md" || true
import json, sys
d = json.load(open(sys.argv[1]))
print("| group | variant | median ms | TFLOP/s | peak GiB | device | note |")
print("|---|---|---|---|---|---|---|")
for b in sorted(d["benchmarks"], key=lambda b: (b["group"] or "", b["extra_info"].get("variant", ""))):
    e = b["extra_info"]
    tf = f"{e['tflops']:.1f}" if "tflops" in e else ""
    mem = f"{e['peak_gpu_mem_gb']:.1f}" if "peak_gpu_mem_gb" in e else ""
    print(f"| {b['group']} | {e.get('variant', b['name'])} | {b['stats']['median'] * 1e3:.3f} | {tf} | {mem} "
          f"| {e.get('device', '')} | {e.get('note', '')} |")
PY
fi
if [ -f "$OUT/gpu_results.md" ]; then cat "$OUT/gpu_results.md"; fi
echo "== steps ($(( $(date +%s) - START )) s in all)"
cat "$OUT/steps.txt"
exit $failed
