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
# # 03 · Self-attention, positions and cross-attention
#
# In stage 02 the queries, keys and values were given. In a Transformer they are all computed from
# **the same sequence** $X \in \mathbb{R}^{L \times d_{\text{model}}}$ (one row per token) by three
# learned projections, and the result is projected once more:
#
# $$
# Q = X W_Q + b_Q,\quad K = X W_K + b_K,\quad V = X W_V + b_V,\qquad
# \operatorname{SelfAttn}(X) = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V\, W_O + b_O .
# $$
#
# Every token asks a question (its query), offers a description of itself (its key) and a message
# (its value). Attention by itself has **no notion of order**, so the Transformer adds a
# *positional encoding* to the embeddings (Vaswani et al. 2017, §3.5):
#
# $$
# PE(p, 2i) = \sin\!\left(\frac{p}{10000^{2i/d}}\right),\qquad
# PE(p, 2i+1) = \cos\!\left(\frac{p}{10000^{2i/d}}\right).
# $$
#
# **Cross-attention** is the same computation with the queries from one sequence and the keys and
# values from another (the decoder reading the encoder, stage 01's setting). In `attention_ref`
# the weights are stored as `(in_features, out_features)`, so every projection reads `x @ W + b`.

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    AttentionParams,
    cross_attention,
    init_attention_params,
    scaled_dot_product_attention,
    self_attention,
    sinusoidal_positional_encoding,
)
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. Self-attention over a sentence, with a hand-made embedding
#
# Random embeddings give random pictures, so we build a tiny embedding by hand: 8 features, a few
# of them switched on for each word. The **key** projection is the identity (a token's key is its
# feature vector), the **value** and **output** projections are identities too (a token's output is
# the weighted average of the embeddings it attends to), and the **query** projection encodes
# "what am I looking for?": a determiner looks for a noun, a verb for an animate subject, a pronoun
# for an animate noun other than itself, an adjective for a pronoun.

# %%
features = ["det", "noun", "animate", "verb", "prep", "pronoun", "adj", "conj"]
F = {name: i for i, name in enumerate(features)}
lexicon = {
    "the": ["det"], "cat": ["noun", "animate"], "sat": ["verb"], "on": ["prep"], "mat": ["noun"],
    "because": ["conj"], "it": ["pronoun", "animate"], "was": ["verb"], "tired": ["adj"],
    "who": ["pronoun", "animate"],
}

def embed(words):
    X = np.zeros((len(words), len(features)))
    for i, word in enumerate(words):
        for feature in lexicon[word]:
            X[i, F[feature]] = 1.0
    return X

# row = feature of the querying token, column = feature it looks for, entry = how much
looks_for = {
    "det": {"noun": 3}, "noun": {"verb": 2}, "verb": {"animate": 3, "noun": 1},
    "prep": {"noun": 3, "animate": -2}, "pronoun": {"animate": 3, "noun": 1, "pronoun": -3},
    "adj": {"pronoun": 2, "animate": 1}, "conj": {"verb": 2},
}
W_q = np.zeros((8, 8))
for have, wants in looks_for.items():
    for want, strength in wants.items():
        W_q[F[have], F[want]] = 2.0 * strength
eye = np.eye(8)
hand_params = AttentionParams(W_q=xp.asarray(W_q), W_k=xp.asarray(eye), W_v=xp.asarray(eye),
                              W_o=xp.asarray(eye))

tokens = "the cat sat on the mat because it was tired".split()
X = xp.asarray(embed(tokens))
print("X:", X.shape, "(L tokens × d_model features)")

# %%
out, weights = self_attention(X, hand_params, return_weights=True)
w = to_numpy(weights)
print("weights (rows = queries, columns = keys):")
print(np.round(w, 2))
print()
for i, token in enumerate(tokens):
    j = int(np.argmax(w[i]))
    print(f"{i:2d} {token:8s} attends most to {j:2d} {tokens[j]:6s} (weight {w[i, j]:.2f})")

# %%
fig, ax = plt.subplots(figsize=(7.5, 5.8))
plot_attention(w, tokens, tokens, ax=ax, annotate=True, title="self-attention, hand-made embedding")
save_figure(fig, "../figures/03_self_attention_sentence.png")
plt.show()

# %% [markdown]
# "it" finds "cat", "on" finds "mat", "tired" finds "it". But look at the two "the" rows: they are
# **identical**, and both split their attention evenly between "cat" and "mat". Nothing in the
# computation knows that the first "the" sits next to "cat": the two tokens have the same embedding,
# hence the same query, hence the same output. Attention sees a *set* of tokens, not a sequence.
#
# ## 2. The sinusoidal positional encoding
#
# Each position $p$ gets a vector of sines and cosines of $p$ at geometrically spaced frequencies
# $\omega_i = 10000^{-2i/d}$: the first dimensions oscillate fast, the last ones barely move.

# %%
pe = to_numpy(sinusoidal_positional_encoding(64, 64, xp=xp))
print("PE shape:", pe.shape, "| PE(0) starts", np.round(pe[0, :6], 3), "| PE(1) starts", np.round(pe[1, :6], 3))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.1, 1]})
image = ax1.imshow(pe, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
ax1.set_xlabel("dimension")
ax1.set_ylabel("position p")
ax1.set_title("PE(p, ·), d = 64")
fig.colorbar(image, ax=ax1, fraction=0.046, pad=0.04)
for dim in (6, 7, 16, 30, 50):
    ax2.plot(pe[:, dim], label=f"dim {dim} ({'sin' if dim % 2 == 0 else 'cos'})")
ax2.set_xlabel("position p")
ax2.set_ylabel("PE(p, dim)")
ax2.set_title("a few dimensions")
ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
fig.tight_layout()
save_figure(fig, "../figures/03_positional_encoding.png")
plt.show()

# %% [markdown]
# ### $PE(p) \cdot PE(q)$ depends only on $p - q$
#
# Each sin/cos pair is a point on a circle turned by the angle $p\,\omega_i$, so
#
# $$
# PE(p)\cdot PE(q) = \sum_i \big(\sin p\omega_i \sin q\omega_i + \cos p\omega_i \cos q\omega_i\big)
# = \sum_i \cos\big((p - q)\,\omega_i\big).
# $$
#
# The Gram matrix $PE\,PE^\top$ is therefore constant along every diagonal (a Toeplitz matrix), and it
# peaks at $p = q$: dot products of encodings "know" relative distances.

# %%
gram = pe @ pe.T
spread = max(np.ptp(np.diagonal(gram, offset)) for offset in range(-63, 64))
print("largest spread along any diagonal of PE·PEᵀ < 1e-9:", bool(spread < 1e-9))
offsets = np.arange(-63, 64)
closed_form = np.array([np.cos(o * 10000.0 ** (-np.arange(0, 64, 2) / 64)).sum() for o in offsets])
from_gram = np.array([np.diagonal(gram, -o)[0] for o in offsets])
print("equals Σ cos((p−q) ω_i):", bool(np.allclose(from_gram, closed_form, atol=1e-9)))
print("PE(p)·PE(p+k) for k = 0..5:", np.round(from_gram[63:69], 3))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
image = ax1.imshow(gram, cmap="viridis", interpolation="nearest")
ax1.set_xlabel("position q")
ax1.set_ylabel("position p")
ax1.set_title("PE(p)·PE(q): constant along diagonals")
fig.colorbar(image, ax=ax1, fraction=0.046, pad=0.04)
for p in (0, 20, 40):
    ax2.plot(np.arange(64) - p, gram[p], label=f"p = {p}", lw=2 if p == 0 else 1, ls="-" if p == 0 else "--")
ax2.set_xlabel("offset q − p")
ax2.set_ylabel("PE(p)·PE(q)")
ax2.set_title("rows of the Gram matrix, shifted: one curve")
ax2.legend()
fig.tight_layout()
save_figure(fig, "../figures/03_pe_dot_products.png")
plt.show()

# %% [markdown]
# ## 3. Causal vs bidirectional self-attention
#
# An encoder (BERT) lets every token see the whole sentence. A decoder generating text left to
# right must not see the future: `is_causal=True` masks every key $j > i$.

# %%
_, w_bi = self_attention(X, hand_params, return_weights=True)
_, w_causal = self_attention(X, hand_params, is_causal=True, return_weights=True)
w_bi, w_causal = to_numpy(w_bi), to_numpy(w_causal)
print("causal weights above the diagonal all 0:", bool(np.all(np.triu(w_causal, 1) == 0)))
print("'it' (causal) attends to:", ", ".join(f"{t} {x:.2f}" for t, x in zip(tokens[:8], w_causal[7, :8], strict=True)))

fig, axes = plt.subplots(1, 2, figsize=(12, 5))
plot_attention(w_bi, tokens, tokens, ax=axes[0], title="bidirectional (encoder)")
plot_attention(w_causal, tokens, tokens, ax=axes[1], title="causal, is_causal=True (decoder)")
fig.tight_layout()
save_figure(fig, "../figures/03_causal_vs_bidirectional.png")
plt.show()

# %% [markdown]
# In the causal picture the first "the" can only look at itself, and "sat" can no longer look ahead.
#
# ## 4. Permutation equivariance, and how positions break it
#
# Without positions, shuffling the tokens just shuffles the output rows the same way:
# $\operatorname{SelfAttn}(P X) = P\,\operatorname{SelfAttn}(X)$ for every permutation matrix $P$.
# We check it with random parameters (Glorot weights and random biases). Adding the positional
# encoding **after** shuffling (position $p$ stays at slot $p$) breaks the symmetry: word order now
# changes the result.

# %%
rng = np.random.default_rng(0)
params = init_attention_params(rng, 8)
params = dataclasses.replace(
    params, **{name: rng.normal(size=getattr(params, name).shape) for name in ("b_q", "b_k", "b_v", "b_o")}
)
params = AttentionParams(**{f.name: xp.asarray(getattr(params, f.name)) for f in dataclasses.fields(params)})
perm = rng.permutation(len(tokens))
print("shuffled sentence:", " ".join(tokens[i] for i in perm))

Xn = to_numpy(X)
out_plain = to_numpy(self_attention(X, params))
out_shuffled = to_numpy(self_attention(xp.asarray(Xn[perm]), params))
diff = np.max(np.abs(out_shuffled - out_plain[perm]))
print(f"no positions:   SelfAttn(PX) == P SelfAttn(X): {bool(diff < 1e-12)}  (max abs diff < 1e-12)")

pe10 = to_numpy(sinusoidal_positional_encoding(len(tokens), 8, xp=xp))
out_pos = to_numpy(self_attention(xp.asarray(Xn + pe10), params))
out_pos_shuffled = to_numpy(self_attention(xp.asarray(Xn[perm] + pe10), params))
diff = np.max(np.abs(out_pos_shuffled - out_pos[perm]))
print(f"with positions: SelfAttn(PX + PE) == P SelfAttn(X + PE): {bool(diff < 1e-12)}  (max abs diff {diff:.2f})")

same_the = np.max(np.abs(out_plain[0] - out_plain[4]))
diff_the = np.max(np.abs(out_pos[0] - out_pos[4]))
print(f"the two 'the' outputs: identical without positions: {bool(same_the == 0)},"
      f" differ with positions: {bool(diff_the > 0.01)}")

# %% [markdown]
# ## 5. Cross-attention: a question reads the sentence
#
# Queries come from a 3-token question ($L = 3$), keys and values from the 10-token sentence
# ($S = 10$); the weights are a $3 \times 10$ matrix. Same hand-made parameters as above.

# %%
question = ["who", "was", "tired"]
Xq = xp.asarray(embed(question))
out_x, w_x = cross_attention(Xq, X, hand_params, return_weights=True)
w_x = to_numpy(w_x)
print("output shape", tuple(out_x.shape), "| weights shape", w_x.shape)
print(np.round(w_x, 2))
for i, word in enumerate(question):
    print(f"{word:6s} -> {tokens[int(np.argmax(w_x[i]))]}")

fig, ax = plt.subplots(figsize=(7.5, 2.6))
plot_attention(w_x, question, tokens, ax=ax, annotate=True, title="cross-attention: question (L=3) → sentence (S=10)")
save_figure(fig, "../figures/03_cross_attention.png")
plt.show()

# %% [markdown]
# ## 6. Check against the previous stage
#
# `self_attention` must be nothing more than the three projections, stage 02's
# `scaled_dot_product_attention`, and the output projection. With the random parameters (non-zero
# biases) and a batch of two sequences:

# %%
rng = np.random.default_rng(1)
Xb = xp.asarray(rng.normal(size=(2, 10, 8)))
p = params
Q = Xb @ p.W_q + p.b_q
K = Xb @ p.W_k + p.b_k
V = Xb @ p.W_v + p.b_v
for causal in (False, True):
    out_sa, w_sa = self_attention(Xb, p, is_causal=causal, return_weights=True)
    ref_out, ref_w = scaled_dot_product_attention(Q, K, V, is_causal=causal, return_weights=True)
    ref_out = ref_out @ p.W_o + p.b_o
    d_out = float(np.max(np.abs(to_numpy(out_sa - ref_out))))
    d_w = float(np.max(np.abs(to_numpy(w_sa - ref_w))))
    print(f"is_causal={causal!s:5s}: output max abs diff < 1e-12: {d_out < 1e-12}, weights: {d_w < 1e-12}")

# cross-attention: queries from a 4-token sequence, keys/values from the 10-token one
Xc = xp.asarray(rng.normal(size=(2, 4, 8)))
out_ca = cross_attention(Xc, Xb, p)
ref_ca = scaled_dot_product_attention(Xc @ p.W_q + p.b_q, K, V) @ p.W_o + p.b_o
print("cross-attention (L=4, S=10) max abs diff < 1e-12:", bool(np.max(np.abs(to_numpy(out_ca - ref_ca))) < 1e-12))

# %% [markdown]
# ## What we learned / next stage
#
# * Self-attention is stage 02's attention applied to $Q = XW_Q$, $K = XW_K$, $V = XW_V$ computed
#   from one sequence; the projections decide *what a token looks for* and *how it describes itself*.
#   `self_attention` equals projections + `scaled_dot_product_attention` + $W_O$ to $10^{-12}$.
# * Without positions, attention is permutation-equivariant: two identical words get identical outputs
#   wherever they stand. The sinusoidal encoding fixes that, and $PE(p)\cdot PE(q)$ depends only on
#   $p - q$, so relative distance is visible to dot products.
# * A causal mask turns an encoder layer into a decoder layer; cross-attention takes queries from one
#   sequence ($L$) and keys/values from another ($S \ne L$).
#
# **Next — 04 multi-head attention:** one head can only look for one thing at a time ("it" → "cat").
# Running $H$ smaller heads in parallel lets a layer look for several relations at once, and sharing
# keys and values between heads (GQA, MQA) shrinks the KV cache.
