"""Shared by the kernel tests of tests/kernels and tests/triton: the independent float64 oracles, their
test inputs, the tolerance checks against them, the Triton module guard and the ahead-of-time compile
runner. Imported as ``_kernel_testing`` (tests/conftest.py puts tests/kernels on ``sys.path``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import loupe_kernels as lk


# ------------------------------------------------------------------------------------------------
# token_region_similarity: independent float64 oracle, loops over pairs and tokens, explicit first
# arg-max, explicit gradients
# ------------------------------------------------------------------------------------------------
def trs_oracle(q, k, qm, km, pairwise, gout=None):
    """(out, d_query, d_key, argmax) in float64 on the CPU; argmax -1 where no valid query token or
    key item; zero gradients without ``gout``."""
    q, k, qm, km = q.double().cpu(), k.double().cpu(), qm.cpu(), km.cpu()
    Bq, Lq, _ = q.shape
    Bk, Lk = k.shape[0], k.shape[1]
    shape = (Bq, Bk) if pairwise else (Bq,)
    pairs = [(a, b) for a in range(Bq) for b in range(Bk)] if pairwise else [(a, a) for a in range(Bq)]
    out = torch.zeros(shape, dtype=torch.float64)
    amax = torch.full((*shape, Lq), -1, dtype=torch.int32)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    for a, b in pairs:
        at = (a, b) if pairwise else (a,)
        qi = [j for j in range(Lq) if qm[a, j]]
        ki = [i for i in range(Lk) if km[b, i]]
        if not qi or not ki:
            continue
        w = 0.0 if gout is None else float(gout.double().cpu()[at]) / len(qi)
        scores = (q[a, qi] @ k[b, ki].T).tolist()
        total = 0.0
        for r, j in enumerate(qi):
            best = max(scores[r])
            i = ki[scores[r].index(best)]  # first occurrence = lowest key index
            total += best
            amax[(*at, j)] = i
            dq[a, j] += w * k[b, i]
            dk[b, i] += w * q[a, j]
        out[at] = total / len(qi)
    return out, dq, dk, amax


def random_masks(Bq, Lq, Bk, Lk, gen):
    qm = torch.rand(Bq, Lq, generator=gen) > 0.3
    km = torch.rand(Bk, Lk, generator=gen) > 0.3
    if Bq > 1:
        qm[1] = False  # a fully masked query item
    if Bk > 2:
        km[2] = False  # a fully masked key item
    return qm, km


def quantized(shape, gen, levels=6):
    """Entries m/4 with |m| <= levels: exact in fp16/bf16, dot products exact in fp32, so every
    backend sees the same scores and the same arg-max (ties included)."""
    return torch.randint(-levels, levels + 1, shape, generator=gen).double() / 4


def tol_bound(dtype, ref_err, scale):
    """Allowed error of a backend in `dtype`: twice the error of the same PyTorch math in that dtype,
    plus one unit of rounding of the output's magnitude."""
    return 2 * ref_err + torch.finfo(dtype).eps * max(scale, 1.0)


def check_trs_compiles_fullgraph(q, k, backend):
    """torch.compile (aot_eager, fullgraph) of a loss through token_region_similarity on `backend`: the
    same value and gradients as eager."""
    def loss(q, k):
        return (lk.token_region_similarity(q, k, backend=backend) * 2.0).logsumexp(dim=1).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = compiled(q, k)
    gq, gk = torch.autograd.grad(got, (q, k))
    want = loss(q, k)
    wq, wk = torch.autograd.grad(want, (q, k))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gk, wk)


# ------------------------------------------------------------------------------------------------
# shapley_interaction: a backend's (estimate, standard error) against the reference
# ------------------------------------------------------------------------------------------------
def shapley_references(sim, sub, **kw):
    """(float64 reference, reference in the dtype of ``sim``) of shapley_interaction(sim, sub, **kw)."""
    return (lk.shapley_interaction(sim.double(), sub, backend="reference", **kw),
            lk.shapley_interaction(sim, sub, backend="reference", **kw))


def check_invalid_players_change_nothing(sim, sub, pm, backend, **kw):
    """What the invalid players (``pm`` False) hold in ``sim`` changes neither the estimate nor its
    standard error (with ``query_players=True`` the keys' part of ``pm`` marks the columns of sim)."""
    keys = pm[:, sim.shape[1]:] if kw.get("query_players") else pm
    a = lk.shapley_interaction(sim, sub, player_mask=pm, backend=backend, **kw)
    sim2 = torch.where(keys[:, None, :], sim, torch.full_like(sim, 1e4))
    b = lk.shapley_interaction(sim2, sub, player_mask=pm, backend=backend, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def additive_game(device, M=2):
    """Two max-sim games with sim = diag(w) over 8 players, additive in the players, so every interaction
    is exactly 0; subsets {0, 1}, {2, 3, 4}, then (M = 3) the singleton {5}."""
    w = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0, 1.0, 4.0, 2.0])
    sim = torch.diag(w)[None].repeat(2, 1, 1).to(device)
    sub = torch.zeros(2, M, 8, dtype=torch.bool, device=device)
    sub[:, 0, [0, 1]] = True
    sub[:, 1, [2, 3, 4]] = True
    if M > 2:
        sub[:, 2, 5] = True
    return sim, sub


def shapley_tol(ref_lo, ref64, scale, dtype):
    """2x the error of the same PyTorch math in the working dtype (float32, float64 for float64 input),
    plus one rounding unit of the magnitude of a sample (``scale``: (max |S| + 2) times the largest
    value a term can take)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 2 * float((ref_lo.double() - ref64.double()).abs().max()) + eps * scale


def check_shapley_close(out, ref_lo, ref64, scale, dtype):
    """``out`` (estimate, se) in the working dtype and within ``shapley_tol`` of the float64 reference
    ``ref64``; ``ref_lo`` is the reference run in the input's dtype."""
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for i in range(2):
        err = float((out[i].double().cpu() - ref64[i].double().cpu()).abs().max())
        assert err <= shapley_tol(ref_lo[i].cpu(), ref64[i].cpu(), scale, dtype), (i, err)


# ------------------------------------------------------------------------------------------------
# uncertainty_interaction_loss: independent float64 oracle, its inputs, a backend's loss and grads
# ------------------------------------------------------------------------------------------------
def uil_oracle(mu, lv, t, tv=None, w=None, reduction="mean"):
    """(loss, d loss / d mu, d loss / d log_var) in float64, from the formulas of METHOD section 8."""
    mu, lv, t = mu.double(), lv.double(), t.double()
    shape = mu.shape
    tv = torch.zeros(shape, dtype=torch.float64) if tv is None else tv.double().expand(shape)
    w = torch.ones(shape, dtype=torch.float64) if w is None else w.double().expand(shape)
    live = w != 0
    t = torch.where(live, t, mu)
    tv = torch.where(live, tv, torch.zeros_like(tv))
    var = torch.exp(lv) + tv
    r = t - mu
    loss = 0.5 * (r * r / var + torch.log(var))
    dmu = -r / var
    dlv = 0.5 * torch.exp(lv) / var * (1 - r * r / var)
    loss, dmu, dlv = (torch.where(live, w * x, torch.zeros_like(x)) for x in (loss, dmu, dlv))
    n = max(mu.numel(), 1)
    if reduction == "none":
        return loss, dmu, dlv
    if reduction == "sum":
        return loss.sum(), dmu, dlv
    return loss.sum() / n, dmu / n, dlv / n


def uil_inputs(shape, gen, dtype=torch.float64, lv_scale=3.0, with_tv=False, with_w=False):
    """(mu, log_var, target, target_var or None, weight or None) in `dtype` on the CPU; residuals
    about 1.5 standard deviations, some weights exactly zero."""
    mu = torch.randn(shape, generator=gen, dtype=torch.float64)
    lv = lv_scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    t = mu + torch.randn(shape, generator=gen, dtype=torch.float64) * torch.exp(0.5 * lv) * 1.5
    tv = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.5 if with_tv else None
    w = None
    if with_w:
        w = torch.rand(shape, generator=gen, dtype=torch.float64) * 2
        w[w < 0.3] = 0.0
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(mu), cast(lv), cast(t), cast(tv), cast(w)


def uil_run(backend, mu, lv, t, tv, w, reduction, grad_out=None):
    """(loss, d mu, d log_var) of `backend`, the gradients for ``grad_out`` (ones without it)."""
    mu = mu.detach().clone().requires_grad_()
    lv = lv.detach().clone().requires_grad_()
    out = lk.uncertainty_interaction_loss(mu, lv, t, target_var=tv, weight=w, reduction=reduction, backend=backend)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    dmu, dlv = torch.autograd.grad(out, (mu, lv), g)
    return out, dmu, dlv


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------
def require_triton_runs() -> str:
    """Skips the calling test module unless Triton kernels can run here (the interpreter, set up by
    tests/conftest.py without a GPU, or a CUDA device) and triton imports; returns the device to run on."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device",
                    allow_module_level=True)
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


# The start of every ahead-of-time compile script: imports (exit 3, a skip, without the real compiler or
# cuobjdump), and compile_one, which compiles a kernel for sm_90 as the launcher specialises it and
# appends its registers, stack (spill bytes), shared memory and cp.async count to `out`.
AOT_PRELUDE = r'''
import json, os, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
try:
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print("SKIP", e); sys.exit(3)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if not os.path.exists(cuobjdump):
    print("SKIP no cuobjdump in the triton wheel"); sys.exit(3)
seen, out = {}, []


def compile_one(fn, consts, ptr_types, vals, warps, row):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, ptr_types["*"])
        elif name == "seed":
            sig[name] = "u64"
        else:
            sig[name] = "i32"
    # as the launcher specialises them: aligned pointers and ints divisible by 16 get the hint
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or (sig[name] == "i32" and vals.get(name, 1) % 16 == 0 and vals.get(name))}
    key = (fn.__name__, repr(sorted(consts.items(), key=str)), repr(sorted(sig.items())), warps,
           repr(sorted(attrs)))
    if key not in seen:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
        seen[key] = dict(regs=int(m.group(1)), stack=int(m.group(2)), smem=int(k.metadata.shared),
                         pipelined=k.asm["ttgir"].count("async_copy_global_to_local"))
    out.append({"kernel": fn.__name__, **row, **seen[key]})
'''


def run_aot_script(body: str, *args: str, timeout: int) -> list[dict]:
    """Runs ``AOT_PRELUDE + body`` (which ends by printing ``json.dumps(out)``) in a fresh Python with
    the real Triton compiler (TRITON_INTERPRET removed), the installed package first on its path and
    ``args`` after it; returns the rows, or skips the test where the compiler or cuobjdump is missing."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(lk.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", AOT_PRELUDE + body, pkg_root, *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
