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
# # 04 · Multi-head attention, GQA and MQA
#
# One attention head computes one set of weights: in stage 03, "it" could look for its antecedent,
# but the same head could not also look at the previous word. **Multi-head attention** (Vaswani et
# al. 2017, §3.2.2) runs $H$ smaller heads side by side, each with its own projections, and mixes
# their outputs:
#
# $$
# \operatorname{MultiHead}(Q, K, V) = \operatorname{Concat}(\text{head}_1, \dots, \text{head}_H)\, W^O,
# \qquad \text{head}_i = \operatorname{Attention}(Q W_i^Q,\; K W_i^K,\; V W_i^V),
# $$
#
# with $W_i^Q, W_i^K, W_i^V \in \mathbb{R}^{d_{\text{model}} \times D}$ and usually $D = d_{\text{model}} / H$.
# The $H$ matrices $W_i^Q$ are stored side by side as one $(d_{\text{model}}, H D)$ matrix: project
# once, then *split* the last axis into heads.
#
# **Grouped-query attention** (GQA, Ainslie et al. 2023) keeps $H$ query heads but only
# $H_{kv} < H$ key/value heads; query head $i$ uses key/value head $\lfloor i / (H / H_{kv}) \rfloor$.
# $H_{kv} = 1$ is **multi-query attention** (MQA, Shazeer 2019). Fewer K/V heads means a smaller
# KV cache when generating text.

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    AttentionParams,
    init_multi_head_params,
    merge_heads,
    multi_head_attention,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_positional_encoding,
    split_heads,
)
from attention_ref.plotting import plot_heads, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. Four heads that look for four different things
#
# To get heads we can read, we build them by hand on the sentence of stage 03. Each token is the
# 8 hand-made word features of stage 03 **concatenated** with a 16-dimensional sinusoidal positional
# encoding ($d_{\text{model}} = 24$; a trained model adds the two and learns to separate them, we
# keep them apart so that each head can read one part). $H = 4$ heads of size $D = 16$:
#
# * **head 0, previous token**: keys are $PE(p)$, queries are $PE(p)$ turned into $PE(p-1)$. Stage 03
#   showed that each sin/cos pair is a point on a circle, so shifting the position is a rotation of each
#   pair by the angle $\delta\,\omega_i$: a fixed linear map, hence a valid $W^Q$;
# * **head 1, next token**: the same rotation with $\delta = +1$;
# * **head 2, syntax**: stage 03's hand-made "what am I looking for" query matrix on the word features;
# * **head 3, same features**: query = key = word features, so tokens look at words like themselves.
#
# $W^V$ and $W^O$ are random (they do not change the weights).

# %%
features = ["det", "noun", "animate", "verb", "prep", "pronoun", "adj", "conj"]
F = {name: i for i, name in enumerate(features)}
lexicon = {
    "the": ["det"], "cat": ["noun", "animate"], "sat": ["verb"], "on": ["prep"], "mat": ["noun"],
    "because": ["conj"], "it": ["pronoun", "animate"], "was": ["verb"], "tired": ["adj"],
}
looks_for = {
    "det": {"noun": 3}, "noun": {"verb": 2}, "verb": {"animate": 3, "noun": 1},
    "prep": {"noun": 3, "animate": -2}, "pronoun": {"animate": 3, "noun": 1, "pronoun": -3},
    "adj": {"pronoun": 2, "animate": 1}, "conj": {"verb": 2},
}
n_feat, n_pos = 8, 16
d_model, H, D = n_feat + n_pos, 4, 16

def embed(words, length=None):
    # word features | PE(p); rows beyond len(words) (padding) are zero
    length = length or len(words)
    X = np.zeros((length, d_model))
    for i, word in enumerate(words):
        for feature in lexicon[word]:
            X[i, F[feature]] = 1.0
    X[: len(words), n_feat:] = sinusoidal_positional_encoding(len(words), n_pos)
    return X

def shift_positions(delta):
    # (n_pos, n_pos) matrix R with PE(p) @ R = PE(p + delta): a rotation of each (sin, cos) pair
    R = np.zeros((n_pos, n_pos))
    for i, omega in enumerate(10000.0 ** (-np.arange(0, n_pos, 2) / n_pos)):
        a = delta * omega
        R[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return R

pe = sinusoidal_positional_encoding(10, n_pos)
print("PE(p) @ R(-1) == PE(p-1):", bool(np.allclose(pe[1:] @ shift_positions(-1), pe[:-1])))

W_q, W_k = np.zeros((d_model, H * D)), np.zeros((d_model, H * D))
pos, feat = slice(n_feat, d_model), slice(0, n_feat)
W_q[pos, 0:16], W_k[pos, 0:16] = 8.0 * shift_positions(-1), np.eye(n_pos)     # head 0
W_q[pos, 16:32], W_k[pos, 16:32] = 8.0 * shift_positions(+1), np.eye(n_pos)   # head 1
for have, wants in looks_for.items():                                          # head 2
    for want, strength in wants.items():
        W_q[F[have], 32 + F[want]] = 2.0 * strength
W_k[feat, 32:40] = np.eye(n_feat)
W_q[feat, 48:56], W_k[feat, 48:56] = 4.0 * np.eye(n_feat), np.eye(n_feat)      # head 3

rng = np.random.default_rng(0)
random_params = init_multi_head_params(rng, d_model, H, head_dim=D)
hand = dataclasses.replace(random_params, W_q=W_q, W_k=W_k)
hand = AttentionParams(**{f.name: xp.asarray(getattr(hand, f.name)) for f in dataclasses.fields(hand)})

tokens = "the cat sat on the mat because it was tired".split()
X = xp.asarray(embed(tokens))
out, weights = multi_head_attention(X, X, X, hand, num_heads=H, return_weights=True)
print("X", tuple(X.shape), "-> output", tuple(out.shape), "| weights (H, L, S):", tuple(weights.shape))

# %%
w = to_numpy(weights)
head_names = ["head 0: previous token", "head 1: next token", "head 2: syntax", "head 3: same features"]
for h, name in enumerate(head_names):
    picks = [tokens[int(j)] for j in np.argmax(w[h], axis=-1)]
    print(f"{name:22s}", " ".join(f"{t}→{p}" for t, p in zip(tokens, picks, strict=True)))

fig = plot_heads(w, tokens, tokens, titles=head_names, ncols=4, figsize=(13, 3.9))
save_figure(fig, "../figures/04_heads.png")
plt.show()

# %% [markdown]
# One layer, four relations at once. Unlike stage 03, the two "the"s now behave differently in
# heads 0 and 1, because positions are part of the input.
#
# ## 2. Splitting and merging heads
#
# `split_heads` reshapes `(..., L, H·D)` to `(..., H, L, D)`, so that heads become a batch
# dimension for `scaled_dot_product_attention`; `merge_heads` is its inverse (the "Concat").

# %%
Xb = xp.asarray(np.stack([embed(tokens), embed(tokens[::-1])]))    # batch of 2
Q = Xb @ hand.W_q + hand.b_q
Qh = split_heads(Q, H)
print("X             ", tuple(Xb.shape), "  (B, L, d_model)")
print("X W_q + b_q   ", tuple(Q.shape), "  (B, L, H·D)")
print("split_heads   ", tuple(Qh.shape), "(B, H, L, D)")
print("merge_heads   ", tuple(merge_heads(Qh).shape))
print("merge(split(x)) == x:", bool(np.array_equal(to_numpy(merge_heads(Qh)), to_numpy(Q))))
print("head 2 is columns 32:48:", bool(np.array_equal(to_numpy(Qh[:, 2]), to_numpy(Q[..., 32:48]))))

# %% [markdown]
# ## 3. Check against the previous stage: a loop of single heads
#
# Multi-head attention must equal, head by head, stage 02's `scaled_dot_product_attention` on the
# slices $W_q[:, hD:(h+1)D]$ (and the same for $K$, $V$ and the biases), concatenated and projected by
# $W_O$. Random parameters with non-zero biases, a batch of two, with and without a causal mask:

# %%
rng = np.random.default_rng(1)
d, H_, D_ = 32, 4, 8
params = init_multi_head_params(rng, d, H_)
params = dataclasses.replace(
    params, **{name: rng.normal(size=getattr(params, name).shape) for name in ("b_q", "b_k", "b_v", "b_o")}
)
params = AttentionParams(**{f.name: xp.asarray(getattr(params, f.name)) for f in dataclasses.fields(params)})
x = xp.asarray(rng.normal(size=(2, 7, d)))       # queries: L = 7
ctx = xp.asarray(rng.normal(size=(2, 11, d)))    # keys/values: S = 11

def heads_one_by_one(x, ctx, p, is_causal=False):
    outs = []
    for h in range(H_):
        cols = slice(h * D_, (h + 1) * D_)
        q = x @ p.W_q[:, cols] + p.b_q[cols]
        k = ctx @ p.W_k[:, cols] + p.b_k[cols]
        v = ctx @ p.W_v[:, cols] + p.b_v[cols]
        outs.append(scaled_dot_product_attention(q, k, v, is_causal=is_causal))
    return xp.concat(outs, axis=-1) @ p.W_o + p.b_o

for name, (q_in, kv_in, causal) in {"self-attention": (x, x, False), "causal self-attention": (x, x, True),
                                    "cross-attention L=7, S=11": (x, ctx, False)}.items():
    mha = multi_head_attention(q_in, kv_in, kv_in, params, num_heads=H_, is_causal=causal)
    diff = float(np.max(np.abs(to_numpy(mha - heads_one_by_one(q_in, kv_in, params, causal)))))
    print(f"{name:26s} max abs diff < 1e-12: {diff < 1e-12}")

# %% [markdown]
# ## 4. GQA and MQA: sharing keys and values between heads
#
# When a decoder generates text it caches the keys and values of every past token, for every layer:
# $2 \times H_{kv} \times D$ numbers per token and layer. Grouped-query attention shrinks this by
# $H / H_{kv}$ while keeping all $H$ query heads. The table counts one layer with $H = 8$, $D = 8$
# (this notebook's toy) and a real model with Llama 2 70B's shape (80 layers, 64 query heads of size
# 128, 8 KV heads), in float16.

# %%
H8, D8 = 8, 8
print("toy layer, H = 8 query heads of size D = 8, float16")
print(" H_kv  kind   K/V numbers per token   bytes per token   vs MHA")
for h_kv in (8, 4, 2, 1):
    kind = "MHA" if h_kv == H8 else ("MQA" if h_kv == 1 else "GQA")
    numbers = 2 * h_kv * D8
    saving = "baseline" if h_kv == H8 else f"{H8 // h_kv}x smaller"
    print(f"{h_kv:5d}  {kind}   {numbers:21d}   {2 * numbers:15d}   {saving}")

layers, heads, head_dim = 80, 64, 128
print("\nLlama-2-70B-shaped model (80 layers, 64 heads × 128), float16, whole model")
for h_kv in (64, 8, 1):
    kind = "MHA" if h_kv == heads else ("MQA" if h_kv == 1 else "GQA")
    per_token = 2 * layers * h_kv * head_dim * 2
    print(f"{h_kv:5d}  {kind}  {per_token / 1024:9.0f} KiB per token   {per_token * 4096 / 2**30:6.2f} GiB for 4096 tokens")

# %% [markdown]
# ### GQA is MHA with repeated key/value heads
#
# Giving every query head its own copy of its group's key/value head turns GQA back into ordinary
# MHA: repeating the column blocks of $W_K$, $W_V$ (and their biases) $H / H_{kv}$ times must give the
# same output. We check it for $H_{kv} = 2$ (GQA) and $H_{kv} = 1$ (MQA).

# %%
rng = np.random.default_rng(2)
d = H8 * D8
x = xp.asarray(rng.normal(size=(2, 10, d)))

def repeat_kv_heads(p, h_kv):
    # W_k, W_v: (d, H_kv·D) -> (d, H·D), each head's block repeated H / H_kv times; same for the biases
    group = H8 // h_kv

    def rep_w(W):
        return xp.reshape(xp.repeat(xp.reshape(W, (d, h_kv, 1, D8)), group, axis=2), (d, H8 * D8))

    def rep_b(b):
        return xp.reshape(xp.repeat(xp.reshape(b, (h_kv, 1, D8)), group, axis=1), (H8 * D8,))

    return dataclasses.replace(p, W_k=rep_w(p.W_k), W_v=rep_w(p.W_v), b_k=rep_b(p.b_k), b_v=rep_b(p.b_v))

for h_kv in (2, 1):
    p = init_multi_head_params(rng, d, H8, num_kv_heads=h_kv)
    p = dataclasses.replace(p, b_k=rng.normal(size=p.b_k.shape), b_v=rng.normal(size=p.b_v.shape))
    p = AttentionParams(**{f.name: None if getattr(p, f.name) is None else xp.asarray(getattr(p, f.name))
                           for f in dataclasses.fields(p)})
    out_gqa, w_gqa = multi_head_attention(x, x, x, p, num_heads=H8, num_kv_heads=h_kv, return_weights=True)
    out_mha = multi_head_attention(x, x, x, repeat_kv_heads(p, h_kv), num_heads=H8)
    diff = float(np.max(np.abs(to_numpy(out_gqa - out_mha))))
    print(f"H_kv = {h_kv}: W_k {tuple(p.W_k.shape)} vs repeated {tuple(repeat_kv_heads(p, h_kv).W_k.shape)};"
          f" GQA == MHA with repeated K/V heads (max abs diff < 1e-12): {diff < 1e-12}")
    if h_kv == 2:
        w_gqa2 = to_numpy(w_gqa)[0]

# %%
group = H8 // 2
titles = [f"q head {h} (kv head {h // group})" for h in range(H8)]
fig = plot_heads(w_gqa2, titles=titles, ncols=4, figsize=(11, 5.2))
fig.suptitle("GQA, H = 8 query heads sharing H_kv = 2 key/value heads (random weights)", y=1.02)
save_figure(fig, "../figures/04_gqa_heads.png")
plt.show()

# %% [markdown]
# With random weights the heads of one group share their keys but not their queries, so their
# patterns still differ.
#
# ## 5. A padding mask through multi-head attention
#
# A batch holds sentences of different lengths, padded to the longest. `padding_mask(lengths, S)` has
# shape `(B, 1, 1, S)` and broadcasts over the heads and queries: no query attends to a padding key.
# The real tokens of the short sentence must then get exactly the output they get without any padding.
# (Padding *queries* still produce rows; they are ignored downstream.)

# %%
short = "the cat sat on the mat".split()
Xpad = xp.asarray(np.stack([embed(tokens), embed(short, length=len(tokens))]))   # (2, 10, 24)
mask = padding_mask(np.array([len(tokens), len(short)]), len(tokens), xp=xp)
print("mask shape", tuple(mask.shape), "| batch element 1:", to_numpy(mask)[1, 0, 0].astype(int))

out_pad, w_pad = multi_head_attention(Xpad, Xpad, Xpad, hand, num_heads=H, attn_mask=mask, return_weights=True)
w_pad = to_numpy(w_pad)
print("weights", w_pad.shape, "| on padding keys exactly 0:", bool(np.all(w_pad[1, :, :, len(short):] == 0)),
      "| rows sum to 1:", bool(np.allclose(w_pad.sum(-1), 1)))

out_alone = multi_head_attention(xp.asarray(embed(short)), xp.asarray(embed(short)), xp.asarray(embed(short)),
                                 hand, num_heads=H)
diff = float(np.max(np.abs(to_numpy(out_pad)[1, : len(short)] - to_numpy(out_alone))))
print("padded batch == the short sentence alone (max abs diff < 1e-12):", diff < 1e-12)

# %%
padded_labels = short + ["<pad>"] * (len(tokens) - len(short))
fig = plot_heads(w_pad[1], padded_labels, padded_labels, titles=head_names, ncols=4, figsize=(13, 3.9))
fig.suptitle("padding mask: 'the cat sat on the mat' padded to 10 tokens", y=1.03)
save_figure(fig, "../figures/04_padding_mask_heads.png")
plt.show()

# %% [markdown]
# ## 6. (Optional) the same numbers as `torch.nn.MultiheadAttention`
#
# `multi_head_params_from_torch` reads a PyTorch `MultiheadAttention` state dict (which stores weights
# as `(out, in)` and packs $W_Q, W_K, W_V$ into `in_proj_weight`). PyTorch is not a dependency of this
# course, so the cell below is skipped by the notebook tests and only runs where torch is installed.
# Mind the masks: for `MultiheadAttention` a boolean True means **ignore**, for us True means attend.

# %%
# NBVAL_SKIP
try:
    import torch
except ImportError:
    torch = None

if torch is None:
    print("torch is not installed: skipping the comparison with torch.nn.MultiheadAttention")
else:
    from attention_ref import multi_head_params_from_torch

    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64)
    sd = {name: t.detach().numpy() for name, t in module.state_dict().items()}
    p_torch = multi_head_params_from_torch(sd, num_heads=4)
    x_np = np.random.default_rng(3).normal(size=(2, 9, 32))
    lengths = np.array([9, 5])
    ours, ours_w = multi_head_attention(x_np, x_np, x_np, p_torch, num_heads=4,
                                        attn_mask=padding_mask(lengths, 9), return_weights=True)
    x_t = torch.from_numpy(x_np)
    ignore = torch.from_numpy(np.arange(9)[None, :] >= lengths[:, None])    # True = ignore
    theirs, theirs_w = module(x_t, x_t, x_t, key_padding_mask=ignore, average_attn_weights=False)
    print("matches torch.nn.MultiheadAttention (max abs diff < 1e-12):",
          float(np.max(np.abs(ours - theirs.detach().numpy()))) < 1e-12,
          "| weights:", float(np.max(np.abs(ours_w - theirs_w.detach().numpy()))) < 1e-12)

# %% [markdown]
# ## What we learned / next stage
#
# * Multi-head attention = project once, `split_heads`, run stage 02's attention with heads as a batch
#   dimension, `merge_heads`, project with $W_O$. It equals a Python loop of single heads on slices of
#   the weights to $10^{-12}$.
# * Different heads can track different relations at once: relative position (a rotation of the
#   sinusoidal encoding), syntax, similarity.
# * GQA/MQA keep all query heads but share key/value heads, dividing the KV cache by $H / H_{kv}$; GQA is
#   exactly MHA with repeated key/value heads.
# * A padding mask `(B, 1, 1, S)` broadcasts over heads and queries, and padded batches give the same
#   outputs as unpadded sequences.
#
# Every head still materialises an $L \times S$ weight matrix: memory grows like $L^2$.
#
# **Next — 05 FlashAttention:** compute exactly the same output tile by tile with the online softmax,
# never forming the full weight matrix, and check it against `scaled_dot_product_attention`.
