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
# with $W_i^Q, W_i^K \in \mathbb{R}^{d_{\text{model}} \times E}$, $W_i^V \in \mathbb{R}^{d_{\text{model}} \times E_v}$
# and usually $E = E_v = d_{\text{model}} / H$. The $H$ matrices $W_i^Q$ are stored side by side as one
# $(d_{\text{model}}, H E)$ matrix: project once, then *split* the last axis into heads.
#
# **Grouped-query attention** (GQA, Ainslie et al. 2023) keeps $H$ query heads but only
# $H_{kv} < H$ key/value heads; query head $i$ uses key/value head $\lfloor i / (H / H_{kv}) \rfloor$.
# $H_{kv} = 1$ is **multi-query attention** (MQA, Shazeer 2019). Fewer K/V heads means a smaller
# KV cache when generating text.

# %% [markdown]
# ### Notation (the course's one system; this notebook uses these symbols)
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $L$, $S$ | number of queries, number of keys and values | `L`, `S` |
# | $N$ | sequence length when $L = S$ | `N` |
# | $E$, $E_v$ | query/key and value size **per head** (head size) | `E` |
# | $H$, $H_{kv}$ | query heads, key/value heads ($H_{kv}$ divides $H$) | `H`, `num_kv_heads` |
# | $d_{\text{model}}$ | model width, $H \cdot E$ here | `d_model` |
# | $Q, K, V, O$ | queries ($L \times E$), keys ($S \times E$), values ($S \times E_v$), output, per head | `q`, `k`, `v` |
# | $W^Q, W^K, W^V, W^O$ | projections, stored (in, out): a projection is $x W + b$ | `W_q`, `W_k`, `W_v`, `W_o` |
# | $\tau$ | the scale, $1/\sqrt{E}$ | `scale` |
# | $Z$ | logits $Z = \tau Q K^\top$ ($L \times S$), entries $z_{ij}$ | `z` |
# | $A$ | boolean mask, $A_{ij}$ = True where query $i$ may attend key $j$ | `attn_mask` |
# | $P$ | attention weights, $P = \operatorname{softmax}(Z)$ row by row, entries $p_{ij}$ | `weights` |

# %%
import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    AttentionParams,
    explore,
    init_multi_head_params,
    merge_heads,
    multi_head_attention,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_positional_encoding,
    softmax,
    split_heads,
)
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. Four heads that look for four different things
#
# To get heads we can read, we build them by hand on the sentence of stage 03. Each token is the
# 8 hand-made word features of stage 03 **concatenated** with a 16-dimensional sinusoidal positional
# encoding ($d_{\text{model}} = 24$; a trained model adds the two and learns to separate them, we
# keep them apart so that each head can read one part). $H = 4$ heads of size $E = 16$:
#
# * **head 0, previous token**: keys are $PE(p)$, queries are $PE(p)$ turned into $PE(p-1)$. Stage 03
#   showed that each sin/cos pair is a point on a circle, so shifting the position is a rotation of each
#   pair by the angle $\delta\,\omega_i$: a fixed linear map, hence a valid $W^Q$;
# * **head 1, next token**: the same rotation with $\delta = +1$;
# * **head 2, syntax**: stage 03's hand-made "what am I looking for" query matrix on the word features;
# * **head 3, same features**: query = key = word features, so tokens look at words like themselves.
#
# $W^V$ and $W^O$ are random (they do not change the weights $P$).

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
d_model, H, E = n_feat + n_pos, 4, 16

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

W_q, W_k = np.zeros((d_model, H * E)), np.zeros((d_model, H * E))
pos, feat = slice(n_feat, d_model), slice(0, n_feat)
W_q[pos, 0:16], W_k[pos, 0:16] = 8.0 * shift_positions(-1), np.eye(n_pos)     # head 0
W_q[pos, 16:32], W_k[pos, 16:32] = 8.0 * shift_positions(+1), np.eye(n_pos)   # head 1
for have, wants in looks_for.items():                                          # head 2
    for want, strength in wants.items():
        W_q[F[have], 32 + F[want]] = 2.0 * strength
W_k[feat, 32:40] = np.eye(n_feat)
W_q[feat, 48:56], W_k[feat, 48:56] = 4.0 * np.eye(n_feat), np.eye(n_feat)      # head 3

rng = np.random.default_rng(0)
random_params = init_multi_head_params(rng, d_model, H, head_dim=E)
hand = dataclasses.replace(random_params, W_q=W_q, W_k=W_k)
hand = AttentionParams(**{f.name: xp.asarray(getattr(hand, f.name)) for f in dataclasses.fields(hand)})

tokens = "the cat sat on the mat because it was tired".split()
X = xp.asarray(embed(tokens))
out, weights = multi_head_attention(X, X, X, hand, num_heads=H, return_weights=True)
print("X", tuple(X.shape), "-> output", tuple(out.shape), "| weights P (H, L, S):", tuple(weights.shape))

# %% [markdown]
# For each query token, the key it gives the largest weight, head by head, and the four weight
# matrices on one colour scale:

# %%
def draw_heads(w, query_labels, key_labels, titles, suptitle, figsize=(14, 4.0)):
    # one panel per head on one colour scale 0..1, token labels, one colour bar for all panels
    fig, axes = plt.subplots(1, len(w), figsize=figsize, layout="constrained")
    for h, ax in enumerate(axes):
        plot_attention(w[h], query_labels, key_labels, ax=ax, title=titles[h], colorbar=False, vmax=1.0)
        ax.title.set_fontsize(10)
        if h:
            ax.set_ylabel("")
    fig.colorbar(axes[0].images[0], ax=axes, shrink=0.85, label="attention weight $p_{ij}$")
    fig.suptitle(suptitle, fontsize=12)
    return fig

w = to_numpy(weights)
head_names = ["head 0: previous token", "head 1: next token", "head 2: syntax", "head 3: same features"]
for h, name in enumerate(head_names):
    picks = [tokens[int(j)] for j in np.argmax(w[h], axis=-1)]
    print(f"{name:22s}", " ".join(f"{t}→{p}" for t, p in zip(tokens, picks, strict=True)))

fig = draw_heads(w, tokens, tokens, head_names,
                 "One layer, four heads, four relations at once: each row is where one query token looks")
save_figure(fig, "../figures/04_heads.png")
plt.show()

# %% [markdown]
# One layer, four relations at once. Unlike stage 03, the two "the"s now behave differently in
# heads 0 and 1, because positions are part of the input.
#
# A grid shows every weight but makes you hunt for one token's row. The explorer below is the same
# $P$, interactive: hover a token (click to pin it) to draw its lines to the keys it attends to,
# switch heads from the menu, flip to **key ← query** to see who attends *to* a token. It opens on head
# 2 with "it" pinned: the pronoun finds "cat". (A page that cannot run widgets shows this first view
# as a picture.)

# %%
explore(tokens, w, head=2, head_names=head_names, selected=tokens.index("it"),
        title="the cat sat on the mat because it was tired")

# %% [markdown]
# ## 2. Splitting and merging heads
#
# `split_heads` reshapes `(..., L, H·E)` to `(..., H, L, E)`, so that heads become a batch
# dimension for `scaled_dot_product_attention`; `merge_heads` is its inverse (the "Concat").

# %%
Xb = xp.asarray(np.stack([embed(tokens), embed(tokens[::-1])]))    # batch of 2
Q = Xb @ hand.W_q + hand.b_q
Qh = split_heads(Q, H)
print("X             ", tuple(Xb.shape), "  (B, L, d_model)")
print("X W_q + b_q   ", tuple(Q.shape), "  (B, L, H·E)")
print("split_heads   ", tuple(Qh.shape), "(B, H, L, E)")
print("merge_heads   ", tuple(merge_heads(Qh).shape))
print("merge(split(x)) == x:", bool(np.array_equal(to_numpy(merge_heads(Qh)), to_numpy(Q))))
print("head 2 is columns 32:48:", bool(np.array_equal(to_numpy(Qh[:, 2]), to_numpy(Q[..., 32:48]))))

# %% [markdown]
# ## 3. A loop of heads, each with its own projections, equals project-once-and-split
#
# The equation at the top is a loop: head $i$ has its **own** matrices $W_i^Q, W_i^K, W_i^V$, runs
# stage 02's single-head attention, and the outputs are concatenated and multiplied by $W^O$. Cut
# $W^O$ into its $H$ row blocks $W_i^O$ ($E_v \times d_{\text{model}}$) and the concatenation becomes a
# sum: each head writes its own contribution to the output,
#
# $$
# \operatorname{Concat}(\text{head}_1, \dots, \text{head}_H)\, W^O = \sum_{i=1}^{H} \text{head}_i\, W_i^O .
# $$
#
# Below, the loop draws $H = 4$ independent heads and runs them one by one. Stacking their matrices
# side by side ($W^Q = [W_1^Q \, \cdots \, W_H^Q]$, the same for $K$, $V$ and the biases; $W^O$ one block
# under the other) gives the parameters of `multi_head_attention`, which projects once and splits.
# `matmul` is a parameter so that section 4 can count the work.

# %%
def single_head_attention(q, k, v, allowed=None, matmul=xp.matmul):
    # stage 02 for one head: Z = τ Q Kᵀ (masked keys −∞), P = softmax(Z), O = P V
    z = matmul(q, xp.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        z = xp.where(allowed, z, -xp.inf)
    return matmul(softmax(z), v)

def loop_of_heads(x_q, x_kv, heads, b_o, allowed=None, matmul=xp.matmul):
    # heads: one AttentionParams per head, W_q (d_model, E) ... W_o (Ev, d_model)
    out = b_o
    for p in heads:
        q = matmul(x_q, p.W_q) + p.b_q
        k = matmul(x_kv, p.W_k) + p.b_k
        v = matmul(x_kv, p.W_v) + p.b_v
        out = out + matmul(single_head_attention(q, k, v, allowed, matmul), p.W_o)   # head_i W_i^O
    return out

def random_heads(rng, d_model, H, E):
    # H independent heads with non-zero biases, and one output bias b_o
    heads = []
    for _ in range(H):
        p = init_multi_head_params(rng, d_model, 1, head_dim=E)
        p = dataclasses.replace(p, **{b: rng.normal(size=getattr(p, b).shape) for b in ("b_q", "b_k", "b_v")})
        heads.append(AttentionParams(**{f.name: None if f.name == "b_o" else xp.asarray(getattr(p, f.name))
                                        for f in dataclasses.fields(p)}))
    return heads, xp.asarray(rng.normal(size=d_model))

def stack_heads(heads, b_o):
    # the H heads side by side: the parameters multi_head_attention takes
    cat = {name: xp.concat([getattr(p, name) for p in heads], axis=1 if name.startswith("W") else 0)
           for name in ("W_q", "W_k", "W_v", "b_q", "b_k", "b_v")}
    return AttentionParams(**cat, W_o=xp.concat([p.W_o for p in heads], axis=0), b_o=b_o)

rng = np.random.default_rng(1)
d, H_loop, E_loop = 32, 4, 8
heads, b_o = random_heads(rng, d, H_loop, E_loop)
params = stack_heads(heads, b_o)
print("one head: W_q", tuple(heads[0].W_q.shape), "W_o", tuple(heads[0].W_o.shape),
      "| stacked: W_q", tuple(params.W_q.shape), "W_o", tuple(params.W_o.shape))

x = xp.asarray(rng.normal(size=(2, 7, d)))       # queries: L = 7
ctx = xp.asarray(rng.normal(size=(2, 11, d)))    # keys/values: S = 11
causal = xp.asarray(np.tril(np.ones((7, 7), dtype=bool)))
for name, (q_in, kv_in, allowed) in {"self-attention": (x, x, None), "causal self-attention": (x, x, causal),
                                     "cross-attention L=7, S=11": (x, ctx, None)}.items():
    mha = multi_head_attention(q_in, kv_in, kv_in, params, num_heads=H_loop, is_causal=allowed is not None)
    diff = float(np.max(np.abs(to_numpy(mha - loop_of_heads(q_in, kv_in, heads, b_o, allowed)))))
    print(f"{name:26s} loop of heads == multi_head_attention (max abs diff < 1e-12): {diff < 1e-12}")

# %% [markdown]
# The two compute the same numbers with the same arithmetic (section 4 counts it). The library
# projects once and splits because:
#
# * **four matrix products instead of $4H$**: one $(d_{\text{model}}, H E)$ product replaces $H$ thin
#   $(d_{\text{model}}, E)$ ones. Same FLOPs, but one large product keeps a CPU's vector units or a GPU's
#   cores busier than many small ones, and on a GPU every product is a kernel launch;
# * **heads become a batch axis**: after `split_heads` a single call of stage 02's attention runs every
#   head, and masks such as the padding mask `(B, 1, 1, S)` and GQA's shared heads broadcast over it;
# * **it is how checkpoints store the weights**: PyTorch's `MultiheadAttention` keeps one
#   `in_proj_weight` for all heads, Llama-style models one `q_proj` of width $H E$ (section 7 loads one).

# %% [markdown]
# ## 4. What $H$ heads cost: about as much as one full-size head
#
# Vaswani et al. (§3.2.2): "Due to the reduced dimension of each head, the total computational cost
# is similar to that of single-head attention with full dimensionality." Count it for self-attention
# over $N$ tokens with $E = E_v = d_{\text{model}}/H$, a matrix product $(a \times b)(b \times c)$
# costing $2abc$ FLOPs:
#
# | part | per head | all $H$ heads |
# | --- | --- | --- |
# | projections $Q, K, V$: $3 \times (N \times d_{\text{model}})(d_{\text{model}} \times E)$ | $6 N d_{\text{model}} E$ | $6 N d_{\text{model}}^2$ |
# | logits $Z = \tau Q K^\top$: $(N \times E)(E \times N)$ | $2 N^2 E$ | $2 N^2 d_{\text{model}}$ |
# | output $P V$: $(N \times N)(N \times E)$ | $2 N^2 E$ | $2 N^2 d_{\text{model}}$ |
# | $\text{head}_i W_i^O$: $(N \times E)(E \times d_{\text{model}})$ | $2 N E d_{\text{model}}$ | $2 N d_{\text{model}}^2$ |
# | parameters $W^Q, W^K, W^V, W^O$ (+ biases) | $4 d_{\text{model}} E\,(+3E)$ | $4 d_{\text{model}}^2 + 4 d_{\text{model}}$ |
#
# Every line depends on $H$ only through $H E = d_{\text{model}}$: the total,
# $8 N d_{\text{model}}^2 + 4 N^2 d_{\text{model}}$ FLOPs and $4 d_{\text{model}}^2 + 4 d_{\text{model}}$
# parameters, is the same for one head of size $d_{\text{model}}$ and for 64 heads of size
# $d_{\text{model}}/64$. What does grow with $H$ is the softmax: $H$ weight matrices of $N^2$ entries,
# $H N^2$ exponentials — the "about" in "about as much" (and the memory that stage 05 removes).
#
# The check runs the loop of section 3 with a `matmul` that adds up $2abc$ for every product it
# computes, and counts the parameters of the arrays themselves:

# %%
class CountingMatmul:
    # xp.matmul that adds 2·(output entries)·(inner size) FLOPs for every product it computes
    def __init__(self):
        self.flops = 0

    def __call__(self, a, b):
        out = xp.matmul(a, b)
        self.flops += 2 * math.prod(out.shape) * a.shape[-1]
        return out

N, d = 32, 64
x_cost = xp.asarray(np.random.default_rng(2).normal(size=(N, d)))
print(f"self-attention, N = {N}, d_model = {d}")
print(" H    E   parameters   counted FLOPs   8Nd² + 4N²d   softmax exps H·N²")
for H_ in (1, 2, 4, 8, 16, 64):
    heads_, b_o_ = random_heads(np.random.default_rng(3), d, H_, d // H_)
    n_params = sum(math.prod(a.shape) for p in heads_ for a in dataclasses.astuple(p) if a is not None) + d
    counter = CountingMatmul()
    loop_of_heads(x_cost, x_cost, heads_, b_o_, matmul=counter)
    print(f"{H_:2d} {d // H_:4d} {n_params:12,d} {counter.flops:15,d} {8 * N * d**2 + 4 * N**2 * d:13,d}"
          f" {H_ * N**2:19,d}")

# %% [markdown]
# Same parameters and same FLOPs for every $H$; only the number of softmax exponentials (and of
# weight matrices to hold) grows. So the model gets $H$ different attention patterns almost for
# free — and Vaswani et al.'s Table 3 (rows A) shows it pays: with the compute held fixed, "single-head
# attention is 0.9 BLEU worse than the best setting, but quality also drops off with too many heads".
#
# ## 5. GQA and MQA: sharing keys and values between heads
#
# When a decoder generates text it caches the keys and values of every past token, for every layer:
# $H_{kv} (E + E_v)$ numbers per token and layer. Grouped-query attention shrinks this by
# $H / H_{kv}$ while keeping all $H$ query heads. The table counts one layer with $H = 8$, $E = 8$
# (a toy) and a real model with Llama 2 70B's shape (80 layers, 64 query heads of size 128, 8 K/V
# heads), in float16.

# %%
H8, E8 = 8, 8
print("toy layer, H = 8 query heads of size E = 8, float16")
print(" H_kv  kind   K/V numbers per token   bytes per token   vs MHA")
for h_kv in (8, 4, 2, 1):
    kind = "MHA" if h_kv == H8 else ("MQA" if h_kv == 1 else "GQA")
    numbers = 2 * h_kv * E8
    saving = "baseline" if h_kv == H8 else f"{H8 // h_kv}x smaller"
    print(f"{h_kv:5d}  {kind}   {numbers:21d}   {2 * numbers:15d}   {saving}")

layers, heads_70b, head_size = 80, 64, 128
print("\nLlama-2-70B-shaped model (80 layers, 64 heads × 128), float16, whole model")
for h_kv in (64, 8, 1):
    kind = "MHA" if h_kv == heads_70b else ("MQA" if h_kv == 1 else "GQA")
    per_token = 2 * layers * h_kv * head_size * 2
    print(f"{h_kv:5d}  {kind}  {per_token / 1024:9.0f} KiB per token   {per_token * 4096 / 2**30:6.2f} GiB for 4096 tokens")

# %% [markdown]
# ### GQA is MHA with repeated key/value heads
#
# Giving every query head its own copy of its group's key/value head turns GQA back into ordinary
# MHA: repeating the column blocks of $W^K$, $W^V$ (and their biases) $H / H_{kv}$ times must give the
# same output. We check it for $H_{kv} = 2$ (GQA) and $H_{kv} = 1$ (MQA).

# %%
rng = np.random.default_rng(2)
d = H8 * E8
x = xp.asarray(rng.normal(size=(2, 10, d)))

def repeat_kv_heads(p, h_kv):
    # W_k, W_v: (d, H_kv·E) -> (d, H·E), each head's block repeated H / H_kv times; same for the biases
    group = H8 // h_kv

    def rep_w(W):
        return xp.reshape(xp.repeat(xp.reshape(W, (d, h_kv, 1, E8)), group, axis=2), (d, H8 * E8))

    def rep_b(b):
        return xp.reshape(xp.repeat(xp.reshape(b, (h_kv, 1, E8)), group, axis=1), (H8 * E8,))

    return dataclasses.replace(p, W_k=rep_w(p.W_k), W_v=rep_w(p.W_v), b_k=rep_b(p.b_k), b_v=rep_b(p.b_v))

for h_kv in (2, 1):
    p = init_multi_head_params(rng, d, H8, num_kv_heads=h_kv)
    p = dataclasses.replace(p, b_k=rng.normal(size=p.b_k.shape), b_v=rng.normal(size=p.b_v.shape))
    p = AttentionParams(**{f.name: None if getattr(p, f.name) is None else xp.asarray(getattr(p, f.name))
                           for f in dataclasses.fields(p)})
    out_gqa = multi_head_attention(x, x, x, p, num_heads=H8, num_kv_heads=h_kv)
    out_mha = multi_head_attention(x, x, x, repeat_kv_heads(p, h_kv), num_heads=H8)
    diff = float(np.max(np.abs(to_numpy(out_gqa - out_mha))))
    print(f"H_kv = {h_kv}: W_k {tuple(p.W_k.shape)} vs repeated {tuple(repeat_kv_heads(p, h_kv).W_k.shape)};"
          f" GQA == MHA with repeated K/V heads (max abs diff < 1e-12): {diff < 1e-12}")

# %% [markdown]
# ### What one shared key/value head serves
#
# Our four hand-made heads were already two pairs: heads 0 and 1 both use the positions $PE(p)$ as
# keys (only their queries differ: $PE(p-1)$ or $PE(p+1)$), heads 2 and 3 both use the word features
# as keys. So the same layer runs as GQA with $H = 4$ query heads and $H_{kv} = 2$ key/value heads —
# half the K/V cache — and must give exactly the same weights:

# %%
rng = np.random.default_rng(4)
W_k_gqa = np.concatenate([W_k[:, 0:16], W_k[:, 32:48]], axis=1)        # K/V head 0 = positions, 1 = features
hand_gqa = AttentionParams(W_q=W_q, W_k=W_k_gqa, W_v=rng.normal(size=(d_model, 2 * E)) / 4,
                           W_o=rng.normal(size=(H * E, d_model)) / 8)
hand_gqa = AttentionParams(**{f.name: None if getattr(hand_gqa, f.name) is None else xp.asarray(getattr(hand_gqa, f.name))
                              for f in dataclasses.fields(hand_gqa)})
_, weights_gqa = multi_head_attention(X, X, X, hand_gqa, num_heads=H, num_kv_heads=2, return_weights=True)
print("W_k: MHA", tuple(hand.W_k.shape), "-> GQA", tuple(hand_gqa.W_k.shape),
      f"| K/V numbers cached per token: {2 * H * E} -> {2 * 2 * E}")
print("GQA weights == the four MHA heads' weights (max abs diff < 1e-12):",
      float(np.max(np.abs(to_numpy(weights_gqa) - w))) < 1e-12)

# %%
keys = to_numpy(X) @ W_k_gqa                         # (S, 2·E): the two cached key heads, side by side
w_gqa = to_numpy(weights_gqa)
group_rows = [("K/V head 0 (shared): keys = positions PE(p)", keys[:, 0:16].T, [f"PE dim {i}" for i in range(16)]),
              ("K/V head 1 (shared): keys = word features", keys[:, 16:24].T, features)]
fig, axes = plt.subplots(2, 3, figsize=(14, 8.6), layout="constrained")
for g, (key_title, k_t, k_labels) in enumerate(group_rows):
    ax = axes[g, 0]
    kimg = ax.imshow(k_t, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90)
    ax.set_yticks(range(len(k_labels)), k_labels, fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("entries of the key vector $k_j$")
    ax.set_title(key_title, fontsize=10)
    for c, h in enumerate((2 * g, 2 * g + 1)):
        plot_attention(w_gqa[h], tokens, tokens, ax=axes[g, c + 1], colorbar=False, vmax=1.0,
                       title=f"query head {h} → K/V head {g}: {head_names[h].split(': ')[1]}")
        axes[g, c + 1].title.set_fontsize(10)
fig.colorbar(kimg, ax=axes[:, 0], shrink=0.6, location="left", label="key entry value")
fig.colorbar(axes[0, 1].images[0], ax=axes[:, 1:], shrink=0.6, label="attention weight $p_{ij}$")
fig.suptitle("GQA with H = 4, H_kv = 2: each cached key/value head (left) serves two query heads that ask different questions",
             fontsize=12)
save_figure(fig, "../figures/04_gqa_heads.png")
plt.show()

# %% [markdown]
# Each row is one group. The left panel is what the KV cache holds for that group — one key vector
# per token (and one value vector, not drawn) — computed once and read by both query heads of the
# group. The two weight matrices beside it differ because the *queries* differ: the same positional
# keys serve "previous token" and "next token", the same feature keys serve "syntax" and "same
# features". In a trained GQA model nothing forces a group's heads to be related; training learns
# query heads that make good use of the keys they share.
#
# ## 6. A padding mask through multi-head attention
#
# A batch holds sentences of different lengths, padded to the longest. `padding_mask(lengths, S)` has
# shape `(B, 1, 1, S)` and broadcasts over the heads and queries: no query attends to a padding key.
# The real tokens of the short sentence must then get exactly the output they get without any padding.
# (Padding *queries* still produce rows; they are ignored downstream.)

# %%
short = "the cat sat on the mat".split()
Xpad = xp.asarray(np.stack([embed(tokens), embed(short, length=len(tokens))]))   # (2, 10, 24)
mask = padding_mask(np.array([len(tokens), len(short)]), len(tokens), xp=xp)
print("mask A shape", tuple(mask.shape), "| batch element 1:", to_numpy(mask)[1, 0, 0].astype(int))

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
fig = draw_heads(w_pad[1], padded_labels, padded_labels, head_names,
                 "A padding mask: every head gives the four <pad> keys (columns) weight exactly 0")
save_figure(fig, "../figures/04_padding_mask_heads.png")
plt.show()

# %% [markdown]
# ## 7. (Optional) the same numbers as `torch.nn.MultiheadAttention`
#
# `multi_head_params_from_torch` reads a PyTorch `MultiheadAttention` state dict (which stores weights
# as `(out, in)` and packs $W^Q, W^K, W^V$ into `in_proj_weight`). PyTorch is not a dependency of this
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
#   dimension, `merge_heads`, project with $W^O$. It equals a loop of $H$ heads with their own
#   projections, whose outputs $\text{head}_i W_i^O$ add up, to $10^{-12}$.
# * $H$ heads of size $d_{\text{model}}/H$ cost the same parameters and FLOPs as one head of size
#   $d_{\text{model}}$; only the softmax work ($H N^2$ exponentials) grows with $H$.
# * Different heads can track different relations at once: relative position (a rotation of the
#   sinusoidal encoding), syntax, similarity.
# * GQA/MQA keep all query heads but share key/value heads, dividing the KV cache by $H / H_{kv}$; GQA is
#   exactly MHA with repeated key/value heads, and one shared key head can serve query heads with
#   different jobs.
# * A padding mask `(B, 1, 1, S)` broadcasts over heads and queries, and padded batches give the same
#   outputs as unpadded sequences.
#
# Every head still materialises an $L \times S$ weight matrix $P$: memory grows like $N^2$.
#
# **Next — 05 FlashAttention:** compute exactly the same output tile by tile with the online softmax,
# never forming $P$, and check it against `scaled_dot_product_attention`.

# %% [markdown]
# ## Exercises
#
# The checker (`attention_ref.check`) runs your function on a battery of cases against a float64
# reference and names the first failing case, the smallest input that shows it and, for the classic
# mistakes, what went wrong. Experiments below call the library's functions as
# `attention_ref.multi_head_attention`, so they work whatever state your exercise 1 is in.

# %%
import attention_ref
from attention_ref.check import check

# %% [markdown]
# **1. Multi-head attention, yourself.** Write
# `multi_head_attention(query, key, value, params, num_heads, *, num_kv_heads=None, attn_mask=None, is_causal=False)`
# for query `(..., L, d_model)` and key, value `(..., S, d_model)`: project with `params.W_q`,
# `params.b_q` (and K, V; a bias may be `None`), split the heads yourself with a reshape and a swap of
# axes, attend with stage 02's `scaled_dot_product_attention` (query head $i$ uses key/value head
# $\lfloor i / (H / H_{kv}) \rfloor$), merge the heads and project with $W^O$. The mask $A$ broadcasts
# to `(..., H, L, S)`; float32 in must give float32 out.

# %% nbgrader={"grade": false, "grade_id": "mha-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def multi_head_attention(query, key, value, params, num_heads, *, num_kv_heads=None, attn_mask=None,
                         is_causal=False):
    ### BEGIN SOLUTION
    ### STUB H = num_heads
    ### STUB H_kv = num_heads if num_kv_heads is None else num_kv_heads
    ### STUB q = ...  # (..., L, H·E): x W_q + b_q
    ### STUB k, v = ..., ...  # (..., S, H_kv·E), (..., S, H_kv·Ev)
    ### STUB q, k, v = ..., ..., ...  # split: (..., H, L, E), (..., H_kv, S, E), (..., H_kv, S, Ev)
    ### STUB heads = ...  # stage 02's attention; query head i uses key/value head i // (H // H_kv)
    ### STUB return ...  # merge to (..., L, H·Ev), then W_o and b_o
    H = num_heads
    H_kv = H if num_kv_heads is None else num_kv_heads

    def project(x, W, b):  # x W + b; a Python 0 keeps float32 float32
        return x @ W + (0 if b is None else b)

    def split(x, n):  # (..., T, n·E) -> (..., T, n, E) -> (..., n, T, E)
        return np.swapaxes(x.reshape(*x.shape[:-1], n, x.shape[-1] // n), -2, -3)

    q = split(project(query, params.W_q, params.b_q), H)
    k = split(project(key, params.W_k, params.b_k), H_kv)
    v = split(project(value, params.W_v, params.b_v), H_kv)
    k, v = np.repeat(k, H // H_kv, axis=-3), np.repeat(v, H // H_kv, axis=-3)  # head i -> i // (H / H_kv)
    heads = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    merged = np.swapaxes(heads, -2, -3)  # (..., L, H, Ev)
    return project(merged.reshape(*merged.shape[:-2], -1), params.W_o, params.b_o)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "mha-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(multi_head_attention, "multi_head_attention", options=("num_kv_heads", "attn_mask", "is_causal"),
      raise_on_failure=True)

# %% [markdown]
# **2. A head with no previous token.** Head 0 sends every token to the token before it. Change it to
# look *two* tokens back (one line: the rotation `shift_positions(-2)`), run the cell, and hover the
# first tokens in the explorer. Where does the first token, which has nothing before it, put its
# weight — and why can a softmax row not simply say "nothing here"?

# %%
W_q_two_back = W_q.copy()
W_q_two_back[pos, 0:16] = 8.0 * shift_positions(-2)
two_back = dataclasses.replace(hand, W_q=xp.asarray(W_q_two_back))
_, w_two_back = attention_ref.multi_head_attention(X, X, X, two_back, num_heads=H, return_weights=True)
w_two_back = to_numpy(w_two_back)
print("head 0, two back.  key position:", "  ".join(f"{j:^4d}" for j in range(len(tokens))))
for i in range(3):
    label = f"query {i} ({tokens[i]}) wants {i - 2:2d}:"
    print(f"{label:>32s}", "  ".join(f"{p:.2f}" for p in w_two_back[0, i]))

# %%
explore(tokens, w_two_back, head=0, head_names=["head 0: two back"] + head_names[1:], selected=0,
        title="head 0 changed to look two tokens back")

# %% [markdown] nbgrader={"grade": true, "grade_id": "two-back-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Token $p$'s query is $PE(p-2)$. Token 2 ("sat") finds position 0 (weight 0.67) and token 1, whose
# wanted position $-1$ does not exist, falls on the nearest one, position 0 (0.72). Token 0 wants
# position $-2$: nothing is near it, and its weight spreads over positions 4, 0, 3 and 5 (0.32, 0.27,
# 0.17, 0.11), because the dot product of two sinusoidal encodings is not monotone in their distance
# (stage 03 drew it). A softmax row always sums to 1, so a query with nothing to find must still
# spend its weight somewhere; trained models learn "sink" tokens (such as [CLS] or the first token)
# that absorb it, as stage 08 shows.

# %% [markdown]
# **3. Predict a KV cache.** Llama 3 8B has 32 layers, $H = 32$ query heads, $H_{kv} = 8$ key/value
# heads of size $E = E_v = 128$, and caches in bfloat16 (2 bytes). Before running the cell: how many
# bytes does its KV cache hold per token, how many GiB for a context of 8192 tokens, and how many
# would it need with full multi-head attention ($H_{kv} = H$)?

# %% [markdown] nbgrader={"grade": true, "grade_id": "kv-cache-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Per token and layer the cache holds $H_{kv}(E + E_v) = 8 \cdot 256 = 2048$ numbers, 4096 bytes; over 32
# layers that is $131\,072$ bytes = 128 KiB per token, and $128 \text{ KiB} \times 8192 = 1$ GiB for
# 8192 tokens. With $H_{kv} = 32$ it would be four times as much: 512 KiB per token, 4 GiB.

# %%
layers_8b, h_kv_8b, e_8b, bytes_per_number = 32, 8, 128, 2
per_token = layers_8b * h_kv_8b * 2 * e_8b * bytes_per_number
print(f"GQA: {per_token:,} bytes per token, {per_token * 8192 / 2**30:.2f} GiB for 8192 tokens")
print(f"MHA: {per_token * 32 // h_kv_8b:,} bytes per token, {per_token * 32 // h_kv_8b * 8192 / 2**30:.2f} GiB")

# %% [markdown]
# **4. Heads larger than $d_{\text{model}}/H$.** Some models use heads wider than $d_{\text{model}}/H$
# (T5 and Gemma, for instance). Predict how the parameters and FLOPs of section 4 change for
# $d_{\text{model}} = 64$ with $H = 8$ heads of size $E = 16$ (so $HE = 2 d_{\text{model}}$), then count
# them with `CountingMatmul`.

# %%
heads_wide, b_o_wide = random_heads(np.random.default_rng(5), 64, 8, 16)
counter = CountingMatmul()
loop_of_heads(x_cost, x_cost, heads_wide, b_o_wide, matmul=counter)
n_params = sum(math.prod(a.shape) for p in heads_wide for a in dataclasses.astuple(p) if a is not None) + 64
print(f"H = 8, E = 16: {n_params:,} parameters, {counter.flops:,} FLOPs "
      f"(E = 8 gave {4 * 64**2 + 4 * 64:,} and {8 * N * 64**2 + 4 * N**2 * 64:,})")

# %% [markdown] nbgrader={"grade": true, "grade_id": "wide-heads-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Every term of section 4's table is proportional to $HE$ instead of $d_{\text{model}}$: with
# $HE = 2 d_{\text{model}}$ the weights double ($4 d_{\text{model}} \cdot HE = 32\,768$, plus $3HE + d_{\text{model}}$
# = 448 biases: 33 216) and so do all FLOPs ($8 N d_{\text{model}} HE + 4 N^2 HE = 2\,621\,440$ for
# $N = 32$). The number of exponentials, $H N^2$, does not change.

# %% [markdown]
# **5. Repeat or tile?** With $H = 4$ and $H_{kv} = 2$, the library lets query heads 0 and 1 share
# key/value head 0 (`np.repeat` of the K/V heads: head $i$ uses $\lfloor i / 2 \rfloor$). Another
# program uses `np.tile` (head $i$ uses $i \bmod 2$). Is one of them wrong? What happens when a model
# trained with one is run with the other? (Try it: the checker of exercise 1 knows this mistake.)

# %% [markdown] nbgrader={"grade": true, "grade_id": "repeat-tile-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Neither grouping is wrong in itself: both give each K/V head two query heads, and a model *trained*
# with either learns weights that suit it. But the grouping is part of the model: the checkpoint's
# query heads 0 and 1 were trained to read K/V head 0. Run with `np.tile`, query head 1 reads K/V head
# 1 instead, its logits are meaningless and the output is wrong — silently, since every shape still
# fits. Llama-style GQA (and PyTorch's `enable_gqa`) uses the repeat convention.
