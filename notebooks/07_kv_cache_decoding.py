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
# A decoder writes text one token at a time: the token at step $t+1$ is computed from the $t$
# tokens before it, then appended, and the model runs again. Every run needs the keys and values of
# **all** previous tokens, for every layer and head. In a decoder they never change — section 1
# shows why — so a **KV cache** keeps them, and a step projects only the new tokens and attends
# their queries to the cached keys:
#
# $$
# K \leftarrow \begin{bmatrix} K \\ K_{\text{new}} \end{bmatrix},\quad
# V \leftarrow \begin{bmatrix} V \\ V_{\text{new}} \end{bmatrix},\qquad
# O_{\text{new}} = \operatorname{softmax}(Z)\, V,\quad Z = \tau\, Q_{\text{new}} K^\top + \Delta .
# $$
#
# The $L$ new queries of a step (one per generated token, or the whole prompt in the **prefill**)
# are the *last* $L$ of the $S$ positions in the cache, so the boolean mask $A$ is the
# **bottom-right** causal mask of stage 02, $A = \operatorname{tril}(\mathbf 1_{L\times S},\, S-L)$,
# and $\Delta_{ij} = 0$ where $A_{ij}$ is True, $-\infty$ elsewhere. This notebook explains why
# caching is valid (and why an encoder cannot cache), builds the cache (`attention_ref.kv_cache`),
# checks that cached decoding is *exactly* full causal attention, counts what it saves in FLOPs and
# costs in memory, shows two decoding tricks — **split-KV** (Flash-Decoding) and a
# **sliding-window** cache — and ends by decoding a real prompt with the caches of a real
# 30-layer decoder (SmolLM2-135M, section 9).

# %% [markdown]
# **Notation** (the course's table; this notebook uses these rows):
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $t$ | decoding step: tokens generated or cached so far | `t` |
# | $L$ | new queries in one step (1 when decoding, the prompt length when prefilling) | `L`, `q_new.shape[-2]` |
# | $S$ | keys and values in the cache after the step (the cache length) | `S`, `cache.length` |
# | $N$ | length of a whole sequence (when $L = S$) | `N` |
# | $E$, $E_v$ | query/key and value size per head | `E`, `Ev` |
# | $H$, $H_{kv}$ | query heads, key/value heads (GQA: $H_{kv}$ divides $H$) | `H`, `Hkv` |
# | $Q, K, V, O$ | queries, keys, values, output; $Q_{\text{new}}, K_{\text{new}}, V_{\text{new}}$ for a step's new tokens | `q_new`, `k_new`, `v_new`, `out` |
# | $\tau$ | the scale, $1/\sqrt E$ | `scale` |
# | $Z$, $P$ | logits and attention weights ($L \times S$), entries $z_{ij}$, $p_{ij}$ | `logits`, `weights` |
# | $A$, $\Delta$ | boolean mask (True = may attend) and its additive form ($0$ or $-\infty$) | `attn_mask` |
# | $\lambda$ | logsumexp of a row of $Z$ | `lse` |
#
# Local to this notebook: $X^{(n)}$ is the input of layer $n$ of a model (one row per token), $c$
# numbers the chunks of split-KV decoding, and $w$ is the width of a sliding window.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from attention_ref import (
    KVCache,
    bert_embeddings,
    bert_layer,
    causal_mask,
    decode_step,
    empty_kv_cache,
    flash_attention,
    load_bert,
    merge_attention_partials,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
    split_kv_attention,
    tokenize,
    truncate_kv,
)
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. Why a cache is allowed: causal layers never revise the past
#
# Layer $n$ of a Transformer computes its keys and values from its input, row by row:
# $K^{(n)} = X^{(n)} W_K + b_K$ and $V^{(n)} = X^{(n)} W_V + b_V$. Row $j$ of them depends only on
# row $j$ of $X^{(n)}$. Now follow row $j$ through a layer:
#
# * the layer norms, the feed-forward network and the residual connections act on each row alone;
# * attention mixes rows, but with a **causal** mask row $j$ of the output reads only rows
#   $\le j$ of the input.
#
# So row $j$ of $X^{(n+1)}$ depends only on rows $\le j$ of $X^{(n)}$, and by induction over the
# layers only on the tokens at positions $\le j$ (the token embedding plus the embedding of its
# position $j$, which does not move either). Appending a token at the end therefore changes **no**
# earlier row of any layer: the cached $K^{(n)}, V^{(n)}$ of the prefix stay exactly right. In a
# **bidirectional** encoder (stage 08's MiniLM, BERT) attention has no mask, row $j$ of layer 1
# already reads every token, and appending one token changes every earlier key and value from the
# second layer on: there is nothing to cache.
#
# We can watch both with one set of weights. Stage 08's MiniLM is an encoder, trained
# bidirectionally; run with a causal mask in every layer it is no longer a useful model, but it *is*
# a causal stack of six real Transformer layers. `prefix_keys_values` runs its layers
# (`bert_embeddings`, `bert_layer`; float64) and returns every layer's keys and values.

# %%
minilm = load_bert(xp=xp, dtype=xp.float64)
H_minilm = minilm.config.num_attention_heads


def prefix_keys_values(ids, causal):
    """Every layer's K and V (1, N, d_model) for the token ids (1, N), with or without a causal mask."""
    x = bert_embeddings(minilm, ids)  # X^(0)
    N = ids.shape[-1]
    mask = causal_mask(N, N, xp=xp) if causal else None
    keys_values = []
    for layer in minilm.layers:
        p = layer.attention
        keys_values.append((x @ p.W_k + p.b_k, x @ p.W_v + p.b_v))  # K^(n), V^(n) from X^(n)
        x = bert_layer(x, layer, H_minilm, attn_mask=mask, eps=minilm.config.layer_norm_eps,
                       activation=minilm.config.hidden_act)  # X^(n+1)
    return keys_values


ids, _, tokens = tokenize(minilm, "The animal didn't cross the street because it was too tired.")
tokens = tokens[0]
n_prefix = tokens.index("it")  # the prefix: [CLS] … "because"; the new token: "it"
print("prefix:   ", tokens[:n_prefix])
print("new token:", tokens[n_prefix])

# %% [markdown]
# Compute every layer's keys and values for the prefix alone and for the prefix plus the new token,
# and compare the prefix's rows. The change is measured per token, relative to the size of its key:
# $\lVert \Delta k_j \rVert / \lVert k_j \rVert$.

# %%
def relative_change(before, after):
    """(layers, n_prefix): ‖Δk_j‖ / ‖k_j‖ for the prefix's rows of each layer's K (or V)."""
    before, after = to_numpy(before)[0], to_numpy(after)[0, : before.shape[-2]]
    return np.linalg.norm(after - before, axis=-1) / np.linalg.norm(before, axis=-1)


change = {}
for causal, name in ((True, "causal"), (False, "bidirectional")):
    without = prefix_keys_values(xp.asarray(ids[:, :n_prefix]), causal)
    with_new = prefix_keys_values(xp.asarray(ids[:, : n_prefix + 1]), causal)
    change[name] = {kind: np.stack([relative_change(b[i], a[i]) for b, a in zip(without, with_new)])
                    for i, kind in enumerate(("K", "V"))}
    for kind in ("K", "V"):
        worst = change[name][kind].max(axis=1)
        print(f"{name:13s} {kind}: largest relative change of a prefix row, layer 0..5:",
              " ".join(f"{c:.2f}" for c in worst),
              f"  all < 1e-12: {bool(worst.max() < 1e-12)}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
vmax = max(change["bidirectional"]["K"].max(), 1e-3)
for ax, name in zip(axes, ("causal", "bidirectional")):
    image = ax.imshow(change[name]["K"], cmap="magma", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_prefix))
    ax.set_xticklabels(tokens[:n_prefix], rotation=60)
    ax.set_xlabel("prefix token j (key row in the cache)")
    ax.set_title(f"{name} MiniLM: max change {change[name]['K'].max():.2f}")
axes[0].set_ylabel("layer n")
fig.colorbar(image, ax=axes, label="‖Δk_j‖ / ‖k_j‖ after appending 'it'")
fig.suptitle("Appending a token changes no cached key of a causal stack; in a bidirectional one "
             "it changes the keys of every layer after the first", y=1.03)
save_figure(fig, "../figures/07_cache_validity.png")
plt.show()

# %% [markdown]
# With the causal mask the prefix's keys and values are identical to the last bit in all six layers:
# a cache computed once stays right for ever. Without it they are identical only in layer 0 (its
# keys come straight from the embeddings, where no token sees another) and change from layer 1 on,
# by up to a fifth of a key's length here — most for "because", the new token's neighbour. That is why a decoder caches and an encoder like MiniLM, BERT or the encoder half of
# a translation model re-encodes its whole input whenever the input changes — which it rarely needs
# to: it reads a fixed text once. (The same argument needs positions that do not move: MiniLM's
# learned absolute position embeddings and the rotary embeddings of today's decoders both give
# token $j$ a position that appending does not change.)
#
# ## 2. What the cache saves: $O(tE)$ per step instead of $O(t^2E)$
#
# Count the attention FLOPs of one head (head size $E$) at decoding step $t$ (the new token is the
# $t$-th, so $S = t$). **With a cache**, one query meets $t$ keys: $Q_{\text{new}} K^\top$ is $2tE$
# FLOPs and $PV$ another $2tE$, so $4tE$. **Without a cache** the model re-runs attention over the
# whole prefix: $t$ queries against $t$ keys, $4t^2E$ (half of it masked by causality, which a tiled
# kernel can skip — still $\Theta(t^2 E)$). The projections behave the same way: one token's
# $q, k, v$ against $t$ tokens'. Generating $N$ tokens therefore costs $\sum_t 4tE \approx 2N^2 E$
# with the cache and $\sum_t 4t^2 E \approx \tfrac43 N^3 E$ without.

# %%
E = 128
print(f"attention FLOPs of one head, E = {E}")
print(f"{'step t':>7} | {'with cache 4tE':>15} | {'recompute 4t²E':>15} | {'ratio':>7}")
for t in (16, 128, 1024, 8192):
    with_cache, without = 4 * t * E, 4 * t * t * E
    print(f"{t:7d} | {with_cache:15,d} | {without:15,d} | {without // with_cache:6d}x")

print(f"\nwhole generation of N tokens (sum over the steps), E = {E}")
for N in (128, 1024, 8192):
    steps = np.arange(1, N + 1, dtype=np.float64)
    with_cache, without = np.sum(4 * steps * E), np.sum(4 * steps**2 * E)
    print(f"N = {N:5d}: with cache {with_cache:9.2e} FLOPs, recompute {without:9.2e} FLOPs "
          f"({without / with_cache:6.0f}x)")

# %% [markdown]
# The ratio at step $t$ is exactly $t$: the cache turns the work of a step from the area of the
# causal triangle into one row of it. What it does not remove is the **reading** of the cache: every
# step still streams all $t$ cached keys and values from memory, $2tE$ numbers for $4tE$ FLOPs, so
# decoding is limited by memory bandwidth, not arithmetic. That is why the size of the cache
# (section 6) and how the read is spread over the GPU (section 7) matter.
#
# ## 3. Prefill, then decode: the bottom-right mask
#
# A prompt of 5 tokens is processed in one **prefill** step ($L = 5$ queries against $S = 5$ keys),
# then 3 tokens are generated one at a time ($L = 1$ against $S = 6, 7, 8$). Each step's mask is
# `causal_mask(L, S, "bottom_right")`; stacked, the rows form exactly the lower triangle of full
# causal attention over the 8 tokens.

# %%
steps = [5, 1, 1, 1]  # prefill of 5, then three decode steps
seen = 0
step_of_entry = np.full((sum(steps), sum(steps)), -1)
for s, L in enumerate(steps):
    S = seen + L
    A = to_numpy(causal_mask(L, S, "bottom_right"))
    print(f"step {s}: L = {L} new queries, S = {S} keys, mask rows {seen}..{S - 1}:")
    print(A.astype(int))
    step_of_entry[seen:S, :S] = np.where(A, s, -1)
    seen = S
stacked = step_of_entry >= 0
print("stacked rows == tril(ones(8, 8)):", bool(np.array_equal(stacked, np.tril(np.ones((8, 8), bool)))))

# %%
colors = ["#f2f2f2", "#4c72b0", "#dd8452", "#55a868", "#c44e52"]
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.35]})
ax = axes[0]
ax.imshow(step_of_entry + 1, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1)
ax.set_xticks(range(8))
ax.set_yticks(range(8))
ax.set_xlabel("key position j")
ax.set_ylabel("query position i")
ax.set_title("Prefill + 3 decode steps fill exactly\nthe causal triangle of 8 tokens")
ax.legend(handles=[Patch(color=colors[s + 1], label=label) for s, label in
                   enumerate(["prefill (L = 5)", "decode step 1", "decode step 2", "decode step 3"])]
          + [Patch(color=colors[0], label="masked (A = False)")],
          loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
ax = axes[1]
both = to_numpy(causal_mask(3, 8, "bottom_right")).astype(int) + to_numpy(causal_mask(3, 8, "top_left")).astype(int)
alignment_colors = ["#f2f2f2", "#dd8452", "#4c72b0"]
ax.imshow(both, cmap=ListedColormap(alignment_colors), vmin=0, vmax=2)
ax.set_title("3 new queries, 8 keys: top-left would hide keys\nthe new queries must see")
ax.set_xlabel("key position j")
ax.set_ylabel("new query (its position i)")
ax.set_xticks(range(8))
ax.set_yticks(range(3))
ax.set_yticklabels(["query 5", "query 6", "query 7"])
ax.legend(handles=[Patch(color=alignment_colors[2], label="allowed by both alignments"),
                   Patch(color=alignment_colors[1], label="allowed by bottom-right only (correct)"),
                   Patch(color=alignment_colors[0], label="masked by both")],
          loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, fontsize=8)
fig.tight_layout()
save_figure(fig, "../figures/07_prefill_decode_mask.png")
plt.show()

# %% [markdown]
# Right: the top-left alignment (PyTorch's `is_causal=True`) would let the 3 new queries see only
# keys 0–2, as if they were the *first* tokens — wrong for decoding. Bottom-right lines the last
# query up with the last key.
#
# ## 4. Decoding step by step
#
# A toy single-head model: random token embeddings $x_i$ and projections $W_Q, W_K, W_V$ (seeded).
# `decode_step(q_new, k_new, v_new, cache)` appends the new keys and values to the cache and attends
# the new queries to everything cached; it returns the output and a **new** cache (the old one is
# not modified — a `KVCache` is a frozen value). We keep each step's attention weights $P$ to draw
# them.

# %%
rng = np.random.default_rng(7)
N, d_model, E = 8, 16, 8
x = rng.standard_normal((N, d_model))
W_q, W_k, W_v = (rng.standard_normal((d_model, E)) / np.sqrt(d_model) for _ in range(3))
Q, K, V = (xp.asarray((x @ W)[None]) for W in (W_q, W_k, W_v))  # (H = 1, N, E)

cache = empty_kv_cache((), 1, E, E, dtype=xp.float64, xp=xp)
outs, rows, seen = [], [], 0
for L in steps:
    new = slice(seen, seen + L)
    out, cache = decode_step(Q[:, new], K[:, new], V[:, new], cache)
    # the same weights, for the picture: P = softmax(τ Q_new Kᵀ + Δ) over the cache, the step's mask
    _, P = scaled_dot_product_attention(Q[:, new], cache.keys, cache.values,
                                        attn_mask=causal_mask(L, cache.length, "bottom_right", xp=xp),
                                        return_weights=True)
    outs.append(to_numpy(out))
    rows.append(np.pad(to_numpy(P)[0], ((0, 0), (0, N - cache.length))))
    print(f"step with L = {L}: output {tuple(out.shape)}, cache now S = {cache.length} keys {tuple(cache.keys.shape)}")
    seen += L

# %%
labels = [f"x{i}" for i in range(N)]
fig, axes = plt.subplots(2, 1, figsize=(6.5, 6.6), gridspec_kw={"height_ratios": [5, 3]})
plot_attention(rows[0], labels[:5], labels, ax=axes[0], title="prefill: 5 queries at once (one step)",
               vmax=1.0, annotate=True)
decode_rows = np.concatenate(rows[1:], axis=0)
plot_attention(decode_rows, [f"step {s}: x{4 + s}" for s in (1, 2, 3)], labels, ax=axes[1],
               title="decode steps 1–3: one query each, over the whole cache", vmax=1.0, annotate=True)
for ax in axes:
    ax.set_xlabel("key (cached token)")
fig.suptitle("Weights P of each step: stacked, they are the causal weights of all 8 tokens", y=1.0)
fig.tight_layout()
save_figure(fig, "../figures/07_decode_weights.png")
plt.show()


# %% [markdown]
# Each decode step is one row of weights over all cached tokens, zero on the (not yet existing)
# future. Stacked, the prefill's five rows and the three decode rows — the two panels — are the full
# causal weight matrix of the 8 tokens.
#
# ## 5. Cached decoding equals full causal attention
#
# The check of stages 02 and 05: feeding a sequence through `decode_step` — one prefill and then one
# token at a time — must give the outputs of `scaled_dot_product_attention(..., is_causal=True)` and
# of `flash_attention(..., is_causal=True)` over the whole sequence, for several heads and for GQA
# (query head $h$ reads KV head $\lfloor h / (H/H_{kv}) \rfloor$), in float64 and float32.

# %%
def decode_all(q, k, v, chunks, **kwargs):
    cache = empty_kv_cache(tuple(k.shape[:-3]), k.shape[-3], k.shape[-1], v.shape[-1], dtype=q.dtype, xp=xp)
    outs, seen = [], 0
    for L in chunks:
        out, cache = decode_step(q[..., seen:seen + L, :], k[..., seen:seen + L, :], v[..., seen:seen + L, :],
                                 cache, **kwargs)
        outs.append(out)
        seen += L
    return xp.concat(outs, axis=-2), cache


def rel_err(a, b):
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


B, H, N, E = 2, 8, 40, 16
chunks = [16] + [1] * 24  # a 16-token prompt, then 24 generated tokens
for Hkv, kind in ((8, "MHA"), (2, "GQA"), (1, "MQA")):
    q = rng.standard_normal((B, H, N, E))
    k, v = rng.standard_normal((B, Hkv, N, E)), rng.standard_normal((B, Hkv, N, E))
    ref = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    flash = flash_attention(q, k, v, is_causal=True, enable_gqa=True)
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        a = [xp.asarray(x.astype(dtype)) for x in (q, k, v)]
        out, cache = decode_all(*a, chunks, enable_gqa=True)
        print(f"{kind} (H_kv = {Hkv}) {dtype}: cache {tuple(cache.keys.shape)}, "
              f"error vs SDPA < {tol:.0e}: {rel_err(out, ref) < tol}, vs flash < {tol:.0e}: {rel_err(out, flash) < tol}")

# %% [markdown]
# ## 6. What the cache costs: memory per token (MHA, GQA, MQA)
#
# The price of skipping the recomputation is memory: per token and layer the cache holds $K$ and $V$
# for each of the $H_{kv}$ key/value heads, $2 H_{kv} E$ numbers. Notebook 04 counted this for GQA;
# here we measure it on real `KVCache`s (`cache.nbytes`) of the toy above, then scale to real model
# shapes (float16, 2 bytes): Llama 2 70B (80 layers, 64 query heads of size 128, 8 KV heads) as MHA,
# GQA and MQA, and Mistral 7B v0.1 (32 layers, 8 KV heads of size 128), whose sliding window of 4096
# tokens (section 8) caps its cache.

# %%
print("toy caches after 40 tokens, batch 2, 8 query heads of size 16, float32:")
for Hkv, kind in ((8, "MHA"), (2, "GQA"), (1, "MQA")):
    c = KVCache(xp.zeros((2, Hkv, 40, 16), dtype=xp.float32), xp.zeros((2, Hkv, 40, 16), dtype=xp.float32))
    print(f"  {kind} H_kv = {Hkv}: {c.nbytes:6d} bytes = {c.nbytes // (2 * 40):4d} bytes per token "
          f"(2 × {Hkv} × 16 × 4 = {2 * Hkv * 16 * 4})")


def per_token(layers, Hkv, E, bytes_per_number=2):
    """Cache bytes per token of a whole model: K and V, every layer, every KV head."""
    return 2 * layers * Hkv * E * bytes_per_number


print("\nwhole model, float16                 per token    4096 tokens   32768 tokens")
for name, layers, Hkv, E_model, window in (
    ("Llama-2-70B shape as MHA (64 KV)", 80, 64, 128, None),
    ("Llama-2-70B, GQA (8 KV heads)", 80, 8, 128, None),
    ("Llama-2-70B shape as MQA (1 KV)", 80, 1, 128, None),
    ("Mistral-7B, GQA + window 4096", 32, 8, 128, 4096),
):
    row = [f"{per_token(layers, Hkv, E_model) / 1024:7.0f} KiB"]
    for n in (4096, 32768):
        kept = n if window is None else min(n, window)
        row.append(f"{per_token(layers, Hkv, E_model) * kept / 2**30:9.2f} GiB")
    print(f"{name:36s} {'   '.join(row)}")

# %% [markdown]
# For a batch the cache is multiplied by the batch size; at long contexts it, not the weights,
# fills the GPU. GQA divides it by $H/H_{kv}$ (8× for Llama 2 70B) and a sliding window stops its
# growth.
#
# ## 7. Split-KV decoding (Flash-Decoding)
#
# With one query per sequence ($L = 1$), FlashAttention's parallelism over (batch, heads, query
# blocks) leaves most of a GPU idle: there is one query block. **Flash-Decoding** (Dao, Haziza,
# Massa & Sizov 2023) parallelises over the *keys* instead: cut the cache into chunks
# $c = 1, \dots, C$, compute each chunk's output $O_c$ and logsumexp $\lambda_c$ independently
# (stage 05's `flash_attention(..., return_lse=True)`), and merge them exactly with the rule of
# `merge_attention_partials`:
#
# $$
# \lambda = \log \sum_c e^{\lambda_c}, \qquad
# O = \sum_c e^{\,\lambda_c - \lambda}\; O_c .
# $$
#
# Chunk $c$ contributes in proportion to its share $e^{\lambda_c-\lambda}$ of the softmax mass; the
# shares sum to 1. `split_kv_attention(q, k, v, num_splits)` does exactly this with $C$ =
# `num_splits`.

# %%
S, E = 37, 16
q1 = xp.asarray(rng.standard_normal((2, 4, 1, E)))  # one new query per sequence and head
k1, v1 = xp.asarray(rng.standard_normal((2, 4, S, E))), xp.asarray(rng.standard_normal((2, 4, S, E)))
ref = scaled_dot_product_attention(q1, k1, v1)
for C in (1, 2, 3, 4, S):
    out = split_kv_attention(q1, k1, v1, C)
    print(f"num_splits C = {C:2d}: chunk sizes {[(c + 1) * S // C - c * S // C for c in range(C)][:6]}"
          f"{' …' if C > 6 else ''}, equals SDPA to 1e-12: {rel_err(out, ref) < 1e-12}")

# the merge by hand for 3 chunks: the shares e^(λ_c − λ) sum to 1
bounds = [0, 12, 24, 37]
parts = [flash_attention(q1, k1[..., a:b, :], v1[..., a:b, :], return_lse=True) for a, b in zip(bounds, bounds[1:])]
merged, lse = merge_attention_partials([o for o, _ in parts], [lse_c for _, lse_c in parts])
shares = np.stack([np.exp(to_numpy(lse_c) - to_numpy(lse)) for _, lse_c in parts])[:, 0, 0, 0]
print("\nbatch 0, head 0: chunk shares e^(λ_c − λ) =", np.round(shares, 3), " sum =", np.round(shares.sum(), 12))
print("hand merge equals SDPA to 1e-12:", rel_err(merged, ref) < 1e-12)

# %%
_, P = scaled_dot_product_attention(q1, k1, v1, return_weights=True)
p = to_numpy(P)[0, 0, 0]
fig, ax = plt.subplots(figsize=(10, 4.2))
chunk_colors = ["#4c72b0", "#dd8452", "#55a868"]
for c, (a, b) in enumerate(zip(bounds, bounds[1:])):
    ax.bar(np.arange(a, b), p[a:b], color=chunk_colors[c], width=0.85,
           label=f"chunk {c}: keys {a}–{b - 1}, share e^(λ_c − λ) = {shares[c]:.3f} = sum of its bars")
    ax.axvspan(a - 0.5, b - 0.5, color=chunk_colors[c], alpha=0.08)
ax.set_xlabel("key position j (the cache)")
ax.set_ylabel("weight p_j of the new query")
ax.set_xlim(-1, S)
ax.set_title("Split-KV: each chunk's share of the softmax is the sum of its weights, so the merge is exact")
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
fig.tight_layout()
save_figure(fig, "../figures/07_split_kv.png")
plt.show()

# %% [markdown]
# Each chunk's share is the sum of the full softmax weights that fall inside it, which is why the
# merge is exact and not an approximation. A chunk in which every key is masked (padding in a batch
# of sequences of different lengths) has $\lambda_c = -\infty$ and share 0:

# %%
lengths = np.array([37, 10])  # sequence 1 has only 10 real tokens: chunks 1 and 2 are all padding
pad = xp.asarray(padding_mask(lengths, S))
out, lse = split_kv_attention(q1, k1, v1, 3, attn_mask=pad, return_lse=True)
print("equals SDPA with the padding mask to 1e-12:",
      rel_err(out, scaled_dot_product_attention(q1, k1, v1, attn_mask=pad)) < 1e-12)
for c in range(3):
    a, b = bounds[c], bounds[c + 1]
    o_c, lse_c = flash_attention(q1[1:], k1[1:, ..., a:b, :], v1[1:, ..., a:b, :],
                                 attn_mask=pad[1:, ..., a:b], return_lse=True)
    print(f"sequence 1, chunk {c}: λ_c (head 0) = {float(to_numpy(lse_c)[0, 0, 0]):.3f}")

# %% [markdown]
# ## 8. A sliding-window cache
#
# With a sliding window of $w$ (Longformer; Mistral 7B v0.1 uses $w = 4096$), query $i$ sees only
# keys $i - w \le j \le i$: `decode_step(..., window=w)` applies stage 02's
# `sliding_window_mask(L, S, w, 0, "bottom_right")`. Keys older than $w$ tokens will never be read
# again, so the cache can drop them: `truncate_kv(cache, w)` keeps the last $w$ tokens (a rolling
# buffer), memory stays $O(w)$, and because the bottom-right mask is relative to the *end* of the
# cache the outputs do not change.

# %%
N, w = 24, 5
q = xp.asarray(rng.standard_normal((1, 2, N, 8)))
k, v = xp.asarray(rng.standard_normal((1, 2, N, 8))), xp.asarray(rng.standard_normal((1, 2, N, 8)))
ref = scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(N, N, w, 0, xp=xp))

full = empty_kv_cache((1,), 2, 8, 8, dtype=xp.float64, xp=xp)
rolling = full
outs_full, outs_roll, len_full, len_roll = [], [], [], []
for i in range(N):
    new = slice(i, i + 1)
    o, full = decode_step(q[..., new, :], k[..., new, :], v[..., new, :], full, window=w)
    o2, rolling = decode_step(q[..., new, :], k[..., new, :], v[..., new, :], rolling, window=w)
    len_roll.append(rolling.length)  # length while attending: w + 1 at most
    rolling = truncate_kv(rolling, w)
    outs_full.append(o)
    outs_roll.append(o2)
    len_full.append(full.length)
print("window, full cache    == SDPA with sliding_window_mask:", rel_err(xp.concat(outs_full, axis=-2), ref) < 1e-12)
print("window, rolling cache == SDPA with sliding_window_mask:", rel_err(xp.concat(outs_roll, axis=-2), ref) < 1e-12)
print(f"cache length after {N} tokens: full S = {full.length}, rolling S = {rolling.length} "
      f"({full.nbytes} vs {rolling.nbytes} bytes)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
ax = axes[0]
window_colors = ["#f2f2f2", "#4c72b0"]
ax.imshow(to_numpy(sliding_window_mask(N, N, w, 0)), cmap=ListedColormap(window_colors), vmin=0, vmax=1)
ax.set_title(f"sliding_window_mask(left = {w}, right = 0):\neach query sees itself and the {w} keys before it")
ax.set_xlabel("key position j")
ax.set_ylabel("query position i")
ax.legend(handles=[Patch(color=window_colors[1], label="A = True (attend)"),
                   Patch(color=window_colors[0], label="A = False (masked)")],
          loc="upper right", fontsize=8)
ax = axes[1]
ax.plot(range(1, N + 1), len_full, "o-", ms=3, label="full cache (grows with t)")
ax.plot(range(1, N + 1), len_roll, "s-", ms=3, label=f"rolling cache (at most w + 1 = {w + 1})")
ax.set_xlabel("decoding step t (tokens so far)")
ax.set_ylabel("cached tokens S while attending")
ax.set_title("A rolling cache of w + 1 tokens gives the same outputs\nwith memory that stops growing")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
save_figure(fig, "../figures/07_sliding_window_cache.png")
plt.show()

# %% [markdown]
# ## 9. A real decoder: greedy decoding with SmolLM2's cache
#
# So far the keys and values were random tensors. Notebook 09's decoder, **SmolLM2-135M-Instruct**
# (a 30-layer Llama-architecture language model), runs in NumPy on this notebook's `decode_step`:
# in every layer it rotates the new queries and keys to their positions (RoPE, notebook 09) and
# calls `decode_step` with that layer's own `KVCache`. `llama_forward(model, ids, cache)` takes $L$
# new tokens after the $t$ cached ones and returns their next-token logits and the 30 new caches.
# `load_llama()` reads the float32 weights from a file that comes with an installed package (no
# download) in a few seconds.

# %%
from attention_ref import encode_prompt, llama_forward, load_llama

smollm = load_llama()
cfg = smollm.config
print(f"{cfg.num_layers} layers; H = {cfg.num_heads} query heads share H_kv = {cfg.num_kv_heads} "
      f"key/value heads of size E = {cfg.head_dim}")

# %% [markdown]
# Greedy decoding: the **prefill** runs the whole prompt at once ($L = 5$ queries, an empty cache);
# each **decode step** feeds back the most likely next token ($L = 1$), and every layer appends its
# key and value to its cache. We keep every step's logits for the check below.

# %%
def show(token_ids):
    return smollm.tokenizer.decode(token_ids)  # shown with !r, so a newline reads \n


prompt = encode_prompt(smollm, "The capital of France is")
logits, caches = llama_forward(smollm, [prompt])  # prefill: L = 5 new tokens, t = 0 cached
step_logits = [to_numpy(logits)[0]]
print(f"prefill {show(prompt)!r}: L = {len(prompt)}, layer 0 caches keys {tuple(caches[0].keys.shape)}")
generated = []
for step in range(1, 7):
    token = int(np.argmax(step_logits[-1][-1]))  # greedy: the most likely next token
    generated.append(token)
    t = caches[0].length
    logits, caches = llama_forward(smollm, [[token]], caches)  # decode: L = 1 after t cached tokens
    step_logits.append(to_numpy(logits)[0])
    print(f"step {step}: feeds {show([token])!r:9} L = 1 after t = {t:2d}, S = {caches[0].length:2d}: "
          f"layer 0 caches keys {tuple(caches[0].keys.shape)}")
print("text so far:", repr(smollm.tokenizer.decode(prompt + generated)))

# %% [markdown]
# Each layer's cache holds keys and values of shape (batch, $H_{kv}$, $S$, $E$) = (1, 3, $S$, 64):
# one row more per token. Per token the 30 caches store $2 \cdot 30 \cdot H_{kv} \cdot E$ numbers —
# with GQA's 3 key/value heads for 9 query heads, a third of what one key/value head per query head
# would need (section 6):

# %%
cached_tokens = caches[0].length  # S after the last step
total = sum(cache.nbytes for cache in caches)
print(f"after S = {cached_tokens} tokens: one layer {caches[0].nbytes:,} bytes, all {len(caches)} layers "
      f"{total:,} bytes")
print(f"per token: {total // cached_tokens:,} bytes = 2 (K and V) × {cfg.num_layers} layers × {cfg.num_kv_heads} "
      f"KV heads × E = {cfg.head_dim} × 4 bytes (float32)")
print(f"with H_kv = H = {cfg.num_heads} (multi-head attention): "
      f"{per_token(cfg.num_layers, cfg.num_heads, cfg.head_dim, bytes_per_number=4):,} bytes per token")

# %% [markdown]
# **The check.** Cached decoding must give what the model computes when it re-reads the whole
# sequence without a cache: one `llama_forward` over all $S$ tokens, where every position's logits
# come from full causal attention. In float32 the two may differ only by rounding (the same sums
# taken in another order).

# %%
cached = np.concatenate(step_logits)  # (S, vocab): the prefill's 5 rows, then one row per step
uncached = to_numpy(llama_forward(smollm, [prompt + generated])[0])[0]
print(f"logits {cached.shape} both ways; the largest |logit| is about {np.abs(uncached).max():.0f}")
print("same next token at every position:", bool(np.array_equal(cached.argmax(-1), uncached.argmax(-1))))
print("max |cached − uncached| < 1e-3:", float(np.abs(cached - uncached).max()) < 1e-3)

# %%
# NBVAL_IGNORE_OUTPUT
print(f"max |cached − uncached| = {np.abs(cached - uncached).max():.1e}  (float32 rounding; varies with the BLAS)")

# %% [markdown]
# A real model caches exactly as the toy did: every token adds one row to each of the 30 caches —
# 45 KiB in float32 — and costs one query's row of attention per layer and head, and the logits
# equal the uncached ones to float32 rounding. **Notebook 09** builds this decoder from its parts
# (RoPE, grouped-query attention, the attention sink on the first token) and times a new token with
# and without the cache; exercise 4 below scales its cache to bfloat16 and long contexts.

# %% [markdown]
# ## What we learned / next stage
#
# * A decoder may cache because every layer is causal: the keys and values of earlier tokens never
#   change when a token is appended (identical to the last bit in a causal stack of six MiniLM
#   layers). A bidirectional encoder changes them all from its second layer on, so it cannot cache.
# * A KV cache stores the keys and values of past tokens; a decode step appends one token's and
#   attends one query to the cache: $4tE$ attention FLOPs at step $t$ instead of $4t^2E$ — the
#   ratio is $t$, and generating $N$ tokens drops from $\Theta(N^3 E)$ to $\Theta(N^2 E)$.
# * The new queries are the last positions, so the mask is the **bottom-right** causal mask; a
#   prefill is the same step with $L > 1$. Cached decoding equals full causal attention (SDPA and
#   FlashAttention) to $10^{-12}$ in float64, for MHA, GQA and MQA.
# * The cache costs $2 H_{kv} E$ numbers per token and layer: GQA/MQA shrink it by $H/H_{kv}$, a
#   sliding window caps it at $w$ tokens (`truncate_kv`) without changing the outputs.
# * Split-KV decoding (Flash-Decoding) parallelises one query over chunks of the cache and merges
#   $(O_c, \lambda_c)$ exactly with the logsumexp rule of stage 05; fully masked chunks get
#   weight 0.
# * A real decoder (SmolLM2-135M, 30 layers, $H = 9$, $H_{kv} = 3$) keeps one `KVCache` per
#   layer: each token adds 45 KiB in float32, and greedy decoding with the cache gives the logits
#   of re-reading the whole sequence, to float32 rounding.
#
# **Next — 08 A real model:** a pretrained encoder in NumPy on top of the course's own
# multi-head attention; **09** then takes the decoder of section 9 apart.

# %% [markdown]
# ## Exercises
#
# Try each exercise before you read the solution below it (`make exercises` writes a copy of this
# notebook without the solutions).

# %%
from attention_ref import softmax
from attention_ref.check import check

# %% [markdown]
# **1. Write `decode_step` yourself.** Complete `decode_step(q_new, k_new, v_new, cache)` with NumPy:
# append $K_{\text{new}}, V_{\text{new}}$ to the cache along the token axis (−2), attend the $L$ new
# queries to all $S$ keys with $\tau = 1/\sqrt E$ and the bottom-right causal mask
# $A = \operatorname{tril}(\mathbf 1_{L\times S}, S - L)$, and return `(out, KVCache(keys, values))`.
# Shapes: `q_new` $(\dots, H, L, E)$, `k_new` $(\dots, H, L, E)$, `v_new` $(\dots, H, L, E_v)$,
# the cache's keys $(\dots, H, S - L, E)$. You may use `softmax` from `attention_ref` (it gives
# $-\infty$ entries weight 0). The check cell runs the checker: a tiny hand-checkable step, prefill
# into an empty cache, several new tokens after a cache, a batch, float32 and large logits.

# %% nbgrader={"grade": false, "grade_id": "decode-step-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def decode_step(q_new, k_new, v_new, cache):
    ### BEGIN SOLUTION
    ### STUB keys = ...  # K = [cache.keys; k_new] along the token axis (−2)
    ### STUB values = ...  # V = [cache.values; v_new]
    ### STUB allowed = ...  # A = tril(1_{L×S}, S − L): the bottom-right causal mask
    ### STUB out = ...  # softmax(τ Q_new Kᵀ, −∞ where A is False) V
    ### STUB return out, KVCache(keys, values)
    keys = np.concatenate([cache.keys, k_new], axis=-2)
    values = np.concatenate([cache.values, v_new], axis=-2)
    L, S = q_new.shape[-2], keys.shape[-2]
    allowed = np.tril(np.ones((L, S), dtype=bool), S - L)
    tau = q_new.shape[-1] ** -0.5  # a Python float keeps float32 float32
    logits = np.where(allowed, tau * (q_new @ np.swapaxes(keys, -1, -2)), -np.inf)
    out = softmax(logits) @ values
    return out, KVCache(keys, values)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "decode-step-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(decode_step, "decode_step", raise_on_failure=True)

# %% [markdown]
# **2. Prefill with the wrong alignment.** A cache holds 5 tokens and a chunk of 3 more arrives at
# once (a second prefill, as when a chat turn is appended). Predict which keys each of the 3 new
# queries would miss with the top-left mask (`is_causal=True`), then run the cell: how large is
# the error of each new query's output against full causal attention over the 8 tokens?

# %%
rng_ex = np.random.default_rng(0)
q8, k8, v8 = (rng_ex.standard_normal((1, 8, 4)) for _ in range(3))
full_causal = scaled_dot_product_attention(q8, k8, v8, is_causal=True)
for alignment in ("bottom_right", "top_left"):
    out3 = scaled_dot_product_attention(q8[:, 5:], k8, v8, attn_mask=causal_mask(3, 8, alignment))
    error = np.abs(out3 - full_causal[:, 5:]).max(axis=-1)[0]
    print(f"{alignment:12s}: max error of new queries 5, 6, 7 = {np.round(error, 3)}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "alignment-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# With the top-left mask query $i$ of the chunk (positions 5, 6, 7) sees keys $0..i$ of the chunk's
# own numbering, keys 0–0, 0–1 and 0–2: query 5 misses keys 1–5, query 6 keys 2–6 and query 7 keys
# 3–7 — every one of them misses the new tokens *and* most of the cache. The errors are of the size
# of the outputs themselves, not rounding; bottom-right gives exactly the full causal result. With
# a single new token the top-left mask would even let it see only key 0.

# %% [markdown]
# **3. One bidirectional layer in a causal stack.** Run the causal MiniLM stack of section 1 with
# *one* layer, layer 3, left without its mask. Before you run it, predict: which layers' cached keys
# change when "it" is appended — layers 0–2, layer 3, layers 4–5? Why? (Remember where $K^{(n)}$ is
# computed from.)

# %%
def keys_with_one_bidirectional_layer(ids, open_layer):
    """Every layer's K for the ids, with a causal mask in every layer except ``open_layer``."""
    x = bert_embeddings(minilm, ids)
    N = ids.shape[-1]
    keys = []
    for n, layer in enumerate(minilm.layers):
        keys.append(x @ layer.attention.W_k + layer.attention.b_k)
        mask = None if n == open_layer else causal_mask(N, N, xp=xp)
        x = bert_layer(x, layer, H_minilm, attn_mask=mask, eps=minilm.config.layer_norm_eps,
                       activation=minilm.config.hidden_act)
    return keys


without = keys_with_one_bidirectional_layer(xp.asarray(ids[:, :n_prefix]), open_layer=3)
with_new = keys_with_one_bidirectional_layer(xp.asarray(ids[:, : n_prefix + 1]), open_layer=3)
print("largest relative change of a cached key, layer 0..5:",
      " ".join(f"{relative_change(b, a).max():.2f}" for b, a in zip(without, with_new)))

# %% [markdown] nbgrader={"grade": true, "grade_id": "one-open-layer-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Layers 0–3 keep their keys; layers 4 and 5 change. $K^{(n)}$ is computed from the *input* of layer
# $n$, which is the output of layer $n-1$; layers 0–2 are causal, so the input of layer 3 — and its
# keys — is unchanged. Layer 3's attention without a mask lets every earlier token read "it", so its
# output, the input of layer 4, changes for the prefix, and from there on every layer's keys do. One
# bidirectional layer is enough to make the cache of every layer above it stale.

# %% [markdown]
# **4. Cache memory of a small decoder.** SmolLM2-135M has 30 layers, $H = 9$ query heads and
# $H_{kv} = 3$ key/value heads of size $E = 64$, and runs in bfloat16 (2 bytes). With `per_token`
# from section 6: how many bytes does its cache take per token, for one sequence of 8,192 tokens, and
# for a batch of 32 such sequences? How much would it take with plain multi-head attention (9 KV
# heads), and with MQA? Compare with the model's own weights, about 135 M × 2 bytes = 270 MB.

# %%
for name, Hkv in (("MHA", 9), ("GQA (SmolLM2)", 3), ("MQA", 1)):
    b = per_token(30, Hkv, 64)
    print(f"{name:14s} {b:6,d} bytes per token, {b * 8192 / 2**20:6.0f} MiB for 8,192 tokens, "
          f"{32 * b * 8192 / 2**30:5.1f} GiB for 32 sequences")

# %% [markdown] nbgrader={"grade": true, "grade_id": "smollm-memory-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# $2 \cdot 30 \cdot 3 \cdot 64 \cdot 2 = 23{,}040$ bytes (22.5 KiB) per token, 180 MiB for 8,192
# tokens and 5.6 GiB for 32 of them — twenty times the model's weights. As MHA it would be three
# times that (540 MiB, 16.9 GiB), as MQA a third (60 MiB, 1.9 GiB). For a small model serving many
# long sequences, the cache, not the weights, decides how many fit on a GPU; GQA is the cheap way to
# shrink it.

# %% [markdown]
# **5. Split-KV with one key per chunk.** With `num_splits` $C = S$ every chunk holds a single key
# $j$. What are $\lambda_c$ and the share $e^{\lambda_c - \lambda}$ of chunk $c = j$? Predict, then
# check numerically on `q1, k1` of section 7 (batch 0, head 0).

# %%
z = to_numpy(q1)[0, 0, 0] @ to_numpy(k1)[0, 0].T / np.sqrt(E)  # the logits z_j = τ q·k_j
lse_one = [float(to_numpy(flash_attention(q1, k1[..., j:j + 1, :], v1[..., j:j + 1, :],
                                          return_lse=True)[1])[0, 0, 0]) for j in range(S)]
_, lse_all = flash_attention(q1, k1, v1, return_lse=True)
share_one = np.exp(np.array(lse_one) - float(to_numpy(lse_all)[0, 0, 0]))
print("λ_c equals the logit z_c for every chunk (to 1e-12):", bool(np.allclose(lse_one, z, atol=1e-12)))
print("share of chunk c equals the weight p_c (to 1e-12): ", bool(np.allclose(share_one, p, atol=1e-12)))

# %% [markdown] nbgrader={"grade": true, "grade_id": "split-one-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# The logsumexp of a single number is the number itself, so $\lambda_c = z_c = \tau\, q \cdot k_c$,
# and the share $e^{z_c - \lambda}$ is exactly the softmax weight $p_c$: with one key per chunk the
# merge rule *is* the softmax, $O = \sum_c p_c v_c$. Larger chunks group these terms; the merge adds
# up their shares, which is why it is exact for any chunking.
