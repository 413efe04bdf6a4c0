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
# # 05 · FlashAttention: exact attention without the $L \times S$ matrix
#
# Stage 02 computed attention the direct way: form the logits $Z = \tau Q K^\top + \Delta$ ($L \times S$
# numbers), take a row-wise softmax $P = \operatorname{softmax}(Z)$, multiply by $V$:
#
# $$
# O = \operatorname{softmax}(\tau\, Q K^\top + \Delta)\, V, \qquad \tau = 1/\sqrt{E}.
# $$
#
# For $N = 16\,384$ tokens $Z$ is 2 GB in float64 *per head*, and on a GPU reading and writing it to
# slow memory (HBM) costs more time than the arithmetic. **FlashAttention** (Dao et al. 2022,
# arXiv:2205.14135) and **FlashAttention-2** (Dao 2023, arXiv:2307.08691) compute *exactly the same*
# $O$ while holding only small tiles: $Q$ is cut into blocks of $B_q$ rows, $K, V$ into blocks of $B_k$
# rows, and the softmax is assembled block by block with the **online softmax** (Milakov &
# Gimelshein 2018).
#
# This notebook:
#
# 1. runs the online softmax step by step and draws the rescaling at each tile;
# 2. derives the output update of FlashAttention from it, and checks each step with numbers;
# 3. reads the library's FA-2 forward loop line by line, with the paper's line numbers (and one
#    misprint of the paper);
# 4. checks `flash_attention` (FA-1 and FA-2 loops) against stage 02's `scaled_dot_product_attention`;
# 5. draws the tiles that causality, a sliding window or a block mask skip;
# 6. rebuilds the full attention weights from the saved logsumexp alone;
# 7. derives the backward pass's shortcut $\operatorname{rowsum}(P \circ dP) = \operatorname{rowsum}(dO \circ O)$,
#    checks the backward pass by recomputation and merges partial results over key chunks;
# 8. measures memory against $N$ (materialised vs tiled);
# 9. counts slow-memory reads and writes against the fast-memory size $M$ (Theorem 2), and shows
#    where FA-1 and FA-2 differ: FA-1 writes its running results back after every tile.

# %% [markdown]
# ### Notation (the course's one system; this notebook uses these symbols)
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $L$, $S$, $N$ | number of queries, of keys and values, and the length when $L = S$ | `L`, `S`, `N` |
# | $E$, $E_v$ | query/key and value size per head | `E`, `Ev` |
# | $Q, K, V, O$ | queries ($L \times E$), keys ($S \times E$), values ($S \times E_v$), output ($L \times E_v$) | `q`, `k`, `v`, `out` |
# | $\tau$ | the scale, $1/\sqrt{E}$ unless given | `scale` |
# | $Z$ | logits $Z = \tau Q K^\top + \Delta$ ($L \times S$), entries $z_{ij}$ | `z` |
# | $A$, $\Delta$ | boolean mask (True = attend), additive float mask (0 or $-\infty$) | `attn_mask` |
# | $P$ | attention weights $P = \operatorname{softmax}(Z)$ row by row, entries $p_{ij}$ | `weights` |
# | $m$, $\ell$ | running row maximum of $Z$ and running row sum of $e^{z - m}$ | `m`, `ell` |
# | $\lambda$ | logsumexp of a row of $Z$: $\lambda = m + \log \ell = \log \sum_j e^{z_j}$ | `lse` |
# | $B_q$, $B_k$ | query rows and key columns per tile | `block_q`, `block_k` |
# | $T_q$, $T_k$ | number of query and key tiles, $\lceil L/B_q \rceil$ and $\lceil S/B_k \rceil$ | `n_q`, `n_k` |
# | $M$ | fast-memory (SRAM) size in numbers, for IO counts | `sram_size` |
# | $D$ | $\operatorname{rowsum}(dO \circ O)$, one number per query (backward pass) | `D` |
# | $dQ, dK, dV, dO$ | gradients of the loss with respect to $Q, K, V, O$ (and $dZ$, $dP$ for $Z$, $P$) | `dq`, `dk`, `dv`, `grad_out` |
#
# **Reading the papers:** they write $S$ for our logits $Z$, $L$ for our logsumexp $\lambda$, $d$ for our
# $E$, $B_r, B_c$ for our $B_q, B_k$ and $T_r, T_c$ for our $T_q, T_k$. Every formula quoted here is
# translated.

# %%
import ast
import inspect
import math
import textwrap
import tracemalloc

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from attention_ref import (
    attention_backward,
    attention_weights_from_lse,
    causal_mask,
    flash_attention,
    flash_attention_backward,
    io_closed_form,
    io_flash_backward,
    io_flash_forward,
    io_standard_backward,
    io_standard_forward,
    merge_attention_partials,
    merge_softmax_stats,
    scaled_dot_product_attention,
    sliding_window_mask,
    softmax,
    softmax_stats,
)
from attention_ref.flash import forward_fa2
from attention_ref.plotting import plot_attention, save_figure
from attention_ref.softmax import safe_shift

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU


def show_code(fn):
    # print a library function's source without its docstring (help(fn) shows the docstring)
    source = textwrap.dedent(inspect.getsource(fn))
    first = ast.parse(source).body[0].body[0]
    lines = source.splitlines()
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        del lines[first.lineno - 1 : first.end_lineno]
    print("\n".join(lines))

# %% [markdown]
# ## 1. The online softmax, one tile at a time
#
# Softmax needs the row maximum $m$ (for stability) and the sum $\ell = \sum_j e^{z_j - m}$ before it
# can normalise. The online softmax reads the row in chunks and keeps only the running pair
# $(m, \ell)$. When a chunk brings a larger maximum, the old sum was computed against the wrong
# reference and is **rescaled**, because $e^{z - m_{\text{new}}} = e^{z - m}\, e^{m - m_{\text{new}}}$:
#
# $$
# m_{\text{new}} = \max(m, \tilde m), \qquad
# \ell_{\text{new}} = e^{\,m - m_{\text{new}}}\,\ell + e^{\,\tilde m - m_{\text{new}}}\,\tilde\ell ,
# $$
#
# where $(\tilde m, \tilde\ell)$ are the chunk's own statistics (`softmax_stats`). The merge is
# `merge_softmax_stats` from `attention_ref.softmax`; here is its code (`safe_shift` treats
# $m = -\infty$, "no entry seen yet", as 0, so that $e^{-\infty - (-\infty)}$ never turns into NaN):

# %%
show_code(merge_softmax_stats)
show_code(safe_shift)

# %% [markdown]
# One row of 12 logits in chunks of 4:

# %%
rng = np.random.default_rng(0)
z = np.round(rng.normal(0, 2, size=12), 2)
z[5] = 4.5  # a new maximum arrives in the second chunk
chunk = 4

m, ell = np.array([-np.inf]), np.array([0.0])
history = []
print(" tile | chunk max m̃ | running m | rescale e^(m_old − m_new) | running ℓ")
for t in range(0, z.size, chunk):
    m_t, l_t = softmax_stats(z[t:t + chunk], axis=-1)
    m_new, ell_new = merge_softmax_stats(m, ell, m_t, l_t)
    rescale = float(np.exp(m - m_new)[0]) if np.isfinite(m[0]) else 0.0
    history.append((t, float(m[0]), float(m_new[0]), rescale, float(ell_new[0])))
    print(f"  {t // chunk}   | {m_t[0]:11.2f} | {m_new[0]:9.2f} | {rescale:25.4f} | {ell_new[0]:9.4f}")
    m, ell = m_new, ell_new

online = np.exp(z - m) / ell
print("e^(z − m) / ℓ matches softmax(z):", np.allclose(online, softmax(z)), "  sum:", np.round(online.sum(), 12))

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
for ax, (t, m_old, m_new, rescale, ell_now) in zip(axes, history, strict=True):
    seen = np.arange(t + chunk)
    colors = ["tab:blue"] * t + ["tab:orange"] * chunk
    ax.bar(seen, np.exp(z[: t + chunk] - m_new), color=colors)
    if t > 0:  # what the old terms were worth before the rescale
        ax.bar(np.arange(t), np.exp(z[:t] - m_old), fill=False, edgecolor="grey", linestyle="--")
    ax.set_xlim(-0.6, z.size - 0.4)
    ax.set_xticks(range(z.size))
    title = f"tile {t // chunk}: m = {m_new:.2f}, ℓ = {ell_now:.3f}"
    if t > 0:
        title += f"\nold terms × e^(m_old − m_new) = {rescale:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key j")
axes[0].set_ylabel("term e^(z_j − m) of ℓ")
handles = [plt.Rectangle((0, 0), 1, 1, color="tab:orange"), plt.Rectangle((0, 0), 1, 1, color="tab:blue"),
           plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="grey", linestyle="--")]
fig.legend(handles, ["this tile's terms", "earlier terms, rescaled to the new m", "earlier terms before the rescale"],
           loc="lower center", ncol=3, fontsize=9)
fig.suptitle("Online softmax: a new maximum (tile 1) shrinks every earlier term by e^(m_old − m_new); "
             "nothing is recomputed", fontsize=11)
fig.tight_layout(rect=(0, 0.08, 1, 1))
save_figure(fig, "../figures/05_online_softmax.png")
plt.show()

# %% [markdown]
# ## 2. From the online softmax to the output: $O \leftarrow \operatorname{diag}(e^{m - m_{\text{new}}})\, O + \tilde P V$
#
# Take one query row with logits $z_1, \dots, z_S$ and read its keys tile by tile. After the tiles seen
# so far, keep three things: the maximum $m$ of the logits seen, their sum $\ell = \sum_{k \text{ seen}} e^{z_k - m}$
# and the **unnormalised output**
#
# $$
# \tilde o = \sum_{k \text{ seen}} e^{z_k - m}\, v_k \qquad (\text{a row of } E_v \text{ numbers}).
# $$
#
# A new tile $J$ arrives with logits $z_k$, $k \in J$. Its maximum may raise $m$ to
# $m_{\text{new}} = \max(m, \max_{k \in J} z_k)$. Split the new sum into the old keys and the new ones,
# and use $e^{z_k - m_{\text{new}}} = e^{z_k - m}\, e^{m - m_{\text{new}}}$ on the old ones:
#
# $$
# \tilde o_{\text{new}} = \sum_{k \text{ old}} e^{z_k - m_{\text{new}}} v_k + \sum_{k \in J} e^{z_k - m_{\text{new}}} v_k
# = e^{m - m_{\text{new}}} \underbrace{\sum_{k \text{ old}} e^{z_k - m} v_k}_{\tilde o}
# + \underbrace{\textstyle\sum_{k \in J} \tilde p_k v_k}_{\tilde p\, V_J},
# \qquad \tilde p_k = e^{z_k - m_{\text{new}}} .
# $$
#
# The same step gives $\ell_{\text{new}} = e^{m - m_{\text{new}}} \ell + \sum_{k \in J} \tilde p_k$. For a tile
# of $B_q$ query rows at once, the factor is one number per row, a diagonal matrix:
#
# $$
# m_{\text{new}} = \max(m, \operatorname{rowmax} Z_J), \quad \tilde P = e^{Z_J - m_{\text{new}}}, \quad
# \ell \leftarrow e^{m - m_{\text{new}}} \ell + \operatorname{rowsum} \tilde P, \quad
# O \leftarrow \operatorname{diag}(e^{m - m_{\text{new}}})\, O + \tilde P V_J .
# $$
#
# After the last tile $m$ is the row's maximum and
#
# $$
# \frac{\tilde o}{\ell} = \frac{\sum_k e^{z_k - m} v_k}{\sum_k e^{z_k - m}} = \frac{\sum_k e^{z_k} v_k}{\sum_k e^{z_k}}
# = \sum_k p_k v_k = o ,
# $$
#
# exactly the attention output: $e^{-m}$ cancels, so **one division by $\ell$ at the end** finishes
# the row, and $\lambda = m + \log \ell = \log \sum_k e^{z_k}$ comes for free. FA-1 instead keeps $O$
# normalised after every tile: substituting $\tilde o = \ell\, O$ into the update gives its line 12,
# $O \leftarrow \operatorname{diag}(\ell_{\text{new}})^{-1} (\operatorname{diag}(\ell)\, e^{m - m_{\text{new}}} O + \tilde P V_J)$
# — the same numbers, with a division per tile (FA-1 takes $\tilde P$ against the tile's own maximum
# $\tilde m$ and multiplies it by $e^{\tilde m - m_{\text{new}}}$, which is the same thing). FA-2 drops
# those divisions (§3.1: fewer operations that are not matrix products).
#
# A numeric check on one row of $S = 10$ logits in tiles of $B_k = 4$: after every tile the running
# $\tilde o$ must equal the sum over the keys seen so far, and FA-1's normalised $O$ must equal
# $\tilde o / \ell$.

# %%
rng = np.random.default_rng(1)
S_row, Ev_row, B_k = 10, 3, 4
z = np.round(rng.normal(0, 2, size=S_row), 2)
z[6] = 5.0                                      # the maximum arrives in the second tile
v = rng.normal(size=(S_row, Ev_row))

def rounding(x):
    """A difference at the level of float64 rounding prints the same on every machine."""
    return "< 1e-14" if x < 1e-14 else f"{x:.1e}"


m, ell = -np.inf, 0.0
o_tilde = np.zeros(Ev_row)                      # FA-2: unnormalised
o_fa1 = np.zeros(Ev_row)                        # FA-1: normalised after every tile
print(" tile | m_new | e^(m − m_new) |    ℓ    | õ − Σ_seen e^(z−m) v | FA-1's O − õ/ℓ")
for j0 in range(0, S_row, B_k):
    z_J, v_J = z[j0:j0 + B_k], v[j0:j0 + B_k]
    m_new = max(m, z_J.max())
    p_tilde = np.exp(z_J - m_new)
    alpha = np.exp(m - m_new)                   # e^{m − m_new}; 0 for the first tile (m = −∞)
    ell_new = alpha * ell + p_tilde.sum()
    o_tilde = alpha * o_tilde + p_tilde @ v_J   # O ← diag(e^{m − m_new}) O + P̃ V_J
    o_fa1 = (ell * alpha * o_fa1 + p_tilde @ v_J) / ell_new
    m, ell = m_new, ell_new
    seen = slice(0, j0 + z_J.size)
    direct = np.exp(z[seen] - m) @ v[seen]
    print(f"  {j0 // B_k}   | {m:5.2f} | {alpha:13.4f} | {ell:7.4f} | {rounding(np.max(np.abs(o_tilde - direct))):>20s} |"
          f" {rounding(np.max(np.abs(o_fa1 - o_tilde / ell))):>14s}")

print("õ / ℓ == softmax(z) V:", np.allclose(o_tilde / ell, softmax(z) @ v, rtol=1e-14, atol=1e-15))
print("λ = m + log ℓ == log Σ_k e^(z_k):", np.isclose(m + np.log(ell), np.log(np.sum(np.exp(z))), rtol=1e-15))

# %% [markdown]
# ## 3. The FA-2 forward loop, line by line
#
# That update is the whole inner loop of FlashAttention-2's forward pass (Dao 2023, Algorithm 1).
# Here is the library's own core, `attention_ref.flash.forward_fa2`, which `flash_attention` calls
# after checking its inputs; the comments give the algorithm's line numbers:

# %%
show_code(forward_fa2)

# %% [markdown]
# Reading it against the paper:
#
# * **lines 3–5**: one query tile $Q_i$ stays in fast memory with its own $O_i = 0$, $\ell_i = 0$, $m_i = -\infty$;
# * **lines 6–7**: the key/value tiles $K_j, V_j$ stream past it;
# * **line 8**: `attention_logits` forms the tile of logits $Z = \tau Q_i K_j^\top + \Delta$ with the mask
#   ($-\infty$ where $A$ is False), and in a *partial* tile the causal or window band;
# * **lines 9–10**: section 2's update, `alpha` $= e^{m - m_{\text{new}}}$;
# * **lines 12–15**: one division by $\ell$, then $O_i$ and $\lambda_i = m_i + \log \ell_i$ go to slow memory once.
#
# Three things are not in the paper's listing: `tile_state` skips a tile that the causal mask or the
# window hides completely (FA-2 §3.1.1 does this for causal masks; section 5 draws it); `safe_shift`
# keeps a row whose keys were all masked so far at $m = -\infty$ without a NaN; `safe_divisor` makes
# a row with no visible key return 0 (PyTorch's convention) instead of $0/0$.
#
# **A misprint to watch for.** FA-2's Algorithm 1 prints line 10 as
# $O_i^{(j)} = \operatorname{diag}(e^{m_i^{(j-1)} - m_i^{(j)}})^{-1} O_i^{(j-1)} + \tilde P_i^{(j)} V_j$:
# the inverse $(\cdot)^{-1}$ should not be there — section 2's derivation *multiplies* by
# $e^{m - m_{\text{new}}} \le 1$. Coded as printed, the first tile already divides $0$ by
# $e^{-\infty} = 0$:

# %%
def fa2_row(z, v, block, misprint=None):
    # section 2's loop for one row; misprint: divide by e^{m − m_new} as the paper's line 10 prints,
    # "as printed" from the first tile on, "guarded" only once a maximum has been seen (m > −∞)
    m, ell, o = -np.inf, 0.0, np.zeros(v.shape[1])
    for j0 in range(0, z.size, block):
        m_new = max(m, z[j0:j0 + block].max())
        p_tilde = np.exp(z[j0:j0 + block] - m_new)
        alpha = np.exp(m - m_new)
        ell = alpha * ell + p_tilde.sum()
        if misprint == "as printed" or (misprint == "guarded" and np.isfinite(m)):
            with np.errstate(divide="ignore", invalid="ignore"):
                o = o / alpha + p_tilde @ v[j0:j0 + block]
        else:
            o = alpha * o + p_tilde @ v[j0:j0 + block]
        m = m_new
    return o / ell

exact = softmax(z) @ v
print("softmax(z) V:                        ", np.round(exact, 4))
print("as derived:                          ", np.round(fa2_row(z, v, B_k), 4))
print("line 10 as printed:                  ", fa2_row(z, v, B_k, misprint="as printed"))
guarded = fa2_row(z, v, B_k, misprint="guarded")
print("as printed, first tile guarded:      ", np.round(guarded, 4),
      f"  relative error {np.max(np.abs(guarded - exact)) / np.max(np.abs(exact)):.1f}")

# %% [markdown]
# ## 4. FlashAttention is exact: FA-1 and FA-2 against stage 02
#
# `flash_attention` runs the tiled loop: `algorithm="fa2"` is the core above, `algorithm="fa1"` is
# Algorithm 1 of FA-1 (key/value tiles in the outer loop; $O$, $\ell$, $m$ read and rewritten in slow
# memory at every step, $O$ kept normalised). Lengths need not be multiples of the tile sizes. Both
# agree with the materialised `scaled_dot_product_attention` to rounding error:

# %%
rng = np.random.default_rng(2)
B, H, L, S, E = 2, 4, 200, 173, 64
q = xp.asarray(rng.standard_normal((B, H, L, E)))
k = xp.asarray(rng.standard_normal((B, H, S, E)))
v = xp.asarray(rng.standard_normal((B, H, S, E)))
reference = scaled_dot_product_attention(q, k, v, is_causal=True)

for algorithm in ("fa1", "fa2"):
    out, lse = flash_attention(q, k, v, is_causal=True, algorithm=algorithm, return_lse=True,
                               block_q=64, block_k=48)
    err = float(xp.max(xp.abs(out - reference)) / xp.max(xp.abs(reference)))
    print(f"{algorithm}: O {tuple(out.shape)}, λ {tuple(lse.shape)}, relative error < 1e-13: {err < 1e-13}")


# %% [markdown]
# ## 5. Tiles that are never computed
#
# A tile $(i, j)$ is the block of logits between query tile $i$ and key tile $j$. Masks written as
# arithmetic on positions (causal, sliding window) tell us before computing anything whether a tile
# is **full** (nothing masked), **partial** (mask applied inside), or **skipped** (every entry
# masked, so it contributes $e^{-\infty} = 0$: FA-2 §3.1.1 skips the tiles above the causal
# diagonal). A **block mask** switches whole tiles off: block-sparse FlashAttention (FA-1 §3.3).
# `return_stats=True` returns the plan.
#
# With $L \ne S$ the causal mask needs an alignment: PyTorch's `is_causal` is top-left, flash-attn
# ≥ 2.1 is bottom-right (the last query sees every key, as in decoding with a cache).

# %%
def tile_plan(L, S, **kwargs):
    zeros_q, zeros_k = np.zeros((L, 8)), np.zeros((S, 8))
    _, stats = flash_attention(zeros_q, zeros_k, zeros_k, return_stats=True, **kwargs)
    return stats

block_mask = rng.random((8, 8)) < 0.45
np.fill_diagonal(block_mask, True)
cases = {
    "causal, top-left (L = S)": dict(L=256, S=256, is_causal=True),
    "causal, bottom-right (L < S)": dict(L=160, S=256, is_causal=True, causal_alignment="bottom_right"),
    "sliding window (48, 0)": dict(L=256, S=256, window=(48, 0)),
    "block-sparse + causal": dict(L=256, S=256, is_causal=True, block_mask=block_mask),
}
STATES = ["full", "partial", "skip", "block"]
cmap = ListedColormap(["#2b83ba", "#abdda4", "#eeeeee", "#fdae61"])

fig, axes = plt.subplots(1, 4, figsize=(15, 4.6))
for ax, (name, kw) in zip(axes, cases.items(), strict=True):
    stats = tile_plan(block_q=32, block_k=32, **kw)
    grid = np.array([[STATES.index(s) for s in row] for row in stats.tile_map])
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=3)
    ax.set_title(f"{name}\n{stats.computed} computed, {stats.skipped} skipped", fontsize=9)
    ax.set_xlabel("key tile j")
    ax.set_ylabel("query tile i")
    print(f"{name:30s} {stats.summary()}")
handles = [plt.Rectangle((0, 0), 1, 1, facecolor=cmap(i), edgecolor="grey") for i in range(4)]
fig.legend(handles, ["computed, full", "computed, masked inside", "skipped (causal / window)",
                     "skipped (block mask)"], loc="lower center", ncol=4)
fig.suptitle("Tiles that a mask hides completely are never computed (B_q = B_k = 32): "
             "causality skips almost half of them", fontsize=11)
fig.tight_layout(rect=(0, 0.07, 1, 1))
save_figure(fig, "../figures/05_tile_skipping.png")
plt.show()

# %% [markdown]
# The tile plan is arithmetic, not a guess: flash with a window and bottom-right causal alignment
# matches the dense attention with the explicit masks of stage 02 (`causal_mask`,
# `sliding_window_mask`).

# %%
L, S = 160, 256
mask = causal_mask(L, S, "bottom_right") & sliding_window_mask(L, S, 48, None, "bottom_right")
q1, k1, v1 = (rng.standard_normal((2, n_, 32)) for n_ in (L, S, S))
dense = scaled_dot_product_attention(q1, k1, v1, attn_mask=mask)
tiled, stats = flash_attention(q1, k1, v1, is_causal=True, window=(48, None), causal_alignment="bottom_right",
                               block_q=32, block_k=32, return_stats=True)
print(stats.summary())
print("equal to dense attention with the explicit mask A:", np.allclose(tiled, dense, rtol=1e-12, atol=1e-14))

# %% [markdown]
# ## 6. The whole weight matrix, rebuilt from the logsumexp
#
# FA-2 stores one number per query row, $\lambda_i = m_i + \log \ell_i = \log \sum_j e^{z_{ij}}$. That is
# enough to rebuild any weight on demand, $p_{ij} = e^{z_{ij} - \lambda_i}$: exactly what the backward
# pass does tile by tile instead of storing $P$. Drawn all at once (for a small example, on purpose),
# it is the softmax of stage 02:

# %%
L, S = 24, 32
qs, ks, vs = (xp.asarray(rng.standard_normal((n_, 16))) for n_ in (L, S, S))
_, lse = flash_attention(qs, ks, vs, is_causal=True, causal_alignment="bottom_right", window=(10, None),
                         return_lse=True, block_q=8, block_k=8)
weights = attention_weights_from_lse(qs, ks, lse, is_causal=True, causal_alignment="bottom_right",
                                     window=(10, None))
mask = xp.asarray(causal_mask(L, S, "bottom_right") & sliding_window_mask(L, S, 10, None, "bottom_right"))
_, ref_weights = scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, return_weights=True)
print("rows sum to 1:", np.allclose(to_numpy(weights).sum(-1), 1.0))
print("equal to stage 02's weights:", np.allclose(to_numpy(weights), to_numpy(ref_weights), atol=1e-14))

fig, ax = plt.subplots(figsize=(7.5, 5.5))
plot_attention(to_numpy(weights), ax=ax,
               title="P = exp(τQKᵀ − λ) rebuilt from one number λ per query equals the softmax\n"
                     "(causal bottom-right, window 10, L = 24 random queries, S = 32 keys)")
ax.set_xlabel("key j")
ax.set_ylabel("query i")
fig.axes[-1].set_ylabel("attention weight $p_{ij}$")
save_figure(fig, "../figures/05_weights_from_lse.png")
plt.show()

# %% [markdown]
# ## 7. The backward pass: recompute $P$, and a shortcut for the softmax
#
# The backward pass (FA-1 Algorithm 4, FA-2 Algorithm 2) receives $dO$ and needs $P$, which the forward
# pass never stored: it recomputes each tile, $p_{ij} = e^{z_{ij} - \lambda_i}$. The gradients of
# $O = P V$ are $dV = P^\top dO$ and $dP = dO\, V^\top$. Through the softmax of a row,
# $\partial p_j / \partial z_k = p_j(\delta_{jk} - p_k)$, so
#
# $$
# dz_k = \sum_j dp_j\, p_j (\delta_{jk} - p_k) = p_k \Big(dp_k - \sum_j p_j\, dp_j\Big),
# \qquad dZ = P \circ (dP - D), \quad D_i = \sum_j p_{ij}\, dp_{ij} ,
# $$
#
# and $dQ = \tau\, dZ\, K$, $dK = \tau\, dZ^\top Q$. The row sum $D_i$ runs over all $S$ keys, which a
# tiled pass never has together. FA-1 (Appendix B.2) removes it with $dp_{ij} = \sum_c dO_{ic} V_{jc}$:
#
# $$
# D_i = \sum_j p_{ij} \sum_c dO_{ic} V_{jc} = \sum_c dO_{ic} \underbrace{\sum_j p_{ij} V_{jc}}_{O_{ic}}
# = \sum_c dO_{ic}\, O_{ic}, \qquad\text{that is}\qquad
# \operatorname{rowsum}(P \circ dP) = \operatorname{rowsum}(dO \circ O) .
# $$
#
# A sum of $E_v$ products of two things the backward pass has anyway ($O$ and $dO$), instead of $S$.
# Checked with numbers, together with the formula for $dZ$ (against central finite differences of the
# loss $\sum dO \circ O$):

# %%
rng = np.random.default_rng(3)
L, S, E = 5, 7, 4
qd, kd, vd, dO = (rng.standard_normal(shape) for shape in ((L, E), (S, E), (S, E), (L, E)))
tau = 1 / math.sqrt(E)
Zd = tau * qd @ kd.T
Pd = softmax(Zd)
Od = Pd @ vd
dP = dO @ vd.T
D_from_P = np.sum(Pd * dP, axis=-1)
D_from_O = np.sum(dO * Od, axis=-1)
print("D = rowsum(P ∘ dP):", np.round(D_from_P, 4))
print("D = rowsum(dO ∘ O):", np.round(D_from_O, 4), "  equal:", np.allclose(D_from_P, D_from_O, rtol=1e-13))

dZ = Pd * (dP - D_from_P[:, None])
h = 1e-6
dZ_numeric = np.zeros_like(Zd)
for i in range(L):
    for j in range(S):
        bump = np.zeros_like(Zd)
        bump[i, j] = h
        dZ_numeric[i, j] = (np.sum(dO * (softmax(Zd + bump) @ vd)) - np.sum(dO * (softmax(Zd - bump) @ vd))) / (2 * h)
print("dZ = P ∘ (dP − D) matches finite differences (max abs diff < 1e-8):",
      float(np.max(np.abs(dZ - dZ_numeric))) < 1e-8)

# %% [markdown]
# So the tiled backward pass, for each tile, is
#
# $$
# D_i = \operatorname{rowsum}(dO_i \circ O_i), \quad P_{ij} = e^{Z_{ij} - \lambda_i}, \quad dV_j \mathrel{+}= P_{ij}^\top dO_i, \quad
# dP_{ij} = dO_i V_j^\top, \quad dZ_{ij} = P_{ij} \circ (dP_{ij} - D_i), \quad
# dQ_i \mathrel{+}= \tau\, dZ_{ij} K_j, \quad dK_j \mathrel{+}= \tau\, dZ_{ij}^\top Q_i ,
# $$
#
# and it agrees with the plain backward pass through the materialised matrices (`attention_backward`):

# %%
dout = xp.asarray(rng.standard_normal(tuple(reference.shape)))
out, lse = flash_attention(q, k, v, is_causal=True, return_lse=True)
grads = flash_attention_backward(q, k, v, out, lse, dout, is_causal=True)
plain = attention_backward(q, k, v, dout, is_causal=True)
for name, g, r in zip(("dQ", "dK", "dV"), grads, plain, strict=True):
    rel = float(xp.max(xp.abs(g - r)) / xp.max(xp.abs(r)))
    print(f"{name} {tuple(g.shape)}: relative difference < 1e-12: {rel < 1e-12}")

# %% [markdown]
# ### Merging results over key chunks
#
# The pair $(O_s, \lambda_s)$ of attention over a chunk $s$ of the keys is all one needs to combine
# chunks later — section 1's merge, once more: $\lambda = \log \sum_s e^{\lambda_s}$ and
# $O = \sum_s e^{\lambda_s - \lambda} O_s$ (each chunk weighted by its share of the row's softmax mass).
# Split-KV decoding (Flash-Decoding, stage 07) computes the chunks in parallel, ring attention (stage 10)
# passes them round a ring of devices. A chunk in which a query sees nothing has $\lambda_s = -\infty$ and
# weight 0:

# %%
chunks = [(0, 64), (64, 120), (120, 173)]
parts = [flash_attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True) for a, b in chunks]
merged, merged_lse = merge_attention_partials([o for o, _ in parts], [s for _, s in parts])
full, full_lse = flash_attention(q, k, v, return_lse=True)
print("merged O == full O:", np.allclose(to_numpy(merged), to_numpy(full), rtol=1e-12, atol=1e-14),
      "| merged λ == full λ:", np.allclose(to_numpy(merged_lse), to_numpy(full_lse), rtol=1e-12))

# %% [markdown]
# ## 8. Memory against $N$: materialised vs tiled
#
# The materialised path holds the $N \times N$ logits and weights; the tiled one holds $O$ and a few
# $B_q \times B_k$ tiles. Peak memory of one head ($E = 64$, float64) besides the inputs, measured with
# `tracemalloc` (NumPy reports its allocations to it; the counts are the arrays' sizes, so they do not
# depend on the machine):

# %%
# NBVAL_IGNORE_OUTPUT
sizes = [256, 512, 1024, 2048, 4096]
peak = {"materialised (stage 02)": [], "tiled (flash, B_q = B_k = 64)": []}
for N in sizes:
    qn = rng.standard_normal((N, 64))
    for name, fn in zip(peak, (lambda: scaled_dot_product_attention(qn, qn, qn),
                               lambda: flash_attention(qn, qn, qn)), strict=True):
        tracemalloc.start()
        fn()
        peak[name].append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
for name, values in peak.items():
    print(f"{name:30s}", "  ".join(f"N={N}: {mib:7.1f} MiB" for N, mib in zip(sizes, values, strict=True)))

# %%
fig, ax = plt.subplots(figsize=(7, 4.3))
for (name, values), marker in zip(peak.items(), "os", strict=True):
    ax.loglog(sizes, values, marker=marker, label=f"measured: {name}", base=2)
Ns = np.array(sizes, dtype=float)
ax.loglog(Ns, 3 * Ns**2 * 8 / 2**20, "k:", label="3 N² float64 (Z, P and a temporary)", base=2)
ax.loglog(Ns, 2 * Ns * 64 * 8 / 2**20, "k--", label="2 N E float64 (O, and O cast to the input's dtype)", base=2)
ax.set_xlabel("sequence length N")
ax.set_ylabel("peak memory besides the inputs (MiB)")
ax.set_title("Memory: quadratic in N when materialised, linear when tiled (one head, E = 64)")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
save_figure(fig, "../figures/05_memory_vs_n.png")
plt.show()

# %% [markdown]
# The measured points lie on the two lines: $3N^2$ numbers for the materialised path, $2NE$ for the
# tiled one (at $N = 256$ the tiles themselves still show, so the point sits above the line).
#
# ## 9. Slow-memory reads and writes against $M$ (Theorem 2)
#
# FlashAttention's real saving is IO. With a fast memory of $M$ numbers ($E \le M \le NE$),
# standard attention moves $\Theta(NE + N^2)$ numbers between slow and fast memory and
# FlashAttention $\Theta(N^2 E^2 / M)$ (Theorem 2; the backward pass has the same bounds,
# Theorem 5). `attention_ref.io_model` runs the papers' algorithms on one head with every load and
# store explicit, counts the numbers moved, and checks the result.
#
# **Tile sizes from $M$.** FA-1 gives the rule (Algorithm 1, line 1): $B_k = \lceil M/4E \rceil$,
# $B_q = \min(\lceil M/4E \rceil, E)$ — the tile that stays in fast memory for the whole inner loop (for
# FA-1 the key/value tile) is the large one. FA-2's paper gives no rule from $M$: its GPU kernels use
# tiles of $\{64, 128\} \times \{64, 128\}$ rows, tuned by hand for each head size (§3.3). **The rule
# used here for FA-2 is this course's choice**: FA-1's rule with the roles swapped, because FA-2 keeps
# the *query* tile in fast memory ($B_q = \lceil M/4E \rceil$, $B_k = \min(\lceil M/4E \rceil, E)$), so
# that both algorithms are compared with the same fast memory. The counts below follow from it, and
# equal closed forms exactly:

# %%
rng = np.random.default_rng(4)
N, E, M = 128, 16, 1024
qm, km, vm, dom = (rng.standard_normal((N, E)) for _ in range(4))
o_ref, lse_ref = flash_attention(qm, km, vm, return_lse=True)
runs = {
    "standard_forward": io_standard_forward(qm, km, vm),
    "fa1_forward": io_flash_forward(qm, km, vm, M, algorithm="fa1"),
    "fa2_forward": io_flash_forward(qm, km, vm, M, algorithm="fa2"),
    "standard_backward": io_standard_backward(qm, km, vm, dom),
    "fa1_backward": io_flash_backward(qm, km, vm, o_ref, lse_ref, dom, M, algorithm="fa1"),
    "fa2_backward": io_flash_backward(qm, km, vm, o_ref, lse_ref, dom, M, algorithm="fa2"),
}
print(f"N = {N}, E = {E}, M = {M}")
print(f"{'pass':18s} {'tiles (B_q, B_k)':>17s} {'reads':>8s} {'writes':>8s} {'= closed form':>14s}")
for kind, run in runs.items():
    closed = io_closed_form(kind, N, N, E, E, None if kind.startswith("standard") else M)
    blocks = "" if run.block_q is None else f"({run.block_q}, {run.block_k})"
    print(f"{kind:18s} {blocks:>17s} {run.reads:8d} {run.writes:8d} {str((run.reads, run.writes) == closed):>14s}")

# %% [markdown]
# ### Where FA-1 and FA-2 differ: writes to slow memory
#
# Both visit the same tiles and do the same arithmetic; what differs is the loop order, and with it
# which running results must leave fast memory. FA-1 keeps a key/value tile on chip and streams the
# query tiles past it, so after **every** tile the partial $O_i, \ell_i, m_i$ of that query tile go back to
# slow memory ($B_q (E_v + 2)$ numbers), to be read again at the next key tile. FA-2 keeps a query tile
# and streams the key/value tiles past it: $O_i$, $\ell_i$, $m_i$ stay on chip until the row of tiles is
# done, and only $O_i$ and $\lambda_i$ are written, **once** ($B_q (E_v + 1)$ numbers). Its outer loop is
# also embarrassingly parallel: no two workers ever write the same $O_i$. The same run as the table:

# %%
fa1, fa2 = runs["fa1_forward"], runs["fa2_forward"]
n_q, n_k = N // fa1.block_q, N // fa1.block_k
fa1_per_tile = fa1.block_q * (E + 2)          # O_i, ℓ_i, m_i of B_q rows, after every tile
fa1_init = N * (E + 2)                        # O = 0, ℓ = 0, m = −∞ written before the loop
fa2_per_row = fa2.block_q * (E + 1)           # O_i and λ_i, after the last tile of a row
writes = {"fa1": np.full((n_q, n_k), fa1_per_tile), "fa2": np.zeros((n_q, n_k), dtype=int)}
writes["fa2"][:, -1] = fa2_per_row
print("FA-1 writes:", f"{n_q * n_k} tiles × {fa1_per_tile} + {fa1_init} (initial O, ℓ, m) = {writes['fa1'].sum() + fa1_init}",
      "| io_model counted", fa1.writes)
print("FA-2 writes:", f"{n_q} query tiles × {fa2_per_row} = {writes['fa2'].sum()}", "| io_model counted", fa2.writes)

fig, axes = plt.subplots(1, 3, figsize=(16, 5.4), layout="constrained",
                         gridspec_kw={"width_ratios": [1, 1, 0.9]})
for ax, name, title in ((axes[0], "fa1", "FA-1: key/value tiles outer (column by column)"),
                        (axes[1], "fa2", "FA-2: query tiles outer (row by row)")):
    image = ax.imshow(writes[name], cmap="Oranges", vmin=0, vmax=fa1_per_tile * 1.6)
    for i in range(n_q):
        for j in range(n_k):
            step = j * n_q + i + 1 if name == "fa1" else i * n_k + j + 1
            ax.text(j, i, str(step), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n_k))
    ax.set_yticks(range(n_q))
    ax.set_xlabel("key tile j")
    ax.set_ylabel("query tile i")
    if name == "fa1":
        what = f"writes O_i, ℓ_i, m_i after every tile: {writes[name].sum():,} numbers (+ {fa1_init:,} to set them up)"
    else:
        what = f"writes O_i, λ_i after the last tile of a row: {writes[name].sum():,} numbers"
    ax.set_title(f"{title}\n{what}", fontsize=10)
fig.colorbar(image, ax=axes[:2], shrink=0.8, label="numbers written to slow memory after this tile")

ax = axes[2]
labels = ["standard", "FA-1", "FA-2"]
reads = [runs[k].reads for k in ("standard_forward", "fa1_forward", "fa2_forward")]
written = [runs[k].writes for k in ("standard_forward", "fa1_forward", "fa2_forward")]
pos = np.arange(3)
for offset, values, color, label in ((-0.2, reads, "tab:blue", "reads"), (0.2, written, "tab:orange", "writes")):
    bars = ax.bar(pos + offset, values, width=0.4, color=color, label=label)
    ax.bar_label(bars, [f"{n:,}" for n in values], fontsize=8)
ax.set_xticks(pos, labels)
ax.set_ylim(0, max(reads) * 1.25)
ax.set_ylabel("numbers moved (slow memory)")
ax.set_title("forward pass, counted by io_model", fontsize=10)
ax.legend(loc="upper right")
fig.suptitle(f"FA-1 rewrites O, ℓ, m in slow memory after every tile; FA-2 writes O and λ once per query tile "
             f"(N = {N}, E = {E}, M = {M}; numbers in tiles: order of computation)", fontsize=11)
save_figure(fig, "../figures/05_loop_orders.png")
plt.show()

# %% [markdown]
# ### How the counts scale with $M$ and $N$

# %%
E = 64
fig, axes = plt.subplots(1, 2, figsize=(14, 5.2), layout="constrained")

# against M at fixed N
N = 4096
Ms = 2.0 ** np.arange(8, 19)  # from 4E = 256 numbers up to NE
std = sum(io_closed_form("standard_forward", N, N, E, E))
ax = axes[0]
for kind, style, label in (("fa1_forward", "o-", "FA-1 forward"), ("fa2_forward", "s-", "FA-2 forward"),
                           ("fa1_backward", "^-", "FA-1 backward"), ("fa2_backward", "v-", "FA-2 backward")):
    ax.loglog(Ms, [sum(io_closed_form(kind, N, N, E, E, int(M_))) for M_ in Ms], style, label=label, ms=4)
c = sum(io_closed_form("fa1_forward", N, N, E, E, int(Ms[5]))) / (N**2 * E**2 / Ms[5])
ax.loglog(Ms, c * N**2 * E**2 / Ms, "k:", label=f"Θ(N²E²/M)  (× {c:.1f})")
ax.axhline(std, color="tab:red", label="standard forward: Θ(NE + N²), independent of M")
ax.axhline(sum(io_closed_form("standard_backward", N, N, E, E)), color="tab:red", linestyle="-.",
           label="standard backward, independent of M")
ax.axvline(2 * E**2, color="grey", linestyle="--", lw=1, label="M = 2E²: FA-2 forward = standard")
ax.set_xlabel("fast memory M (numbers)")
ax.set_ylabel("slow-memory reads + writes (numbers)")
ax.set_title(f"against M (N = {N}, E = {E})")
ax.legend(fontsize=8, loc="lower left")

# against N at fixed M
M = 2**15  # 32 Ki numbers: 128 KB of float32, the order of an A100 SM's on-chip memory
Ns = 2 ** np.arange(8, 15)
ax = axes[1]
ax.loglog(Ns, [sum(io_closed_form("standard_forward", int(N_), int(N_), E, E)) for N_ in Ns], "o-",
          color="tab:red", label="standard forward", ms=4)
for kind, style, label in (("fa1_forward", "o-", "FA-1 forward"), ("fa2_forward", "s-", "FA-2 forward")):
    ax.loglog(Ns, [sum(io_closed_form(kind, int(N_), int(N_), E, E, M)) for N_ in Ns], style, label=label, ms=4)
ax.loglog(Ns, 4 * (Ns * E + Ns**2.0), "k--", label="Θ(NE + N²)  (× 4)")
c = sum(io_closed_form("fa1_forward", int(Ns[-1]), int(Ns[-1]), E, E, M)) / (Ns[-1] ** 2 * E**2 / M)
ax.loglog(Ns, c * Ns**2.0 * E**2 / M, "k:", label=f"Θ(N²E²/M)  (× {c:.1f})")
# the instrumented runs land on the closed form (small N: the run is a Python loop over tiles)
for N_ in (256, 512):
    x_ = rng.standard_normal((N_, E))
    run = io_flash_forward(x_, x_, x_, M, algorithm="fa1")
    ax.plot(N_, run.total, "kx", ms=9)
ax.plot([], [], "kx", label="instrumented FA-1 run")
ax.set_xlabel("sequence length N")
ax.set_ylabel("slow-memory reads + writes (numbers)")
ax.set_title(f"against N (M = {M}, E = {E})")
ax.legend(fontsize=8, loc="upper left")
fig.suptitle("FlashAttention's slow-memory traffic falls like 1/M (FA-2's forward pass beats standard attention "
             "once M > 2E², the others a little later); at fixed M both grow like N²", fontsize=11)
save_figure(fig, "../figures/05_io_scaling.png")
plt.show()

# %%
for M_ in (2**12, 2**13, 2**15, 2**17):
    ratio = std / sum(io_closed_form("fa2_forward", 4096, 4096, E, E, M_))
    print(f"N = 4096, E = {E}, M = {M_:6d}: standard / FA-2 forward numbers moved = {ratio:5.2f}")
crossover = next(M_ for M_ in range(4 * E, 2**16) if sum(io_closed_form("fa2_forward", 4096, 4096, E, E, M_)) < std)
print(f"smallest M at which FA-2's forward pass moves fewer numbers than standard attention: {crossover}"
      f"  (2E² = {2 * E**2})")

# %% [markdown]
# Left: every flash curve falls like $1/M$ until the tiles stop growing (the streamed tile is capped
# at $E$ rows, and once $M \approx NE$ a single pass suffices), while standard attention does not depend
# on $M$ at all. Right: at a fixed, realistic $M$ both grow like $N^2$, but with the constant $E^2/M$ instead
# of 1.
#
# **The crossover.** At $M = 4096$ FA-2 moves about twice as many numbers as standard attention (the
# ratio printed is 0.51). Count where the numbers go. FA-2 reads all of $K$ and $V$ once per query tile,
# $T_q \cdot 2NE$ numbers with $T_q = N / B_q$; per logit that is $2E / B_q$ numbers (one key and one
# value row, shared by the $B_q$ queries of the tile). Standard attention moves about 4 numbers per
# logit: $Z$ written and read back, $P$ written and read back. With $B_q = \lceil M/4E \rceil$:
#
# $$
# \frac{2E}{B_q} < 4 \iff B_q > \frac{E}{2} \iff M \gtrsim 2E^2 ,
# $$
#
# 8192 numbers for $E = 64$ (the scan above finds 7937, the first $M$ with $B_q = 32$). Below it the
# query tile is so small that re-reading $K$ and $V$ for every tile costs more than writing $Z$ and $P$
# once. Theorem 2 says the same thing in order notation: $N^2 E^2 / M$ beats $N^2$ only when $M$ is
# larger than about $E^2$. Real GPUs are on the good side — an A100 has 192 KB of on-chip memory per
# streaming multiprocessor (FA-1 §2.1), 98 304 float16 numbers, 12× above $2E^2$ for $E = 64$ — and
# at $M = 32$ Ki numbers FA-2 moves 3.9× fewer numbers than standard attention, 14× at 128 Ki.
# Proposition 3 says no exact algorithm can do better in order for all $M$.
#
# ## Summary
#
# * The online softmax keeps $(m, \ell)$ per row and rescales by $e^{m - m_{\text{new}}}$ when the maximum
#   grows; applied to the output it gives $O \leftarrow \operatorname{diag}(e^{m - m_{\text{new}}}) O + \tilde P V_j$
#   and one division by $\ell$ at the end (FA-2's Algorithm 1 prints an inverse in line 10 that must not
#   be there).
# * `flash_attention` computes exact attention tile by tile, in FA-1's or FA-2's loop order, for any
#   lengths, masks, GQA, causal alignment and sliding windows; it matches stage 02 to rounding error and
#   never forms the $L \times S$ matrix. Tiles wholly masked are skipped.
# * The logsumexp $\lambda$ is all the backward pass needs: it recomputes $P$ tile by tile, and
#   $\operatorname{rowsum}(P \circ dP) = \operatorname{rowsum}(dO \circ O)$ removes the one sum over all keys.
# * `merge_attention_partials` combines $(O_s, \lambda_s)$ over key chunks: split-KV decoding and ring
#   attention in one line of algebra.
# * Memory is linear in $N$; slow-memory traffic is $\Theta(N^2 E^2 / M)$ instead of $\Theta(NE + N^2)$,
#   a saving once $M > 2E^2$. FA-1 rewrites $O, \ell, m$ after every tile, FA-2 writes $O$ and $\lambda$ once.
#
# Next, stage 06 compiles the same loop with Numba (`flash_attention(..., backend="numba")`).

# %% [markdown]
# ## Exercises
#
# The checker (`attention_ref.check`) runs your function on a battery of cases against a float64
# reference that materialises $P$, and names the first failing case, the smallest input that shows
# it and, for the classic mistakes (a running sum or output not rescaled, the paper's misprint, a last
# shorter tile forgotten), what went wrong. The experiments call the library's functions
# (`attention_ref.flash_attention`, the IO counters), so they work whatever state your answers are in.

# %%
import attention_ref
from attention_ref.check import check

# %% [markdown]
# **1. FlashAttention-2's forward pass, yourself.** Write
# `flash_attention(query, key, value, is_causal=False, scale=None, *, block_q=16, block_k=16, return_lse=False)`
# for query `(..., L, E)`, key `(..., S, E)`, value `(..., S, Ev)`, following section 3's loop: query tiles
# outside, key tiles inside, $(m, \ell, O)$ per query tile, one division by $\ell$ at the end. `is_causal`
# is top-left (query $i$ sees keys $j \le i$); skip the key tiles that lie wholly after a query tile's last
# row. With `return_lse=True` return $(O, \lambda)$. Lengths need not be multiples of the tiles; float32
# in gives float32 out. Guard the rows whose keys were all masked so far ($m = -\infty$).

# %% nbgrader={"grade": false, "grade_id": "flash-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def flash_attention(query, key, value, is_causal=False, scale=None, *, block_q=16, block_k=16, return_lse=False):
    ### BEGIN SOLUTION
    ### STUB L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    ### STUB tau = ...  # 1/√E unless scale is given
    ### STUB out = np.zeros(query.shape[:-1] + value.shape[-1:], dtype=query.dtype)
    ### STUB lse = np.zeros(query.shape[:-1], dtype=query.dtype)
    ### STUB for i0 in range(0, L, block_q):  # line 3: each query tile
    ### STUB     q_i = query[..., i0:i0 + block_q, :]  # line 4
    ### STUB     m, ell, o = ..., ..., ...  # line 5: −∞, 0, 0 for the rows of this tile
    ### STUB     for j0 in range(0, S, block_k):  # line 6: each key tile
    ### STUB         z = ...  # line 8: Z = τ Q_i K_jᵀ, −∞ where the causal mask hides a key
    ### STUB         ...  # lines 9–10: m_new, P̃, ℓ and O
    ### STUB     out[..., i0:i0 + block_q, :] = ...  # line 12: O_i / ℓ
    ### STUB     lse[..., i0:i0 + block_q] = ...  # line 13: λ_i = m + log ℓ
    ### STUB return (out, lse) if return_lse else out
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    tau = 1 / math.sqrt(E) if scale is None else scale  # a Python float keeps float32 float32
    out = np.zeros(query.shape[:-1] + value.shape[-1:], dtype=query.dtype)
    lse = np.zeros(query.shape[:-1], dtype=query.dtype)
    for i0 in range(0, L, block_q):  # line 3
        q_i = query[..., i0:i0 + block_q, :]  # line 4
        rows = np.arange(i0, i0 + q_i.shape[-2])[:, None]
        m = np.full(q_i.shape[:-1] + (1,), -np.inf, dtype=query.dtype)  # line 5
        ell = np.zeros_like(m)
        o = np.zeros(q_i.shape[:-1] + value.shape[-1:], dtype=query.dtype)
        for j0 in range(0, S, block_k):  # line 6
            if is_causal and j0 > rows[-1, 0]:  # every key of this tile and later ones is hidden
                break
            k_j, v_j = key[..., j0:j0 + block_k, :], value[..., j0:j0 + block_k, :]  # line 7
            z = tau * (q_i @ np.swapaxes(k_j, -1, -2))  # line 8
            if is_causal:
                z = np.where(np.arange(j0, j0 + k_j.shape[-2]) <= rows, z, -np.inf)
            m_new = np.maximum(m, z.max(axis=-1, keepdims=True))  # line 9
            shift = np.where(np.isfinite(m_new), m_new, 0)  # no (−∞) − (−∞)
            p = np.exp(z - shift)
            alpha = np.exp(m - shift)
            ell = alpha * ell + p.sum(axis=-1, keepdims=True)
            o = alpha * o + p @ v_j  # line 10, without the misprinted inverse
            m = m_new
        seen = ell > 0
        out[..., i0:i0 + block_q, :] = o / np.where(seen, ell, 1)  # line 12
        lse[..., i0:i0 + block_q] = np.where(seen, m + np.log(np.where(seen, ell, 1)), -np.inf)[..., 0]  # line 13
    return (out, lse) if return_lse else out
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "flash-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(flash_attention, "flash_attention", options=("is_causal", "scale", "return_lse"), raise_on_failure=True)

# %% [markdown]
# **2. Merging partial results.** Write `merge_attention_partials(outs, lses)`: `outs` is a list of
# partial outputs $O_s$ `(..., L, Ev)` over disjoint chunks of the keys, `lses` their logsumexps
# $\lambda_s$ `(..., L)`. Return $(O, \lambda)$ over all the keys, without overflow for large $\lambda_s$;
# a row that sees no key in any chunk ($\lambda_s = -\infty$ for every $s$) gives $O = 0$, $\lambda = -\infty$.

# %% nbgrader={"grade": false, "grade_id": "merge-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def merge_attention_partials(outs, lses):
    ### BEGIN SOLUTION
    ### STUB lam, o = np.stack(lses), np.stack(outs)  # (chunks, ..., L), (chunks, ..., L, Ev)
    ### STUB lse = ...  # λ = m + log Σ_s e^{λ_s − m}, m = max_s λ_s (and −∞ when every λ_s is −∞)
    ### STUB weights = ...  # e^{λ_s − λ}: chunk s's share of the row's softmax mass
    ### STUB return ..., lse
    lam, o = np.stack(lses), np.stack(outs)
    m = lam.max(axis=0)
    shift = np.where(np.isfinite(m), m, 0)
    total = np.exp(lam - shift).sum(axis=0)
    seen = total > 0
    lse = np.where(seen, shift + np.log(np.where(seen, total, 1)), -np.inf)
    weights = np.exp(lam - np.where(seen, lse, 0))
    return (weights[..., None] * o).sum(axis=0), lse
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "merge-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check(merge_attention_partials, "merge_attention_partials", raise_on_failure=True)

# %% [markdown]
# **3. Predict an IO count.** For $N = 256$, $E = E_v = 16$ and $M = 1024$, work out on paper, before
# running the cell, how many numbers FA-2's forward pass reads from and writes to slow memory (which
# tiles does it load, how often?), and how many FA-1's forward pass writes. Then run the cell.

# %%
x_io = np.random.default_rng(5).standard_normal((256, 16))
for algorithm in ("fa2", "fa1"):
    run = io_flash_forward(x_io, x_io, x_io, 1024, algorithm=algorithm)
    print(f"{algorithm}: tiles (B_q, B_k) = ({run.block_q}, {run.block_k}), reads {run.reads:,}, writes {run.writes:,}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "io-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# With $\lceil M/4E \rceil = 16$ both tile sizes are 16, so $T_q = T_k = 16$. FA-2 reads $Q$ once
# ($NE = 4096$) and all of $K$ and $V$ once per query tile ($T_q \cdot N(E + E_v) = 16 \cdot 256 \cdot 32 = 131\,072$):
# 135 168 reads. It writes $O$ and $\lambda$ once: $N(E_v + 1) = 4352$. FA-1 writes $O = 0$, $\ell = 0$,
# $m = -\infty$ once and then $O_i, \ell_i, m_i$ after each of the $T_q T_k = 256$ tiles:
# $(T_k + 1) \cdot N (E_v + 2) = 17 \cdot 256 \cdot 18 = 78\,336$ writes, 18 times as many.

# %% [markdown]
# **4. Tile sizes and skipped tiles.** Run causal attention over $N = 1024$ tokens with
# $B_q = B_k \in \{16, 32, 64, 128, 256\}$. Predict first: which fraction of the $N^2$ logits is computed,
# and which fraction of the computed logits is thrown away by the mask inside the diagonal tiles? What
# do small tiles cost instead?

# %%
N_causal = 1024
needed = N_causal * (N_causal + 1) // 2      # logits the causal mask keeps
print(" B   computed tiles  skipped  computed logits / N²  masked share of computed")
for block in (16, 32, 64, 128, 256):
    zeros = np.zeros((N_causal, 8))
    _, stats = attention_ref.flash_attention(zeros, zeros, zeros, is_causal=True, block_q=block, block_k=block,
                                             return_stats=True)
    computed = stats.computed * block * block
    print(f"{block:3d} {stats.computed:15d} {stats.skipped:8d} {computed / N_causal**2:21.3f} "
          f"{(computed - needed) / computed:25.3f}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "tiles-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# With $T = N/B$ tiles per side, the causal plan computes the $T(T+1)/2$ tiles on or below the diagonal:
# $\frac{T(T+1)}{2} B^2 = \frac{N^2}{2}(1 + \frac{1}{T})$ logits, a fraction $\frac{1}{2}(1 + B/N)$ of
# $N^2$ — 0.508 for $B = 16$, 0.625 for $B = 256$. The wasted share is the part above the diagonal
# inside the $T$ diagonal tiles, $T B (B-1)/2$ logits, a share $(B - 1)/(N + B)$ of those computed: 1.4 %
# for $B = 16$, 19.9 % for $B = 256$. Small tiles waste less arithmetic but cost elsewhere: $K$ and $V$ are read once per query tile (section 9: more slow-memory
# traffic), small matrix products run far below the hardware's peak, and each tile has its fixed
# overhead (here a Python loop step; on a GPU a thread block's set-up).

# %% [markdown]
# **5. FA-1's crossover.** Section 9 found that FA-2's forward pass moves fewer numbers than standard
# attention once $M \gtrsim 2E^2$. FA-1 keeps a key/value tile on chip and, for every key tile, reads $Q$,
# $O$, $\ell$, $m$ of all queries and writes $O$, $\ell$, $m$ back. Predict whether FA-1 needs a larger or
# a smaller $M$ than FA-2 to beat standard attention for $N = 4096$, $E = 64$, and roughly where its
# crossover lies; then find it by a scan.

# %%
std_4096 = sum(io_closed_form("standard_forward", 4096, 4096, 64, 64))
fa1_crossover = next(M_ for M_ in range(256, 2**17) if sum(io_closed_form("fa1_forward", 4096, 4096, 64, 64, M_)) < std_4096)
print(f"FA-1 forward moves fewer numbers than standard attention from M = {fa1_crossover} (FA-2: {crossover})")

# %% [markdown] nbgrader={"grade": true, "grade_id": "fa1-crossover-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# FA-1 needs a larger $M$. Per key tile ($T_k = N / B_k$ of them, $B_k = \lceil M/4E \rceil$) it reads
# $Q$, $O$, $\ell$, $m$ for all $N$ queries, $N(E + E_v + 2)$ numbers, and writes $O$, $\ell$, $m$ back,
# $N(E_v + 2)$: about $N(3E + 4)$ per key tile, so $\approx \frac{4E}{M} N^2 (3E + 4)$ in all, against
# standard attention's $\approx 4N^2$. Equal when $M \approx E(3E + 4) = 12\,544$ for $E = 64$ — half as
# much again as FA-2's $2E^2 = 8192$, because FA-1 also moves its running $O$ through slow memory. The
# scan gives 12 545 (the first $M$ with $B_k = 50$ keys per tile).
