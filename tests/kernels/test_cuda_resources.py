"""Resource usage of every CUDA kernel for sm_90 from ptxas (``nvcc --resource-usage``), no GPU needed
(issue 20, guards): static shared memory within the per-block limits, registers and spills recorded
(``record_property`` and the printed table), and no kernel spilling that does not spill today.

Dynamic shared memory is sized at launch. The similarity's fast forward kernel takes D at launch; its
launcher's plan (``loupe_trs_fast_smem_bytes``, host code) is compiled with nvcc into a small host
program and run here for every D up to 1024 and every dtype: every D that is a multiple of 16 bytes
must take the fast kernel within the H100's 232,448 B opt-in limit (and the A100's 166,912 B), with
the query tile resident at the widths it had before (16-bit D <= 256). The Shapley kernels keep
their dynamic shared memory under 96 KiB or opt in where they need more (see the launchers).
Hot kernels (the similarity's forward and backward kernels) must not touch local memory at all
(0-byte stack frame, no spills).
"""
from __future__ import annotations

import os
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
STATIC_SMEM_LIMIT = 48 * 1024          # static __shared__ per block
H100_SMEM_PER_BLOCK = 232448           # opt-in maximum per block on an H100
A100_SMEM_PER_BLOCK = 166912           # opt-in maximum per block on an A100
ARCH = ["-gencode=arch=compute_90,code=sm_90"]

# kernels on the training path: no stack frame (no local memory) and no spills, per variant
HOT_KERNELS = {"fwd_fast_kernel", "fwd_simt_kernel", "dq_kernel", "dk_group_kernel", "dk_sum_kernel",
               "reduce_rows_kernel"}
# variants that must exist (the fp32 tensor-core path in both precisions, the 16-bit fast path, the
# grouped deterministic d_key)
REQUIRED_VARIANTS = {"fwd_fast_kernel<float, true>", "fwd_fast_kernel<float, false>",
                     "fwd_fast_kernel<__nv_bfloat16, false>", "fwd_fast_kernel<__half, false>",
                     "dk_group_kernel", "dk_sum_kernel<float>", "dk_sum_kernel<__nv_bfloat16>"}

# (kernel, first template argument) that spill today (ptxas, sm_90, CUDA 13.0), all off the bf16/fp32
# training path but dk_atomic_kernel (16-bit, 32 B): a new spill anywhere else fails the test.
KNOWN_SPILLS = {
    ("uil_kernel", "double"),             # fp64 loss under its register cap: 16-68 B
    ("maxsim_lanes_kernel", "double"),    # fp64, Lq <= 64: 40 B
    ("dk_atomic_kernel", "__nv_bfloat16"),  # non-deterministic d_key, 16-bit: 32 B stores
    ("dk_atomic_kernel", "__half"),
    ("dk_atomic_kernel", "double"),
}

pytestmark = pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc not found")


def _short_name(mangled: str) -> tuple[str, str]:
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    demangled = demangled.replace("(anonymous namespace)::", "")
    if demangled.startswith("void "):
        demangled = demangled[5:]
    full = demangled.split("(")[0]
    return full.split("<")[0], full


@functools.lru_cache(maxsize=None)
def resource_usage(cu: Path) -> list[dict]:
    proc = subprocess.run([NVCC, "-c", str(cu), "-o", os.devnull, "-std=c++17", f"-I{ROOT / 'csrc'}", *ARCH,
                           "--resource-usage"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, cur, spill = [], None, (0, 0, 0)
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = tuple(int(x) for x in m.groups())
            continue
        m = re.search(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?(?:, \d+ bytes cmem\[\d+\])*\s*$", line)
        if m and cur:
            name, full = _short_name(cur)
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append(dict(file=cu.name, kernel=name, variant=full, regs=int(m.group(1)), stack=spill[0],
                             spill_stores=spill[1], spill_loads=spill[2], smem=int(smem.group(1)) if smem else 0))
            cur, spill = None, (0, 0, 0)
    return rows


@pytest.mark.parametrize("name", ["interaction_loss", "shapley", "token_region_similarity"])
def test_cuda_kernels_resources_sm90(name, record_property):
    rows = resource_usage(ROOT / "csrc" / "cuda" / f"{name}.cu")
    assert rows, "ptxas reported no kernel"
    record_property("ptxas_sm90", rows)
    print(f"\n{name}.cu (sm_90): kernel, registers, stack, spill stores/loads, static smem")
    for r in rows:
        print(f"  {r['variant'][:90]:<90} {r['regs']:>4} {r['stack']:>4} {r['spill_stores']:>4}/{r['spill_loads']:<4}"
              f" {r['smem']:>6}")
    assert all(r["regs"] <= 255 for r in rows)
    over = [r for r in rows if r["smem"] > STATIC_SMEM_LIMIT or r["smem"] > H100_SMEM_PER_BLOCK]
    assert not over, over
    spilling = {(r["kernel"], r["variant"].split("<")[1].split(",")[0].rstrip(">").strip() if "<" in r["variant"] else "")
                for r in rows if r["spill_stores"] or r["spill_loads"]}
    new_spills = sorted(spilling - KNOWN_SPILLS)
    assert not new_spills, f"kernels that now spill registers to local memory: {new_spills}"
    if name == "token_region_similarity":
        variants = {r["variant"] for r in rows}
        assert REQUIRED_VARIANTS <= variants, sorted(REQUIRED_VARIANTS - variants)
        hot = [r for r in rows if r["kernel"] in HOT_KERNELS]
        assert {r["kernel"] for r in hot} == HOT_KERNELS
        local = [(r["variant"], r["stack"], r["spill_stores"], r["spill_loads"]) for r in hot
                 if r["stack"] or r["spill_stores"] or r["spill_loads"]]
        assert not local, f"hot kernels using local memory: {local}"


DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "cuda/token_region_similarity.h"
int main(int argc, char** argv) {
  const int optin = atoi(argv[1]);
  for (int dt : {LOUPE_F32, LOUPE_F16, LOUPE_BF16, LOUPE_F64})
    for (int D = 1; D <= 1024; ++D) {
      int dc = -1;
      const size_t bytes = loupe_trs_fast_smem_bytes(dt, D, optin, &dc);
      printf("%d %d %zu %d\n", dt, D, bytes, dc);
    }
  return 0;
}
"""
ITEMSIZE = {0: 4, 1: 8, 2: 2, 3: 2}  # LoupeDtype -> bytes per element


def test_similarity_fast_kernel_fits_every_d_up_to_1024(tmp_path):
    """Host code only (no GPU call): the launcher's shared-memory plan of the pairwise fast forward for
    D = 1..1024, at the H100's and the A100's opt-in limits."""
    src = tmp_path / "plan.cu"
    src.write_text(DRIVER)
    exe = tmp_path / "plan"
    proc = subprocess.run([NVCC, "-std=c++17", f"-I{ROOT / 'csrc'}", *ARCH, str(src),
                           str(ROOT / "csrc" / "cuda" / "token_region_similarity.cu"), "-o", str(exe)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    static = {r["variant"]: r["smem"] for r in resource_usage(ROOT / "csrc" / "cuda" / "token_region_similarity.cu")
              if r["kernel"] == "fwd_fast_kernel"}
    assert static and all(v == 0 for v in static.values()), static  # all of its shared memory is dynamic
    for limit in (H100_SMEM_PER_BLOCK, A100_SMEM_PER_BLOCK):
        out = subprocess.run([str(exe), str(limit)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        plan = {}
        for line in out.stdout.split("\n"):
            if line:
                dt, D, nbytes, dc = (int(x) for x in line.split())
                plan[dt, D] = (nbytes, dc)
        assert len(plan) == 4 * 1024
        for (dt, D), (nbytes, dc) in plan.items():
            fast = dt != 1 and (D * ITEMSIZE[dt]) % 16 == 0  # fp64 never; D a multiple of 16 bytes
            if not fast:
                assert nbytes == 0, (dt, D, nbytes)
                continue
            assert 0 < nbytes <= limit, (limit, dt, D, nbytes)
            assert dc == D or (dc < D and dc % (16 // ITEMSIZE[dt]) == 0), (dt, D, dc)
        if limit == H100_SMEM_PER_BLOCK:
            for dt in (2, 3):  # 16-bit: the query tile stays resident where it did before (D <= 256)
                assert all(plan[dt, D][1] == D for D in range(8, 257, 8))
            assert plan[0, 128][1] == 128  # fp32 resident at D = 128
            print("\nfast forward plan at the H100 limit (dtype: D -> bytes, D chunk):")
            for dt, name in ((0, "fp32"), (3, "bf16")):
                print(f"  {name}: " + ", ".join(f"{D} -> {plan[dt, D][0]} B, {plan[dt, D][1]}"
                                                for D in (64, 128, 256, 384, 512, 768, 1024)))
