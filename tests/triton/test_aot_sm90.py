"""Ahead-of-time compile of every Triton kernel for sm_90 (H100) by the real Triton compiler, no GPU
needed (issue 20, guards): shared memory of every configuration within the H100's per-block limit,
registers and spills recorded (``record_property`` and the printed table), spills asserted absent
where they are today.

The full sweep (``slow``): D in {64, 128, 256, 384, 512, 768, 1024} and fp32/bf16/fp16 (fp64 at
the largest D) through the launch configuration the launchers use (``_config`` and the block rules of
``triton_shapley``), every kernel; D is a runtime argument, so only distinct configurations are
compiled (about 90 s on 2 cores with an empty Triton cache). The default test compiles a subset
(the similarity at every D in bf16 and fp32, one configuration of every other kernel), about 20 s.
"""
from __future__ import annotations

import json

import pytest

from _kernel_testing import run_aot_script

H100_SMEM_PER_BLOCK = 232448  # 227 KiB: the most one block may opt in to on an H100
D_SWEEP = (64, 128, 256, 384, 512, 768, 1024)

# run after _kernel_testing.AOT_PRELUDE (imports, compile_one, the rows in `out`)
_SCRIPT = r'''
from loupe_kernels import triton_token_region_similarity as T
from loupe_kernels import triton_shapley as S
from loupe_kernels import triton_interaction_loss as U

D_SWEEP = json.loads(sys.argv[2])
FULL = sys.argv[3] == "full"
DT = {"fp32": (torch.float32, "*fp32", "tf32x3"), "bf16": (torch.bfloat16, "*bf16", "ieee"),
      "fp16": (torch.float16, "*fp16", "ieee"), "fp64": (torch.float64, "*fp64", "ieee")}
ACC = {"fp64": tl.float64}

# token-region similarity: forward, d_query, d_key at the GPU target shape, every D and dtype
Bq, Bk, Lq, Lk = 1024, 1024, 32, 196
for dt in (("bf16", "fp16", "fp32", "fp64") if FULL else ("bf16", "fp32")):
    tdt, P, prec = DT[dt]
    size = torch.empty((), dtype=tdt).element_size()
    for D in (D_SWEEP if dt != "fp64" else [max(D_SWEEP)]):
        for pw in ((True, False) if FULL and D in (256, max(D_SWEEP)) else (True,)):
            c = T._config(Bq, Bk, Lq, Lk, D, pw, size)
            common = dict(PAIRWISE=pw, LQ_PAD=c.lq_pad, ACC=ACC.get(dt, tl.float32))
            ptrs = {"*": P, "qm_ptr": "*u8", "km_ptr": "*u8", "amax_ptr": "*i32",
                    "cnt_ptr": "*fp64" if dt == "fp64" else "*fp32"}
            vals = dict(Bq=Bq, Bk=Bk, Lq=Lq, Lk=Lk, D=D, s_ga=Bk if pw else 1, s_gb=1 if pw else 0)
            row = dict(dtype=dt, D=D, pairwise=pw)
            compile_one(T._fwd_kernel, {**common, **dict(
                ITEMS_B=c.items_b, BLOCK_A=c.fwd_block_a, ROWS=c.fwd_block_a * c.lq_pad, BLOCK_K=c.block_k,
                BLOCK_D=c.fwd_block_d, ONE_D=c.one_d, UPCAST=False, PREC=prec)}, ptrs, vals, c.fwd_warps, row)
            compile_one(T._dq_kernel, {**common, **dict(
                BLOCK_A=c.dq_block_a, ROWS=c.dq_block_a * c.lq_pad, BLOCK_D=c.dq_block_d)}, ptrs, vals,
                c.bwd_warps, row)
            compile_one(T._dk_kernel, {**common, **dict(
                BLOCK_A=c.dk_block_a, COLS=c.dk_block_a * c.lq_pad, BLOCK_KR=c.dk_block_kr, BLOCK_D=c.dk_block_d,
                UPCAST=False, PREC=prec)}, ptrs, vals, c.bwd_warps, row)
            compile_one(T._dk_grouped_kernel, dict(PAIRWISE=pw, ACC=ACC.get(dt, tl.float32), BLOCK_E=c.dkg_block_e,
                                                   BLOCK_D=c.dkg_block_d),
                        {**ptrs, "order_ptr": "*i64", "start_ptr": "*i64"}, vals, 4, row)

# Shapley: max-sim game over Lq (both games), coalitions; K = 64 samples, n = 196
K, n, M = 64, 196, 16
for dt in (("bf16", "fp32", "fp64") if FULL else ("fp32",)):
    tdt, P, _ = DT[dt]
    acc = ACC.get(dt, tl.float32)
    ptrs = {"*": P, "S_ptr": "*u8", "pm_ptr": "*u8", "qm_ptr": "*u8", "gidx_ptr": "*i64",
            "samples_ptr": "*fp64" if dt == "fp64" else "*fp32"}
    for Lq_, qp in (((32, False), (64, False), (32, True)) if FULL else ((32, False),)):
        BLOCK_Q = max(16, triton.next_power_of_2(Lq_))
        BLOCK_K = max(16, min(S._block_k(K), 4096 // BLOCK_Q))  # as S.maxsim_samples
        compile_one(S._maxsim_kernel, dict(SCHED=0, QP=qp, HAS_INDEX=True, ACC=acc, BLOCK_K=BLOCK_K, BLOCK_Q=BLOCK_Q,
                                           BLOCK_P=S._block_p(n + (Lq_ if qp else 0))),
                    ptrs, dict(K=K, M=M, Lq=Lq_, n=n), 4, dict(dtype=dt, Lq=Lq_, query_players=qp))
compile_one(S._coalitions_kernel, dict(SCHED=0, BLOCK_K=S._block_k(K), BLOCK_P=S._block_p(n)),
            {"*": "*u8", "coal_ptr": "*i8"}, dict(K=K, M=M, P=n), 4, dict(dtype="-"))

# interaction loss: every mode, with and without target_var and weight
for dt in (("bf16", "fp32", "fp64") if FULL else ("fp32",)):
    tdt, P, _ = DT[dt]
    wp = "*fp64" if dt == "fp64" else "*fp32"
    ptrs = {"*": P, "gmu_ptr": wp, "gv_ptr": wp, "part_ptr": wp, "status_ptr": "*i32"}
    for mode in ((0, 1, 2, 3) if FULL else (2,)):
        for flags in (((False, False), (True, True)) if FULL else ((True, True),)):
            compile_one(U._uil_kernel, dict(MODE=mode, MEAN=mode == 2, HAS_TV=flags[0], HAS_W=flags[1],
                                            F64=dt == "fp64", BLOCK=U.BLOCK),
                        ptrs, dict(n=1 << 20), 4, dict(dtype=dt, mode=mode, tv_w=flags[0]))
print(json.dumps(out))
'''


def _compile(full: bool) -> list[dict]:
    return run_aot_script(_SCRIPT, json.dumps(list(D_SWEEP)), "full" if full else "subset", timeout=900)


def _check(rows: list[dict], full: bool, record_property) -> None:
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_fwd_kernel", "_dq_kernel", "_dk_kernel", "_dk_grouped_kernel", "_maxsim_kernel",
                       "_coalitions_kernel", "_uil_kernel"}, kernels
    fwd_d = {(r["dtype"], r["D"]) for r in rows if r["kernel"] == "_fwd_kernel"}
    want = [(dt, D) for dt in ("bf16", "fp16", "fp32") for D in D_SWEEP] if full else \
        [(dt, D) for dt in ("bf16", "fp32") for D in (256, 1024)]
    assert set(want) <= fwd_d, sorted(set(want) - fwd_d)
    record_property("aot_sm90", json.dumps(rows))
    print("\nkernel         dtype  D/Lq  regs  stack(spill B)  smem B")
    for r in rows:
        print(f"{r['kernel']:<14} {r['dtype']:<5} {r.get('D', r.get('Lq', '-'))!s:>5} {r['regs']:>5} "
              f"{r['stack']:>8} {r['smem']:>12}")
    over = [r for r in rows if r["smem"] > H100_SMEM_PER_BLOCK]
    assert not over, over
    # no register spills where there are none today: the similarity in 16-bit and fp32 at every D (the
    # fp64 path is not a target), and the loss (the Shapley kernels' few spills are recorded only)
    spills = [r for r in rows if r["stack"] > 0 and (
        (r["kernel"] in ("_fwd_kernel", "_dq_kernel", "_dk_kernel", "_dk_grouped_kernel") and r["dtype"] != "fp64")
        or r["kernel"] == "_uil_kernel")]
    assert not spills, spills


def test_triton_kernels_fit_h100_subset(record_property):
    """Default run: the similarity at every D in bf16 and fp32 (D = 256: whole D in one tile; above: D
    walked in chunks), one configuration of each other kernel."""
    _check(_compile(full=False), False, record_property)


@pytest.mark.slow
def test_triton_kernels_fit_h100_full_sweep(record_property):
    """Every kernel over D in {64, ..., 1024} and fp32/bf16/fp16 (fp64 at D = 1024)."""
    _check(_compile(full=True), True, record_property)
