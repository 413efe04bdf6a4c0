# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Fast attention on a CPU: Numba kernels and where the time goes
#
# Stage 05 wrote FlashAttention with NumPy tiles: exact, $O(N)$ extra memory, but slow — every tile
# pays Python's overhead. This notebook compiles the **same FlashAttention-2 loops** with Numba
# (`attention_ref.flash_numba`) and asks how close they get to the production CPU kernel
# (`torch.nn.functional.scaled_dot_product_attention`) and to the machine's matrix-multiply ceiling.
#
# 1. FLOPs and bytes: why attention is quadratic, and why the materialised version is memory-bound.
# 2. Check: the Numba kernels agree with the stage-05 NumPy `flash_attention` and with the stage-02
#    reference, masks included (pictures of the weights they imply).
# 3. How a tile's working set fits the cache.
# 4. Measured time and memory against $N$ (from `benchmarks/bench_cpu.py`).
# 5. The sequence of changes from a plain loop to the optimised kernel, with GFLOP/s after each.
# 6. When to use which implementation.

# %%
import json
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from attention_ref import (
    causal_mask,
    numba_flash_backward,
    numba_flash_forward,
    plot_attention,
    save_figure,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from attention_ref.flash import attention_backward, attention_weights_from_lse, flash_attention
from attention_ref.flash_numba import BLOCK_K, BLOCK_Q

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1 · FLOPs and bytes
#
# For one head with $N$ queries and keys of dimension $d$, attention is two matrix products and a
# softmax:
#
# $$S = \tau QK^\top \;(2N^2d\text{ FLOPs}),\qquad P = \operatorname{softmax}(S)\;(\approx 5N^2),
# \qquad O = PV \;(2N^2d).$$
#
# So the forward pass costs $4N^2d$ FLOPs (half of it with a causal mask, if masked tiles are skipped)
# and the backward pass $2.5\times$ that ($\,dV = P^\top dO$, $dP = dO\,V^\top$, $dQ = \tau\,dS\,K$,
# $dK = \tau\,dS^\top Q$, plus recomputing $S$). Doubling $N$ quadruples the work: that is the
# quadratic cost, and no exact algorithm avoids it.
#
# What the tiles change is the **bytes**. The materialised version writes the $N\times N$ matrices
# $S$ and $P$ to memory and reads them back; FlashAttention keeps a tile of them in cache and only
# touches $Q, K, V, O$: $O(Nd)$ bytes per query block.

# %%
d = 64
print(f"{'N':>6} {'GFLOP fwd':>10} {'MB materialised (f32)':>22} {'MB tiled (f32)':>15} {'FLOP/byte mat.':>15}")
for N in [512, 1024, 2048, 4096, 8192, 16384]:
    flops = 4 * N * N * d
    mat_bytes = 4 * (3 * N * d + N * d) + 4 * 4 * N * N  # Q K V O once + S, P written and read
    tiled_bytes = 4 * (4 * N * d)
    print(f"{N:6d} {flops / 1e9:10.2f} {mat_bytes / 2**20:22.1f} {tiled_bytes / 2**20:15.2f} "
          f"{flops / mat_bytes:15.1f}")

# %% [markdown]
# At about 16 FLOPs per byte, the materialised version is limited by memory bandwidth long before the
# FMA units are busy; a tiled kernel whose working set stays in cache can be limited by arithmetic
# instead. Memory is the second problem: at $N = 16384$ one float32 $N\times N$ matrix is 1 GiB.
#
# ## 2 · Same results as the previous stages
#
# `numba_flash_forward(q, k, v, ...)` returns the output and the per-row logsumexp, like
# `flash_attention(..., return_lse=True)` from stage 05. Two tiers: `kernel="readable"` is the
# FlashAttention-2 loop nest written element by element, `kernel="fast"` the optimised one. Sizes
# below are deliberately not multiples of the blocks, with a causal mask aligned bottom-right and a
# sliding window.

# %%
rng = np.random.default_rng(0)
B, H, L, S, E = 2, 3, 77, 301, 59
q = xp.asarray(rng.standard_normal((B, H, L, E)))
k = xp.asarray(rng.standard_normal((B, H, S, E)))
v = xp.asarray(rng.standard_normal((B, H, S, E)))
kw = dict(is_causal=True, causal_alignment="bottom_right", window=(90, None))

mask = causal_mask(L, S, "bottom_right") & sliding_window_mask(L, S, 90, None, "bottom_right")
reference = scaled_dot_product_attention(q, k, v, attn_mask=mask)  # stage 02, materialised
tiles_numpy, lse_numpy = flash_attention(q, k, v, return_lse=True, **kw)  # stage 05
for kernel in ("readable", "fast"):
    out, lse = numba_flash_forward(to_numpy(q), to_numpy(k), to_numpy(v), kernel=kernel, **kw)
    err_out = np.max(np.abs(out - to_numpy(reference)))
    err_lse = np.max(np.abs(lse - to_numpy(lse_numpy)))
    print(f"{kernel:8s} out equals stage 02 to 1e-12: {err_out < 1e-12}, "
          f"lse equals stage 05 to 1e-12: {err_lse < 1e-12}")

# %% [markdown]
# Both tiers agree with the references to rounding error (float64). The backward pass recomputes
# $P = e^{S - \text{lse}}$ tile by tile; check it against the materialised gradient:

# %%
do = rng.standard_normal((B, H, L, E))
q_, k_, v_ = (to_numpy(x) for x in (q, k, v))
out, lse = numba_flash_forward(q_, k_, v_, **kw)
dq, dk, dv = numba_flash_backward(q_, k_, v_, out, lse, do, **kw)
ref = attention_backward(q_, k_, v_, do, attn_mask=mask)
for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
    print(name, "relative error below 1e-12:", np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-12)

# %% [markdown]
# The kernels never form $P$, but the logsumexp they return rebuilds it:
# $P_{ij} = e^{\tau q_i\cdot k_j - \text{lse}_i}$. Here are the weights of one head: the band is the
# bottom-right causal mask intersected with a 90-key window; every row sums to one.

# %%
P = attention_weights_from_lse(q_, k_, lse, **kw)[0, 0]
fig, ax = plt.subplots(figsize=(7, 2.6))
plot_attention(P, ax=ax, title="weights of head 0 rebuilt from the kernel's logsumexp")
print("row sums:", np.round(P.sum(-1)[:5], 6))
save_figure(fig, "../figures/06_weights_from_numba_lse.png")
plt.show()

# %% [markdown]
# ## 3 · A tile's working set and the cache
#
# The fast kernel gives each thread a block of `BLOCK_Q` query rows and walks over the keys in
# blocks of `BLOCK_K`. Per step it touches $Q_i$ (`BLOCK_Q`×d), $K_j$ and $V_j$ (`BLOCK_K`×d
# each), the logits/probabilities $S$ (`BLOCK_Q`×`BLOCK_K`) and the accumulator $O_i$
# (`BLOCK_Q`×d). Tiles are skipped when a mask hides them completely (causal: the upper triangle),
# and only tiles that straddle a mask boundary are masked element by element.

# %%
print("BLOCK_Q =", BLOCK_Q, " BLOCK_K =", BLOCK_K)
for name, itemsize in (("float32", 4), ("float64", 8)):
    parts = {"Q_i": BLOCK_Q * d, "K_j": BLOCK_K * d, "V_j": BLOCK_K * d,
             "S/P": BLOCK_Q * BLOCK_K, "O_i + PV": 2 * BLOCK_Q * d}
    total = sum(parts.values()) * itemsize
    print(f"{name}: " + ", ".join(f"{k} {v * itemsize / 1024:.0f} KiB" for k, v in parts.items())
          + f"  -> {total / 1024:.0f} KiB per thread (compare: L2 is 1-2 MiB per core on current x86 servers, L1d 32-48 KiB)")

# which tiles a causal N = 1024 forward pass computes
N = 1024
nq, nk = N // BLOCK_Q, N // BLOCK_K
kind = np.zeros((nq, nk))
for i in range(nq):
    for j in range(nk):
        first_row, last_row = i * BLOCK_Q, (i + 1) * BLOCK_Q - 1
        if j * BLOCK_K > last_row:
            kind[i, j] = 0  # skipped
        elif (j + 1) * BLOCK_K - 1 <= first_row:
            kind[i, j] = 2  # full, no mask
        else:
            kind[i, j] = 1  # straddles the diagonal: masked
fig, ax = plt.subplots(figsize=(3.5, 5))
ax.imshow(kind, cmap="Greys", vmin=0, vmax=2, aspect="auto", interpolation="nearest")
ax.set_xlabel(f"key block ({BLOCK_K} keys)")
ax.set_ylabel(f"query block ({BLOCK_Q} rows)")
ax.set_title("causal tiles: white skipped,\ngrey masked, black full")
print(f"computed tiles: {np.mean(kind > 0):.2f} of all; masked: {np.mean(kind == 1):.2f}")
save_figure(fig, "../figures/06_causal_tiles.png")
plt.show()

# %% [markdown]
# ## 4 · Measured time and memory against N
#
# `benchmarks/bench_cpu.py` runs every measurement in its own process, interleaves them, and reports
# medians (2 threads, one head, d = 64). It stores everything in `benchmarks/results/cpu.json`;
# this notebook only reads it. Regenerate with `python benchmarks/bench_cpu.py` (about 15 min).
# The machine and the BLAS it used:

# %%
# NBVAL_IGNORE_OUTPUT
res = json.loads(Path("../benchmarks/results/cpu.json").read_text())
m = res["machine"]
print(m["cpu"], f"({m['llvm_cpu']}),", m["cores"], "cores; numpy", m["numpy"], "numba", m["numba"],
      "torch", m["torch"])
print("BLAS:", [(b["internal_api"], b["architecture"]) for b in m["blas"]])
print("matmul ceiling (GFLOP/s):", {k: round(v) for k, v in res["ceiling_gflops"].items()})


# %%
# NBVAL_IGNORE_OUTPUT
def table(dtype, causal, mode):
    impls = ["materialised", "tiled_numpy", "numba_readable", "numba_fast", "torch"]
    Ns = [512, 1024, 2048, 4096, 8192, 16384]
    print(f"median ms, {dtype}, {'causal' if causal else 'no mask'}, {mode}")
    print(f"{'':16s}" + "".join(f"{n:>9d}" for n in Ns))
    for impl in impls:
        row = res["timing"].get(f"{impl}|{dtype}|{int(causal)}|{mode}", {})
        print(f"{impl:16s}" + "".join(f"{row[str(n)]['median_ms']:9.1f}" if str(n) in row
                                      else f"{'':9s}" for n in Ns))

table("float32", False, "fwd")
print()
table("float32", True, "fwdbwd")

# %%
# NBVAL_IGNORE_OUTPUT
display(Image("../figures/06_time_vs_n.png"))
display(Image("../figures/06_memory_vs_n.png"))
display(Image("../figures/06_gflops.png"))

# %% [markdown]
# Every curve runs parallel to the $N^2$ line: the tiled kernels do not change the amount of work,
# only where the bytes live. Memory is where they differ in kind: the materialised path grows by
# $N^2$ bytes (about a gigabyte per head at 16K in float32), the tiled kernels by a few megabytes
# ($O(Nd)$ packed copies of K and V, per-thread tiles).
#
# The targets of the issue, measured in one run at $N = 4096$ (ratios are our time over torch's):

# %%
# NBVAL_IGNORE_OUTPUT
print(res["report"].split("targets (N = 4096):")[1].split("ablation")[0])

# %% [markdown]
# ## 5 · From a plain loop to the optimised kernel
#
# Each step below is a complete kernel (`benchmarks/ablation_kernels.py`), measured in its own
# process, float32 forward without a mask:
#
# * **step 0** – the readable tier: FA-2's loop nest element by element, `math.exp` per logit.
# * **step 1** – loops reorganised: $K$ packed transposed per key block so that the innermost loop
#   runs over contiguous keys with a compile-time trip count, arrays indexed through row views
#   (no signed-offset checks), two query rows per pass, $\tau\log_2 e$ folded into $Q$.
# * **step 2** – `math.exp` stays a scalar libm call in Numba; a degree-7 polynomial for $2^f$ plus
#   the exponent written as integer bits vectorises.
# * **step 3** – the dot products accumulate into local scalars (vector registers) instead of arrays
#   that LLVM must store after every step.
# * **step 4** – the tile products go to BLAS through `np.dot` (SciPy's OpenBLAS), which runs close
#   to the FMA peak; the loops keep the softmax, the masks and the online rescaling.
# * **step 5** – the row maximum becomes sixteen running maxima (a vector max) instead of a serial
#   chain of scalar `max`.
# * **step 6** – tile sizes tuned for this cache (32-row query blocks) = `kernel="fast"`.
#
# (The benchmark measures these at $N = 4096$; the label printed with each step says which $N$.)

# %%
# NBVAL_IGNORE_OUTPUT
steps = res["ablation"]
for s, r in steps.items():
    print(f"step {s}: {r['what']:50s} N = {r['N']}: {r['gflops']:7.1f} GFLOP/s")
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.barh([f"{s}: {r['what']}" for s, r in steps.items()], [r["gflops"] for r in steps.values()],
        color="C3")
ax.axvline(res["ceiling_gflops"]["float32"], color="k", ls=":", label="BLAS float32 matmul")
torch_row = res["timing"].get("torch|float32|0|fwd", {}).get(str(steps["0"]["N"]))
if torch_row:
    ax.axvline(torch_row["gflops"], color="C4", ls="--", label="torch SDPA")
ax.invert_yaxis()
ax.set_xlabel(f"GFLOP/s (float32 forward, N = {steps['0']['N']}, 2 threads)")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
save_figure(fig, "../figures/06_ablation.png")
plt.show()

# %% [markdown]
# What the steps teach. The first jumps (steps 0 → 3) are about *vectorisation*: inner loops that
# LLVM turns into 16-wide FMAs, an exponential that is not a function call, and accumulators that
# live in registers instead of arrays LLVM must store after every step (Numba cannot tell it that
# they do not alias the inputs). Handing the tile products to BLAS (step 4) — what PyTorch's CPU
# flash kernel does — did *not* help by itself: the gemm got faster, but the softmax loops and the
# cache traffic of 64-row tiles then dominated. It paid off once the row maximum was vectorised too
# (step 5) and the query blocks were made small enough for a thread's tiles to stay near L1
# (step 6). The measured order of the steps matters: step 6 was not tried on the loop kernel.
#
# A tiny live timing on this machine (it varies from run to run; float32, N = 1024):

# %%
# NBVAL_IGNORE_OUTPUT
N = 1024
q1, k1, v1 = (rng.standard_normal((1, N, 64)).astype(np.float32) for _ in range(3))
for name, f in [("tiled NumPy (stage 05)", lambda: flash_attention(q1, k1, v1, block_q=128, block_k=128)),
                ("numba readable", lambda: numba_flash_forward(q1, k1, v1, kernel="readable")),
                ("numba fast", lambda: numba_flash_forward(q1, k1, v1))]:
    f()
    t = time.perf_counter()
    for _ in range(3):
        f()
    ms = (time.perf_counter() - t) / 3 * 1e3
    print(f"{name:24s} {ms:7.2f} ms  {4 * N * N * 64 / ms / 1e6:6.1f} GFLOP/s")

# %% [markdown]
# ## 6 · When to use which
#
# | implementation | use it for |
# | --- | --- |
# | `scaled_dot_product_attention` (stage 02) | reading, small $N$, when you need the weights; memory $O(N^2)$ |
# | `flash_attention` NumPy tiles (stage 05) | understanding the algorithm, any array library (CuPy too); $O(N)$ memory, slow |
# | `numba_flash_forward(kernel="readable")` | the same loops compiled: a stepping stone you can step through |
# | `numba_flash_forward(kernel="fast")` / `flash_attention(..., backend="numba")` | long sequences on a CPU: torch-class speed, $O(N)$ memory, float32/float64, causal, windows, key lengths, GQA |
# | `torch.nn.functional.scaled_dot_product_attention` | production, autograd, GPUs |
#
# The first call compiles the kernels (seconds); they are cached on disk (`NUMBA_CACHE_DIR`), so the
# next process loads them in well under a second.
