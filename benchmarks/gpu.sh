#!/usr/bin/env bash
# The prepared GPU check (issue #3): on a machine with an NVIDIA GPU (H100/H200, no network needed,
# under 8 minutes), build the CUDA extension against this machine's torch, run the GPU tests and the
# GPU benchmarks, and print one table. Every step runs even if an earlier one failed; the exit code
# is non-zero if any step failed. Outputs go to $OUT (default ./gpu-out). Needs pytest and
# pytest-benchmark; `pytest` (not `python -m pytest`) so that the installed CUDA build is imported.
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
: > "$OUT/steps.txt"
failed=0

step() {  # step NAME LOGFILE CMD...
  local name=$1 log=$2 start rc
  shift 2
  echo "== $name"
  start=$(date +%s)
  "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  echo "== $name: exit $rc in $(( $(date +%s) - start )) s (log: $log)"
  echo "$name exit=$rc seconds=$(( $(date +%s) - start ))" >> "$OUT/steps.txt"
  [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

export LOUPE_CUDA_ARCHS=${LOUPE_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
step "build (pip install --no-build-isolation --no-deps .)" "$OUT/build.log" \
  python -m pip install --no-build-isolation --no-deps -v .
# run from outside the source tree so that the installed (CUDA-built) package is imported
step "backends" "$OUT/env.log" bash -c "cd /tmp && python -m loupe_kernels.env"

step "GPU tests (cuda and triton backends)" "$OUT/tests.log" \
  pytest -q -m "not slow" \
    tests/kernels/test_token_region_similarity_cuda.py tests/kernels/test_shapley_cuda.py \
    tests/triton tests/kernels/test_token_region_similarity.py tests/kernels/test_interaction_loss.py

step "GPU benchmarks" "$OUT/bench.log" \
  pytest benchmarks/ --benchmark-only -m gpu -q \
    --results-md "$OUT/gpu_results.md" --benchmark-json "$OUT/gpu_bench.json"

if [ -f "$OUT/gpu_bench.json" ]; then
  python - "$OUT/gpu_bench.json" <<'PY' | tee "$OUT/gpu_table.md"
import json, sys
d = json.load(open(sys.argv[1]))
dev = d.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
print("| group | variant | median ms | TFLOP/s | x floor | device |")
print("|---|---|---|---|---|---|")
for b in sorted(d["benchmarks"], key=lambda b: (b["group"] or "", b["extra_info"].get("variant", ""))):
    e = b["extra_info"]
    tf = f"{e['tflops']:.1f}" if "tflops" in e else ""
    xf = f"{e['x_floor']:.2f}" if "x_floor" in e else ""
    print(f"| {b['group']} | {e.get('variant', b['name'])} | {b['stats']['median'] * 1e3:.3f} | {tf} | {xf} | {e.get('device', '')} |")
PY
  [ -f "$OUT/gpu_results.md" ] && cat "$OUT/gpu_results.md"
fi
echo "== steps"; cat "$OUT/steps.txt"
exit $failed
