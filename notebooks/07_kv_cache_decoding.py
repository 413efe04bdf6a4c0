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
# # 07 · Decoding with a KV cache
#
# A decoder writes text one token at a time: token $t+1$ is computed from tokens $1..t$, then
# appended, and the model runs again. Every run needs the keys and values of **all** previous tokens,
# for every layer and head. But those never change: token 3's key is the same at step 10 as at
# step 4. A **KV cache** keeps them, so a step projects only the new token and attends its one query
# to the cached keys:
#
# $$
# K \leftarrow \begin{bmatrix} K \\ k_{\text{new}} \end{bmatrix},\quad
# V \leftarrow \begin{bmatrix} V \\ v_{\text{new}} \end{bmatrix},\qquad
# o_{\text{new}} = \operatorname{softmax}\!\big(\tau\, q_{\text{new}} K^\top + M\big)\, V .
# $$
#
# The $t$ new queries of a step (one per generated token, or the whole prompt in the **prefill**) are
# the *last* $t$ positions, so $M$ is the **bottom-right** causal mask of stage 02,
# $\operatorname{tril}(\mathbf 1_{t\times S}, S-t)$. This notebook builds the cache
# (`attention_ref.kv_cache`), checks that cached decoding is *exactly* full causal attention, counts
# what it saves in FLOPs and costs in memory, and ends with two decoding tricks: **split-KV**
# (Flash-Decoding) and a **sliding-window** cache.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from attention_ref import (
    KVCache,
    causal_mask,
    decode_step,
    empty_kv_cache,
    flash_attention,
    merge_attention_partials,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
    split_kv_attention,
    truncate_kv,
)
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. What the cache saves: O(t·d) per step instead of O(t²·d)
#
# Count the attention FLOPs of one head (head size $d$) at decoding step $t$ (the new token is the
# $t$-th). **With a cache**, one query meets $t$ keys: $q K^\top$ is $2td$ FLOPs and $PV$ another
# $2td$, so $4td$. **Without a cache** the model re-runs attention over the whole prefix: $t$ queries
# against $t$ keys, $4t^2d$ (half of it masked by causality, which a tiled kernel can skip — still
# $\Theta(t^2 d)$). The projections behave the same way: one token's $q, k, v$ against $t$ tokens'.
# Generating $N$ tokens therefore costs $\sum_t 4td \approx 2N^2 d$ with the cache and
# $\sum_t 4t^2 d \approx \tfrac43 N^3 d$ without.

# %%
d = 128
print(f"attention FLOPs of one head, d = {d}")
print(f"{'step t':>7} | {'with cache 4td':>15} | {'recompute 4t²d':>15} | {'ratio':>7}")
for t in (16, 128, 1024, 8192):
    with_cache, without = 4 * t * d, 4 * t * t * d
    print(f"{t:7d} | {with_cache:15,d} | {without:15,d} | {without // with_cache:6d}x")

print(f"\nwhole generation of N tokens (sum over the steps), d = {d}")
for N in (128, 1024, 8192):
    steps = np.arange(1, N + 1, dtype=np.float64)
    with_cache, without = np.sum(4 * steps * d), np.sum(4 * steps**2 * d)
    print(f"N = {N:5d}: with cache {with_cache:9.2e} FLOPs, recompute {without:9.2e} FLOPs "
          f"({without / with_cache:6.0f}x)")

# %% [markdown]
# The ratio at step $t$ is exactly $t$: the cache turns the work of a step from the area of the
# causal triangle into one row of it. What it does not remove is the **reading** of the cache: every
# step still streams all $t$ cached keys and values from memory, $2td$ numbers for $4td$ FLOPs, so
# decoding is limited by memory bandwidth, not arithmetic. That is why the size of the cache
# (section 5) and how the read is spread over the GPU (section 6) matter.
#
# ## 2. Prefill, then decode: the bottom-right mask
#
# A prompt of 5 tokens is processed in one **prefill** step ($t = 5$ queries against $S = 5$ keys),
# then 3 tokens are generated one at a time ($t = 1$ against $S = 6, 7, 8$). Each step's mask is
# `causal_mask(t, S, "bottom_right")`; stacked, the rows form exactly the lower triangle of full
# causal attention over the 8 tokens.

# %%
steps = [5, 1, 1, 1]  # prefill of 5, then three decode steps
seen = 0
step_of_entry = np.full((sum(steps), sum(steps)), -1)
for s, t in enumerate(steps):
    S = seen + t
    m = to_numpy(causal_mask(t, S, "bottom_right"))
    print(f"step {s}: t = {t} new queries, S = {S} keys, mask rows {seen}..{S - 1}:")
    print(m.astype(int))
    step_of_entry[seen:S, :S] = np.where(m, s, -1)
    seen = S
stacked = step_of_entry >= 0
print("stacked rows == tril(ones(8, 8)):", bool(np.array_equal(stacked, np.tril(np.ones((8, 8), bool)))))

# %%
colors = ["#f2f2f2", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.25]})
ax = axes[0]
ax.imshow(step_of_entry + 1, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1)
for s, label in enumerate(["prefill (t = 5)", "decode 1", "decode 2", "decode 3"]):
    ax.plot([], [], "s", color=colors[s + 1], label=label, ms=10)
ax.legend(loc="upper right", fontsize=8)
ax.set_xticks(range(8))
ax.set_yticks(range(8))
ax.set_xlabel("key position j")
ax.set_ylabel("query position")
ax.set_title("Which step computes which entry")
ax = axes[1]
m = to_numpy(causal_mask(3, 8, "bottom_right")).astype(int) + to_numpy(causal_mask(3, 8, "top_left")).astype(int)
ax.imshow(m, cmap=ListedColormap(["#f2f2f2", "#dd8452", "#4c72b0"]), vmin=0, vmax=2)
ax.set_title("3 new queries, 8 keys: bottom-right (blue + orange)\nvs top-left (blue only)")
ax.set_xlabel("key position j")
ax.set_yticks(range(3))
ax.set_yticklabels(["query 5", "query 6", "query 7"])
fig.tight_layout()
save_figure(fig, "../figures/07_prefill_decode_mask.png")
plt.show()

# %% [markdown]
# Right: the top-left alignment (PyTorch's `is_causal=True`) would let the 3 new queries see only
# keys 0–2, as if they were the *first* tokens — wrong for decoding. Bottom-right lines the last
# query up with the last key.
#
# ## 3. Decoding step by step
#
# A toy single-head model: random token embeddings $x_p$ and projections $W_Q, W_K, W_V$ (seeded).
# `decode_step(q_new, k_new, v_new, cache)` appends the new keys and values to the cache and attends
# the new queries to everything cached; it returns the output and a **new** cache (the old one is
# not modified — a `KVCache` is a frozen value). We keep each step's attention weights to draw them.

# %%
rng = np.random.default_rng(7)
N, d_model, d = 8, 16, 8
x = rng.standard_normal((N, d_model))
W_q, W_k, W_v = (rng.standard_normal((d_model, d)) / np.sqrt(d_model) for _ in range(3))
Q, K, V = (xp.asarray((x @ W)[None]) for W in (W_q, W_k, W_v))  # (H = 1, N, d)

cache = empty_kv_cache((), 1, d, d, dtype=xp.float64, xp=xp)
outs, rows, seen = [], [], 0
for t in steps:
    sl = slice(seen, seen + t)
    out, cache = decode_step(Q[:, sl], K[:, sl], V[:, sl], cache)
    # the same weights, for the picture: softmax(q Kᵀ/√d) over the cache with the step's mask
    _, w = scaled_dot_product_attention(Q[:, sl], cache.keys, cache.values,
                                        attn_mask=causal_mask(t, cache.length, "bottom_right", xp=xp),
                                        return_weights=True)
    outs.append(to_numpy(out))
    rows.append(np.pad(to_numpy(w)[0], ((0, 0), (0, N - cache.length))))
    print(f"step with t = {t}: output {tuple(out.shape)}, cache now {tuple(cache.keys.shape)} keys")
    seen += t

# %%
labels = [f"x{p}" for p in range(N)]
fig, axes = plt.subplots(2, 1, figsize=(6.5, 6.2), gridspec_kw={"height_ratios": [5, 3]})
plot_attention(rows[0], labels[:5], labels, ax=axes[0], title="prefill: 5 queries at once (one step)",
               vmax=1.0, annotate=True)
decode_rows = np.concatenate(rows[1:], axis=0)
plot_attention(decode_rows, [f"step {s}: x{4 + s}" for s in (1, 2, 3)], labels, ax=axes[1],
               title="decode steps 1–3: one query each, over the whole cache", vmax=1.0, annotate=True)
fig.tight_layout()
save_figure(fig, "../figures/07_decode_weights.png")
plt.show()


# %% [markdown]
# Each decode step is one row of weights over all cached tokens, zero on the (not yet existing)
# future. Stacked, the four panels are the full causal weight matrix of the 8 tokens.
#
# ## 4. Cached decoding equals full causal attention
#
# The check of stages 02 and 05: feeding a sequence through `decode_step` — one prefill and then one
# token at a time — must give the outputs of `scaled_dot_product_attention(..., is_causal=True)` and
# of `flash_attention(..., is_causal=True)` over the whole sequence, for several heads and for GQA
# (query head $n$ reads KV head $n // (H/H_{kv})$), in float64 and float32.

# %%
def decode_all(q, k, v, chunks, **kwargs):
    cache = empty_kv_cache(tuple(k.shape[:-3]), k.shape[-3], k.shape[-1], v.shape[-1], dtype=q.dtype, xp=xp)
    outs, seen = [], 0
    for t in chunks:
        out, cache = decode_step(q[..., seen:seen + t, :], k[..., seen:seen + t, :], v[..., seen:seen + t, :],
                                 cache, **kwargs)
        outs.append(out)
        seen += t
    return xp.concat(outs, axis=-2), cache


def rel_err(a, b):
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


B, Hq, N, d = 2, 8, 40, 16
chunks = [16] + [1] * 24  # a 16-token prompt, then 24 generated tokens
for Hkv, kind in ((8, "MHA"), (2, "GQA"), (1, "MQA")):
    q = rng.standard_normal((B, Hq, N, d))
    k, v = rng.standard_normal((B, Hkv, N, d)), rng.standard_normal((B, Hkv, N, d))
    ref = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    flash = flash_attention(q, k, v, is_causal=True, enable_gqa=True)
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        a = [xp.asarray(t.astype(dtype)) for t in (q, k, v)]
        out, cache = decode_all(*a, chunks, enable_gqa=True)
        print(f"{kind} (H_kv = {Hkv}) {dtype}: cache {tuple(cache.keys.shape)}, "
              f"error vs SDPA < {tol:.0e}: {rel_err(out, ref) < tol}, vs flash < {tol:.0e}: {rel_err(out, flash) < tol}")

# %% [markdown]
# ## 5. What the cache costs: memory per token (MHA, GQA, MQA)
#
# The price of skipping the recomputation is memory: per token and layer the cache holds $K$ and $V$
# for each of the $H_{kv}$ key/value heads, $2 H_{kv} d$ numbers. Notebook 04 counted this for GQA;
# here we measure it on real `KVCache`s (`cache.nbytes`) of the toy above, then scale to real model
# shapes (float16, 2 bytes): Llama 2 70B (80 layers, 64 query heads of size 128, 8 KV heads) as MHA,
# GQA and MQA, and Mistral 7B v0.1 (32 layers, 8 KV heads of size 128), whose sliding window of 4096
# tokens (section 7) caps its cache.

# %%
print("toy caches after 40 tokens, batch 2, 8 query heads of size 16, float32:")
for Hkv, kind in ((8, "MHA"), (2, "GQA"), (1, "MQA")):
    c = KVCache(xp.zeros((2, Hkv, 40, 16), dtype=xp.float32), xp.zeros((2, Hkv, 40, 16), dtype=xp.float32))
    print(f"  {kind} H_kv = {Hkv}: {c.nbytes:6d} bytes = {c.nbytes // (2 * 40):4d} bytes per token "
          f"(2 × {Hkv} × 16 × 4 = {2 * Hkv * 16 * 4})")


def per_token(layers, h_kv, head_dim, bytes_per=2):
    return 2 * layers * h_kv * head_dim * bytes_per


print("\nwhole model, float16                 per token    4096 tokens   32768 tokens")
for name, layers, h_kv, head_dim, window in (
    ("Llama-2-70B shape as MHA (64 KV)", 80, 64, 128, None),
    ("Llama-2-70B, GQA (8 KV heads)", 80, 8, 128, None),
    ("Llama-2-70B shape as MQA (1 KV)", 80, 1, 128, None),
    ("Mistral-7B, GQA + window 4096", 32, 8, 128, 4096),
):
    row = [f"{per_token(layers, h_kv, head_dim) / 1024:7.0f} KiB"]
    for n in (4096, 32768):
        kept = n if window is None else min(n, window)
        row.append(f"{per_token(layers, h_kv, head_dim) * kept / 2**30:9.2f} GiB")
    print(f"{name:36s} {'   '.join(row)}")

# %% [markdown]
# For a batch the cache is multiplied by the batch size; at long contexts it, not the weights,
# fills the GPU. GQA divides it by $H/H_{kv}$ (8× for Llama 2 70B) and a sliding window stops its
# growth.
#
# ## 6. Split-KV decoding (Flash-Decoding)
#
# With one query per sequence ($L = 1$), FlashAttention's parallelism over (batch, heads, query
# blocks) leaves most of a GPU idle: there is one query block. **Flash-Decoding** (Dao, Haziza,
# Massa & Sizov 2023) parallelises over the *keys* instead: cut the cache into $n$ chunks, compute
# each chunk's output $O_s$ and logsumexp $\mathrm{lse}_s$ independently (stage 05's
# `flash_attention(..., return_lse=True)`), and merge them exactly with the rule of
# `merge_attention_partials`:
#
# $$
# \mathrm{lse} = \log \sum_s e^{\mathrm{lse}_s}, \qquad
# O = \sum_s e^{\,\mathrm{lse}_s - \mathrm{lse}}\; O_s .
# $$
#
# Chunk $s$ contributes in proportion to its share $e^{\mathrm{lse}_s-\mathrm{lse}}$ of the softmax
# mass; the shares sum to 1. `split_kv_attention(q, k, v, num_splits)` does exactly this.

# %%
S, d = 37, 16
q1 = xp.asarray(rng.standard_normal((2, 4, 1, d)))  # one new query per sequence and head
k1, v1 = xp.asarray(rng.standard_normal((2, 4, S, d))), xp.asarray(rng.standard_normal((2, 4, S, d)))
ref = scaled_dot_product_attention(q1, k1, v1)
for n in (1, 2, 3, 4, S):
    out = split_kv_attention(q1, k1, v1, n)
    print(f"num_splits = {n:2d}: chunk sizes {[(s + 1) * S // n - s * S // n for s in range(n)][:6]}"
          f"{' …' if n > 6 else ''}, equals SDPA to 1e-12: {rel_err(out, ref) < 1e-12}")

# the merge by hand for 3 chunks: the shares e^{lse_s - lse} sum to 1
bounds = [0, 12, 24, 37]
parts = [flash_attention(q1, k1[..., a:b, :], v1[..., a:b, :], return_lse=True) for a, b in zip(bounds, bounds[1:])]
merged, lse = merge_attention_partials([o for o, _ in parts], [s for _, s in parts])
shares = np.stack([np.exp(to_numpy(s) - to_numpy(lse)) for _, s in parts])[:, 0, 0, 0]
print("\nbatch 0, head 0: chunk shares e^(lse_s - lse) =", np.round(shares, 3), " sum =", np.round(shares.sum(), 12))
print("hand merge equals SDPA to 1e-12:", rel_err(merged, ref) < 1e-12)

# %%
_, w = scaled_dot_product_attention(q1, k1, v1, return_weights=True)
w = to_numpy(w)[0, 0, 0]
fig, ax = plt.subplots(figsize=(10, 3.4))
chunk_colors = ["#4c72b0", "#dd8452", "#55a868"]
for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
    ax.bar(np.arange(a, b), w[a:b], color=chunk_colors[s], width=0.85,
           label=f"chunk {s}: keys {a}–{b - 1}, share e^(lse_s − lse) = {shares[s]:.3f}")
    ax.axvspan(a - 0.5, b - 0.5, color=chunk_colors[s], alpha=0.08)
ax.set_xlabel("key position j (the cache)")
ax.set_ylabel("weight of the new query")
ax.set_title("Split-KV: each chunk is attended separately; the shares weight the chunk outputs")
ax.legend(fontsize=8, loc="upper right")
fig.tight_layout()
save_figure(fig, "../figures/07_split_kv.png")
plt.show()

# %% [markdown]
# Each chunk's share is the sum of the full softmax weights that fall inside it, which is why the
# merge is exact and not an approximation. A chunk in which every key is masked (padding in a batch
# of sequences of different lengths) has $\mathrm{lse}_s = -\infty$ and share 0:

# %%
lengths = np.array([37, 10])  # sequence 1 has only 10 real tokens: chunks 1 and 2 are all padding
pad = xp.asarray(padding_mask(lengths, S))
out, lse = split_kv_attention(q1, k1, v1, 3, attn_mask=pad, return_lse=True)
print("equals SDPA with the padding mask to 1e-12:",
      rel_err(out, scaled_dot_product_attention(q1, k1, v1, attn_mask=pad)) < 1e-12)
for n in (1, 2, 3):
    o_s, lse_s = flash_attention(q1[1:], k1[1:, ..., bounds[n - 1]:bounds[n], :], v1[1:, ..., bounds[n - 1]:bounds[n], :],
                                 attn_mask=pad[1:, ..., bounds[n - 1]:bounds[n]], return_lse=True)
    print(f"sequence 1, chunk {n - 1}: lse_s (head 0) = {float(to_numpy(lse_s)[0, 0, 0]):.3f}")

# %% [markdown]
# ## 7. A sliding-window cache
#
# With a sliding window of $w$ (Longformer; Mistral uses $w = 4096$), query $p$ sees only keys
# $p - w \le j \le p$: `decode_step(..., window=w)` applies stage 02's
# `sliding_window_mask(t, S, w, 0, "bottom_right")`. Keys older than $w$ tokens will never be read
# again, so the cache can drop them: `truncate_kv(cache, w)` keeps the last $w$ tokens (a rolling
# buffer), memory stays $O(w)$, and because the bottom-right mask is relative to the *end* of the
# cache the outputs do not change.

# %%
N, w_left = 24, 5
q = xp.asarray(rng.standard_normal((1, 2, N, 8)))
k, v = xp.asarray(rng.standard_normal((1, 2, N, 8))), xp.asarray(rng.standard_normal((1, 2, N, 8)))
ref = scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(N, N, w_left, 0, xp=xp))

full = empty_kv_cache((1,), 2, 8, 8, dtype=xp.float64, xp=xp)
rolling = full
outs_full, outs_roll, len_full, len_roll = [], [], [], []
for p in range(N):
    sl = slice(p, p + 1)
    o, full = decode_step(q[..., sl, :], k[..., sl, :], v[..., sl, :], full, window=w_left)
    o2, rolling = decode_step(q[..., sl, :], k[..., sl, :], v[..., sl, :], rolling, window=w_left)
    len_roll.append(rolling.length)  # length while attending: w + 1 at most
    rolling = truncate_kv(rolling, w_left)
    outs_full.append(o)
    outs_roll.append(o2)
    len_full.append(full.length)
print("window, full cache    == SDPA with sliding_window_mask:", rel_err(xp.concat(outs_full, axis=-2), ref) < 1e-12)
print("window, rolling cache == SDPA with sliding_window_mask:", rel_err(xp.concat(outs_roll, axis=-2), ref) < 1e-12)
print(f"cache length after {N} tokens: full {full.length}, rolling {rolling.length} "
      f"({full.nbytes} vs {rolling.nbytes} bytes)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
ax.imshow(to_numpy(sliding_window_mask(N, N, w_left, 0)), cmap=ListedColormap(["#f2f2f2", "#4c72b0"]))
ax.set_title(f"sliding_window_mask(left = {w_left}, right = 0)")
ax.set_xlabel("key position j")
ax.set_ylabel("query position")
ax = axes[1]
ax.plot(range(1, N + 1), len_full, "o-", ms=3, label="full cache (grows with t)")
ax.plot(range(1, N + 1), len_roll, "s-", ms=3, label=f"rolling cache (at most w + 1 = {w_left + 1})")
ax.set_xlabel("decoding step (tokens so far)")
ax.set_ylabel("cached tokens while attending")
ax.set_title("Same outputs, bounded memory")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "../figures/07_sliding_window_cache.png")
plt.show()

# %% [markdown]
# ## What we learned / next stage
#
# * A KV cache stores the keys and values of past tokens; a decode step appends one token's and
#   attends one query to the cache: $4td$ attention FLOPs at step $t$ instead of $4t^2d$ — the
#   ratio is $t$, and generating $N$ tokens drops from $\Theta(N^3 d)$ to $\Theta(N^2 d)$.
# * The new queries are the last positions, so the mask is the **bottom-right** causal mask; a
#   prefill is the same step with $t > 1$. Cached decoding equals full causal attention (SDPA and
#   FlashAttention) to $10^{-12}$ in float64, for MHA, GQA and MQA.
# * The cache costs $2 H_{kv} d$ numbers per token and layer: GQA/MQA shrink it by $H/H_{kv}$, a sliding
#   window caps it at $w$ tokens (`truncate_kv`) without changing the outputs.
# * Split-KV decoding (Flash-Decoding) parallelises one query over chunks of the cache and merges
#   $(O_s, \mathrm{lse}_s)$ exactly with the logsumexp rule of stage 05; fully masked chunks get
#   weight 0.
#
# **Next — 08 A real model:** a pretrained encoder in NumPy on top of the course's own
# multi-head attention.
