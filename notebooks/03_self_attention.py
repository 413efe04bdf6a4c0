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
# **the same sequence** $X \in \mathbb{R}^{N \times d_{\text{model}}}$ (one row per token) by three
# learned projections, and the result is projected once more:
#
# $$
# Q = X W_Q + b_Q,\quad K = X W_K + b_K,\quad V = X W_V + b_V,\qquad
# \operatorname{SelfAttn}(X) = \operatorname{softmax}\!\left(\tau\, Q K^\top\right) V\, W_O + b_O,
# \quad \tau = \frac{1}{\sqrt{E}} .
# $$
#
# Every token asks a question (its query), offers a description of itself (its key) and a message
# (its value). Attention by itself has **no notion of order**, so the Transformer adds a
# *positional encoding* to the embeddings (Vaswani et al. 2017, §3.5): position $\mathrm{pos}$ gets
#
# $$
# PE(\mathrm{pos}, 2f) = \sin(\mathrm{pos}\,\omega_f),\qquad
# PE(\mathrm{pos}, 2f+1) = \cos(\mathrm{pos}\,\omega_f),\qquad
# \omega_f = 10000^{-2f/d_{\text{model}}},\quad f = 0, 1, \dots, \tfrac{d_{\text{model}}}{2} - 1 .
# $$
#
# **Cross-attention** is the same computation with the queries from one sequence and the keys and
# values from another (the decoder reading the encoder, stage 01's setting). In `attention_ref`
# the weights are stored as `(in_features, out_features)`, so every projection reads `x @ W + b`.

# %% [markdown]
# ## Notation
#
# The course's notation (README, "Notation"), the part this notebook uses:
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $N$ | sequence length in self-attention ($L = S = N$) | `N`, `len(tokens)` |
# | $L$, $S$ | number of queries and of keys/values in cross-attention | `L`, `S` |
# | $d_{\text{model}}$ | width of the token vectors $X$ | `d_model` |
# | $E$ | query/key feature size (here one head, $E = d_{\text{model}}$) | `E` |
# | $Q, K, V, O$ | queries, keys, values, output; rows $q_i$, $k_j$ | `q`, `k`, `v`, `out` |
# | $W_Q, W_K, W_V, W_O$ | projections, stored (in, out) | `W_q`, `W_k`, `W_v`, `W_o` |
# | $\tau$ | the scale, $1/\sqrt{E}$ unless given | `scale` |
# | $Z$, $P$ | logits $\tau QK^\top$ and weights $P = \operatorname{softmax}(Z)$, entries $z_{ij}$, $p_{ij}$ | `logits`, `weights` |
# | $A$ | boolean mask, True = attend | `attn_mask` |
#
# Local to this notebook: positions $\mathrm{pos}$, frequencies $\omega_f$ with index $f$, an
# offset $\delta$ between two positions (Vaswani's $k$; $k_j$ is a key here), and in section 7
# the kernel width $\kappa$ of a convolution and the neighbourhood size $r$ of restricted
# self-attention.

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
    sliding_window_mask,
)
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU


# %%
def label_colorbar(ax, text):
    """Name the quantity that the colour of ``ax``'s heatmap shows."""
    ax.images[0].colorbar.set_label(text)


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
print("X:", X.shape, "(N tokens × d_model features)")

# %%
out, weights = self_attention(X, hand_params, return_weights=True)
w = to_numpy(weights)
print("weights P (rows = queries, columns = keys):")
print(np.round(w, 2))
print()
for i, token in enumerate(tokens):
    j = int(np.argmax(w[i]))
    print(f"{i:2d} {token:8s} attends most to {j:2d} {tokens[j]:6s} (weight {w[i, j]:.2f})")

# %%
fig, ax = plt.subplots(figsize=(7.8, 6.2))
plot_attention(w, tokens, tokens, ax=ax, annotate=True,
               title="Each word finds the word its role asks for:\n'it' → 'cat', 'on' → 'mat', 'tired' → 'it'")
ax.set_xlabel("key token $j$")
ax.set_ylabel("query token $i$")
label_colorbar(ax, "$p_{ij}$")
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
# Each position gets a vector of sines and cosines of $\mathrm{pos}\,\omega_f$ at geometrically
# spaced frequencies $\omega_f = 10000^{-2f/d_{\text{model}}}$, from $\omega_0 = 1$ (a period of
# $2\pi \approx 6.3$ positions) down to almost $10^{-4}$ (a period of about 60,000 positions).
# The library interleaves them (columns sin, cos, sin, cos, …, as the formula numbers them); the
# picture below groups the sines and the cosines so that each frequency's pattern is visible.

# %%
d_model = 64
pe = to_numpy(sinusoidal_positional_encoding(100, d_model, xp=xp))
omega = 10000.0 ** (-np.arange(0, d_model, 2) / d_model)          # ω_f, f = 0 .. 31
print("PE shape:", pe.shape, "| PE(0) starts", np.round(pe[0, :6], 3), "| PE(1) starts", np.round(pe[1, :6], 3))
print("column 2f is sin(pos ω_f), column 2f+1 is cos(pos ω_f):",
      bool(np.allclose(pe[:, 0::2], np.sin(np.arange(100)[:, None] * omega))
           and np.allclose(pe[:, 1::2], np.cos(np.arange(100)[:, None] * omega))))
print("periods 2π/ω_f of f = 0, 8, 16, 31:", ", ".join(f"{2 * np.pi / omega[f]:,.1f}" for f in (0, 8, 16, 31)))

# %%
half = d_model // 2
grouped = np.concatenate([pe[:, 0::2], pe[:, 1::2]], axis=1)      # [sin f = 0..31 | cos f = 0..31]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.1]})
image = ax1.imshow(grouped, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
ax1.axvline(half - 0.5, color="black", lw=1.5)
ticks = [0, 8, 16, 24]
ax1.set_xticks(ticks + [half + t for t in ticks], [str(t) for t in ticks] * 2)
ax1.set_xlabel(r"frequency index $f$:   sines $\sin(\mathrm{pos}\,\omega_f)$  |  cosines $\cos(\mathrm{pos}\,\omega_f)$")
ax1.set_ylabel("position pos")
ax1.set_title(f"PE(pos, ·) for d_model = {d_model}, sines and cosines grouped")
fig.colorbar(image, ax=ax1, fraction=0.046, pad=0.04, label="PE value")
for f in (2, 6, 10, 16):
    ax2.plot(pe[:, 2 * f], label=rf"$\sin(\mathrm{{pos}}\,\omega_{{{f}}})$, period {2 * np.pi / omega[f]:,.0f}")
ax2.set_xlabel("position pos")
ax2.set_ylabel("PE(pos, 2f)")
ax2.set_title("four of the sine columns")
ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
fig.suptitle("Every position gets its own pattern: low f turn fast, high f barely move")
fig.tight_layout()
save_figure(fig, "../figures/03_positional_encoding.png")
plt.show()

# %% [markdown]
# ### 2.1 What dot products of encodings know, and what they do not
#
# Each (sin, cos) pair is a point on the unit circle at the angle $\mathrm{pos}\,\omega_f$, so for
# two positions $a$ and $b$
#
# $$
# PE(a)\cdot PE(b) = \sum_f \big(\sin a\omega_f \sin b\omega_f + \cos a\omega_f \cos b\omega_f\big)
# = \sum_f \cos\big((a - b)\,\omega_f\big).
# $$
#
# Two facts follow, and both limit what this says:
#
# * it depends only on the offset $a - b$ (the Gram matrix $PE\,PE^\top$ is constant along its
#   diagonals), and it peaks at $a = b$;
# * it is **even** in the offset: $\cos$ is even, so a key $\delta$ positions *before* the query and
#   one $\delta$ positions *after* it get the same value. The dot product measures distance but
#   cannot tell left from right.
#
# And in a real layer the logits are not $PE(a)\cdot PE(b)$: the encodings are added to the token
# embeddings and go through the learned projections, $z_{ab} = \tau\,(x_a + PE(a))\, W_Q W_K^\top (x_b + PE(b))^\top$.
# Even the position-only part $PE(a)\, W_Q W_K^\top PE(b)^\top$ is no longer a function of $a - b$
# for a general $W_Q W_K^\top$. All three, checked:

# %%
gram = pe @ pe.T
N_pe = len(pe)
offsets = np.arange(-(N_pe - 1), N_pe)
spread = max(np.ptp(np.diagonal(gram, offset)) for offset in offsets)
print("PE·PE: largest spread along a diagonal < 1e-9:", bool(spread < 1e-9))
closed_form = np.array([np.cos(o * omega).sum() for o in offsets])
from_gram = np.array([np.diagonal(gram, -o)[0] for o in offsets])
print("equals Σ_f cos((a − b) ω_f):", bool(np.allclose(from_gram, closed_form, atol=1e-9)))
print("even: PE(50)·PE(50 + δ) == PE(50)·PE(50 − δ) for δ = 1..49:",
      bool(np.allclose(gram[50, 51:100], gram[50, 49:0:-1], atol=1e-9)))

rng = np.random.default_rng(0)
random_layer = init_attention_params(rng, d_model)                    # Glorot W_Q, W_K
gram_projected = pe @ random_layer.W_q @ random_layer.W_k.T @ pe.T
spread_projected = max(np.ptp(np.diagonal(gram_projected, offset)) for offset in offsets)
print(f"PE W_Q W_Kᵀ PEᵀ with random projections: spread along a diagonal up to {spread_projected:.1f} "
      f"(its entries reach {np.abs(gram_projected).max():.1f})")

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.05]})
for ax, G, title, cmap in ((axes[0], gram, "PE(a)·PE(b): constant along diagonals", "viridis"),
                           (axes[1], gram_projected, r"PE(a) $W_Q W_K^\top$ PE(b)$^\top$, random projections", "RdBu_r")):
    limit = np.abs(G).max()
    image = ax.imshow(G, cmap=cmap, vmin=G.min() if cmap == "viridis" else -limit, vmax=limit, interpolation="nearest")
    ax.set_xlabel("key position b")
    ax.set_ylabel("query position a")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="dot product")
for a in (20, 50, 80):
    axes[2].plot(np.arange(N_pe) - a, gram[a], lw=2 if a == 50 else 1, ls="-" if a == 50 else "--",
                 label=f"PE·PE, query at a = {a}")
axes[2].plot(np.arange(N_pe) - 50, gram_projected[50], color="tab:red", lw=1,
             label=r"with $W_Q W_K^\top$, a = 50")
axes[2].set_xlabel("offset b − a")
axes[2].set_ylabel("dot product")
axes[2].set_title("PE·PE: one curve for every a (they coincide), symmetric in b − a", fontsize=10)
axes[2].legend(fontsize=8)
fig.suptitle("Dot products of encodings depend only on |b − a|; learned projections break even that")
fig.tight_layout()
save_figure(fig, "../figures/03_pe_dot_products.png")
plt.show()

# %% [markdown]
# ### 2.2 Vaswani's real argument: a shift by $\delta$ is a rotation
#
# Vaswani et al. chose sinusoids "because we hypothesized it would allow the model to easily learn
# to attend by relative positions, since for any fixed offset $k$, $PE_{pos+k}$ can be represented
# as a linear function of $PE_{pos}$" (§3.5). For one frequency, the angle-addition formulas give
#
# $$
# \begin{pmatrix} \sin((\mathrm{pos}+\delta)\omega_f) \\ \cos((\mathrm{pos}+\delta)\omega_f) \end{pmatrix}
# = \begin{pmatrix} \sin\mathrm{pos}\,\omega_f \cos\delta\omega_f + \cos\mathrm{pos}\,\omega_f \sin\delta\omega_f \\
#                   \cos\mathrm{pos}\,\omega_f \cos\delta\omega_f - \sin\mathrm{pos}\,\omega_f \sin\delta\omega_f \end{pmatrix}
# = \underbrace{\begin{pmatrix} \cos\delta\omega_f & \sin\delta\omega_f \\ -\sin\delta\omega_f & \cos\delta\omega_f \end{pmatrix}}_{R_f(\delta)}
#   \begin{pmatrix} \sin\mathrm{pos}\,\omega_f \\ \cos\mathrm{pos}\,\omega_f \end{pmatrix}.
# $$
#
# $R_f(\delta)$ is a $2 \times 2$ rotation by the angle $\delta\omega_f$, and it does **not** depend on
# $\mathrm{pos}$. Stacking one such block per frequency gives a block-diagonal
# $d_{\text{model}} \times d_{\text{model}}$ matrix $R(\delta)$ with
#
# $$
# PE(\mathrm{pos} + \delta) = R(\delta)\, PE(\mathrm{pos}) \qquad \text{for every position pos.}
# $$
#
# A shift in position is a fixed linear map of the encoding — exactly what a projection such as
# $W_Q$ can represent. We build $R(\delta)$ and check it:

# %%
def shift_rotation(delta, omega):
    """R(δ): one 2×2 rotation by δ ω_f per frequency, acting on (sin, cos) column pairs."""
    R = np.zeros((2 * len(omega), 2 * len(omega)))
    for f, w in enumerate(omega):
        c, s = np.cos(delta * w), np.sin(delta * w)
        R[2 * f : 2 * f + 2, 2 * f : 2 * f + 2] = [[c, s], [-s, c]]
    return R


for delta in (1, 7, -3):
    R = shift_rotation(delta, omega)
    lo, hi = max(0, -delta), min(N_pe, N_pe - delta)
    err = np.max(np.abs(pe[lo:hi] @ R.T - pe[lo + delta : hi + delta]))    # rows: PE(pos)ᵀ R(δ)ᵀ
    print(f"δ = {delta:2d}: PE(pos + δ) = R(δ) PE(pos) for every pos (max error < 1e-12): {err < 1e-12};"
          f" R(δ) is a rotation (RᵀR = I, det 1): {np.allclose(R.T @ R, np.eye(d_model)) and np.isclose(np.linalg.det(R), 1)}")

# %% [markdown]
# **A head that looks one position back.** Feed the encodings alone ($X = PE$, $N = 16$) to a head
# whose query projection is $W_Q = R(-1)^\top$ (so that $q_i = PE(i - 1)$) and whose key projection
# is the identity: $z_{ij} = \tau\, PE(i-1)\cdot PE(j) = \tau \sum_f \cos((i - 1 - j)\,\omega_f)$ is
# largest at $j = i - 1$. With a causal mask and $\tau = 2$ (a learned $W_Q$ would get the same
# sharpness from its norm):

# %%
N = 16
pe16 = pe[:N]
queries = pe16 @ shift_rotation(-1, omega).T                       # q_i = PE(i − 1)
_, w_prev = scaled_dot_product_attention(xp.asarray(queries), xp.asarray(pe16), xp.asarray(pe16),
                                         is_causal=True, scale=2.0, return_weights=True)
w_prev = to_numpy(w_prev)
print("each query's largest weight is on the previous position (i = 1..15):",
      bool(np.all(w_prev[1:].argmax(axis=1) == np.arange(N - 1))))
print("weight on the previous position:", np.round(np.diagonal(w_prev, -1), 2))

# %%
fig, ax = plt.subplots(figsize=(6.4, 5.2))
positions = [str(i) for i in range(N)]
plot_attention(w_prev, positions, positions, ax=ax, vmax=1,
               title="With $W_Q = R(-1)^\\top$, a head on positions alone\nlooks one position back")
ax.set_xlabel("key position $j$")
ax.set_ylabel("query position $i$")
label_colorbar(ax, "$p_{ij}$")
save_figure(fig, "../figures/03_previous_position_head.png")
plt.show()

# %% [markdown]
# So the sinusoidal encoding gives the model what it needs to attend by relative position, but the
# model has to *learn* the right projection, and the content $x$ added to $PE$ mixes into the same
# dot product. **RoPE** (rotary position embedding, Su et al. 2021; stage 09) uses the same rotations
# differently: instead of adding $PE$ to the input, it rotates each query and key by its own
# position, $\tilde q_i = R(i)\, q_i$ and $\tilde k_j = R(j)\, k_j$. Then
# $\tilde q_i \cdot \tilde k_j = q_i^\top R(i)^\top R(j)\, k_j = q_i^\top R(j - i)\, k_j$: the logit depends on
# the positions only through $j - i$, with sign, whatever the projections learned.
#
# ## 3. Causal vs bidirectional self-attention
#
# An encoder (BERT) lets every token see the whole sentence. A model that generates text left to
# right must not see the future: `is_causal=True` masks every key $j > i$.

# %%
_, w_bi = self_attention(X, hand_params, return_weights=True)
_, w_causal = self_attention(X, hand_params, is_causal=True, return_weights=True)
w_bi, w_causal = to_numpy(w_bi), to_numpy(w_causal)
print("causal weights above the diagonal all 0:", bool(np.all(np.triu(w_causal, 1) == 0)))
print("'it' (causal) attends to:", ", ".join(f"{t} {x:.2f}" for t, x in zip(tokens[:8], w_causal[7, :8], strict=True)))

fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
plot_attention(w_bi, tokens, tokens, ax=axes[0], vmax=1, title="bidirectional (encoder)")
plot_attention(w_causal, tokens, tokens, ax=axes[1], vmax=1, title="causal, is_causal=True")
for ax in axes:
    ax.set_xlabel("key token $j$")
    ax.set_ylabel("query token $i$")
    label_colorbar(ax, "$p_{ij}$")
fig.suptitle("A causal mask hides every later token: the first 'the' sees only itself, 'sat' cannot look ahead")
fig.tight_layout()
save_figure(fig, "../figures/03_causal_vs_bidirectional.png")
plt.show()

# %% [markdown]
# In the causal picture the first "the" can only look at itself, and "sat" can no longer look ahead.
#
# A causal mask makes self-attention fit for generating text left to right; it does not by itself
# make a Transformer *decoder layer*. In the original Transformer (Vaswani et al. 2017, §3.1) a
# decoder layer has three sub-layers: masked (causal) self-attention, then **cross-attention** to
# the encoder's output (section 5 below), then a feed-forward network. A *decoder-only* model
# (GPT) has no encoder and hence no cross-attention: each layer is masked self-attention followed
# by a feed-forward network.
#
# ## 4. Permutation equivariance, and how positions break it
#
# Without positions, shuffling the tokens just shuffles the output rows the same way:
# $\operatorname{SelfAttn}(\Pi X) = \Pi\,\operatorname{SelfAttn}(X)$ for every permutation matrix
# $\Pi$. We check it with random parameters (Glorot weights and random biases). Adding the
# positional encoding **after** shuffling (position $\mathrm{pos}$ stays at slot $\mathrm{pos}$)
# breaks the symmetry: word order now changes the result.

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
print(f"no positions:   SelfAttn(ΠX) == Π SelfAttn(X): {bool(diff < 1e-12)}  (max abs diff < 1e-12)")

pe10 = to_numpy(sinusoidal_positional_encoding(len(tokens), 8, xp=xp))
out_pos = to_numpy(self_attention(xp.asarray(Xn + pe10), params))
out_pos_shuffled = to_numpy(self_attention(xp.asarray(Xn[perm] + pe10), params))
diff = np.max(np.abs(out_pos_shuffled - out_pos[perm]))
print(f"with positions: SelfAttn(ΠX + PE) == Π SelfAttn(X + PE): {bool(diff < 1e-12)}  (max abs diff {diff:.2f})")

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

fig, ax = plt.subplots(figsize=(8, 3.0))
plot_attention(w_x, question, tokens, ax=ax, annotate=True,
               title="Cross-attention: each question word (L = 3) reads the sentence (S = 10);\n'who' and 'was' find 'cat', 'tired' finds 'it'")
ax.set_xlabel("key: sentence token $j$")
ax.set_ylabel("query: question token $i$")
label_colorbar(ax, "$p_{ij}$")
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
# ## 7. Why self-attention replaced recurrence (Vaswani et al. 2017, Table 1)
#
# Vaswani et al. compare four ways to build a layer that maps a sequence of $N$ vectors of width
# $d_{\text{model}}$ to another such sequence:
#
# | layer type | complexity per layer | sequential operations | maximum path length |
# | --- | --- | --- | --- |
# | self-attention | $O(N^2 \cdot d_{\text{model}})$ | $O(1)$ | $O(1)$ |
# | recurrent | $O(N \cdot d_{\text{model}}^2)$ | $O(N)$ | $O(N)$ |
# | convolutional, kernel width $\kappa$ | $O(\kappa \cdot N \cdot d_{\text{model}}^2)$ | $O(1)$ | $O(\log_\kappa N)$ |
# | self-attention restricted to $r$ neighbours | $O(r \cdot N \cdot d_{\text{model}})$ | $O(1)$ | $O(N / r)$ |
#
# Why each entry is what it is:
#
# * **Complexity per layer** (multiply-adds). Self-attention forms $N^2$ logits $q_i \cdot k_j$ of
#   $d_{\text{model}}$ multiply-adds each, and the average $PV$ costs the same again. A recurrent layer multiplies the
#   state by a $d_{\text{model}} \times d_{\text{model}}$ matrix at each of $N$ steps. A convolution
#   applies $\kappa$ such matrices at each of $N$ positions. Restricted attention scores only $r$ keys
#   per query. (The table counts the mixing across positions; the projections $XW_Q$, $XW_K$,
#   $XW_V$ add $O(N d_{\text{model}}^2)$ to attention, as the input matrices do to a recurrent layer.)
#   Self-attention is the cheaper of the first two when $N < d_{\text{model}}$, which was the case for
#   the sentences of machine translation.
# * **Sequential operations.** Every row of $QK^\top$ and of $PV$ can be computed at the same time:
#   a few matrix products, whatever $N$. A recurrent layer cannot compute the state $h_t$ before
#   $h_{t-1}$: $N$ steps one after the other. Convolutions, like attention, compute all positions
#   at once.
# * **Maximum path length**: how many layers (or steps) a signal must pass through to go from one
#   position to any other, which makes long-range dependencies harder to learn. In self-attention
#   every query reads every key directly: one step. In a recurrent layer position 1 reaches position
#   $N$ through $N - 1$ state updates. A convolution of width $\kappa$ widens the view by a factor
#   $\kappa$ per layer when it is dilated, $O(\log_\kappa N)$ layers (contiguous kernels need
#   $O(N/\kappa)$). Restricted attention sees $r$ neighbours, so a signal travels about $r/2$
#   positions per layer: $O(N/r)$ layers.
#
# Two entries, counted. The work of self-attention and of a recurrent layer for $d_{\text{model}} = 512$:

# %%
width = 512
print("      N   self-attention N²·d_model   recurrent N·d_model²   cheaper")
for n in (64, 256, 512, 2048, 8192):
    attention_work, recurrent_work = n * n * width, n * width * width
    cheaper = "self-attention" if attention_work < recurrent_work else "equal" if attention_work == recurrent_work else "recurrent"
    print(f"{n:7d}   {attention_work:25,d}   {recurrent_work:20,d}   {cheaper}")


# %% [markdown]
# And the path lengths, read off the masks: a mask $A$ says which positions one layer lets each
# position read, so the boolean matrix power $A^\ell$ says which positions $\ell$ stacked layers
# connect. The path length from the first to the last of $N = 64$ positions is the smallest $\ell$
# with $(A^\ell)_{N-1,\,0}$ True. A recurrent step reads the position itself and the one before; a
# restricted layer reads a window of $r = 5$ centred neighbours (`sliding_window_mask` with two on
# each side); full self-attention reads everything.

# %%
def path_length(A):
    """Smallest number of stacked layers with mask A that carries position 0 to position N − 1."""
    reach, layers = A.copy(), 1
    while not reach[-1, 0]:
        reach, layers = (reach.astype(int) @ A.astype(int)) > 0, layers + 1
    return layers


n_path = 64
layer_masks = {
    "self-attention": np.ones((n_path, n_path), dtype=bool),
    "recurrent (itself and the previous position)": to_numpy(sliding_window_mask(n_path, n_path, 1, 0, xp=xp)),
    "restricted self-attention, r = 5": to_numpy(sliding_window_mask(n_path, n_path, 2, 2, xp=xp)),
}
for name, A in layer_masks.items():
    print(f"{name:46s} path length {path_length(A):3d}")
print(f"expected: 1, N − 1 = {n_path - 1}, ⌈(N − 1)/2⌉ = {int(np.ceil((n_path - 1) / 2))}")

# %% [markdown]
# ## What we learned / next stage
#
# * Self-attention is stage 02's attention applied to $Q = XW_Q$, $K = XW_K$, $V = XW_V$ computed
#   from one sequence; the projections decide *what a token looks for* and *how it describes itself*.
#   `self_attention` equals projections + `scaled_dot_product_attention` + $W_O$ to $10^{-12}$.
# * Without positions, attention is permutation-equivariant: two identical words get identical outputs
#   wherever they stand. The sinusoidal encoding fixes that. $PE(a)\cdot PE(b)$ depends only on the
#   offset, but evenly, and learned projections do not keep even that; what the sinusoids guarantee
#   is that a shift by $\delta$ is a fixed rotation $R(\delta)$ of the encoding, which a projection can
#   learn — a head that looks one position back. RoPE (stage 09) rotates the queries and keys themselves.
# * A causal mask lets a model generate left to right; a Transformer decoder layer also has
#   cross-attention to the encoder (a decoder-only model: masked self-attention and a feed-forward
#   network). Cross-attention takes queries from one sequence ($L$) and keys/values from another
#   ($S \ne L$).
# * Self-attention does $O(N^2 d_{\text{model}})$ work in $O(1)$ sequential steps and connects any two
#   positions in one layer; a recurrent layer needs $N$ sequential steps and a path of length $N$.
#
# **Next — 04 multi-head attention:** one head can only look for one thing at a time ("it" → "cat").
# Running $H$ smaller heads in parallel lets a layer look for several relations at once, and sharing
# keys and values between heads (GQA, MQA) shrinks the KV cache.

# %% [markdown]
# ## Exercises
#
# The checker (`attention_ref.check`) runs your function against a float64 reference on cases from
# easy to hard and diagnoses the classic mistakes.

# %%
import attention_ref as ar
from attention_ref.check import check

# %% [markdown]
# **1. Self-attention.** Write `self_attention(x, params, attn_mask=None, is_causal=False)`: `x` has
# shape `(..., N, d_model)`, `params` is an `AttentionParams` with the (in, out) matrices `W_q`,
# `W_k`, `W_v`, `W_o` and the biases `b_q`, `b_k`, `b_v`, `b_o` (each may be `None`). Return the
# output `(..., N, d_out)`. Use stage 02's attention for the middle step —
# `ar.scaled_dot_product_attention`, or your own from notebook 02. (The masks are bonus cases.)

# %% nbgrader={"grade": false, "grade_id": "self-attention-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def self_attention(x, params, attn_mask=None, is_causal=False):
    ### BEGIN SOLUTION
    ### STUB Q = ...  # x W_q + b_q (a bias may be None)
    ### STUB K = ...
    ### STUB V = ...
    ### STUB O = ...  # stage 02's attention of Q, K, V
    ### STUB return ...  # O W_o + b_o
    def project(inputs, W, b):
        y = inputs @ W
        return y if b is None else y + b

    Q = project(x, params.W_q, params.b_q)
    K = project(x, params.W_k, params.b_k)
    V = project(x, params.W_v, params.b_v)
    O = ar.scaled_dot_product_attention(Q, K, V, attn_mask=attn_mask, is_causal=is_causal)
    return project(O, params.W_o, params.b_o)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "self-attention-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(self_attention, "self_attention", raise_on_failure=True)

# %% [markdown]
# **2. Does a causal mask know the order?** Section 4 showed that self-attention without positions
# is permutation-equivariant. *Predict*: is it still equivariant with `is_causal=True` (and no
# positional encoding)? Run the cell and explain.

# %%
out_causal = to_numpy(ar.self_attention(X, params, is_causal=True))
out_causal_shuffled = to_numpy(ar.self_attention(xp.asarray(Xn[perm]), params, is_causal=True))
print("causal, no positions: SelfAttn(ΠX) == Π SelfAttn(X):",
      bool(np.allclose(out_causal_shuffled, out_causal[perm])))
print("the two 'the' outputs identical:", bool(np.allclose(out_causal[0], out_causal[4])))

# %% [markdown] nbgrader={"grade": true, "grade_id": "causal-order-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# No. With a causal mask, token $i$ averages over tokens $0 \dots i$, so which tokens it sees depends
# on where it stands: shuffling changes each token's set of visible keys, not only the order of the
# output rows. Even the two identical "the" tokens now differ — the first sees only itself, the second
# sees five tokens. The mask itself carries order information, which is why decoder-only models
# trained without any positional encoding can still learn about positions (Haviv et al. 2022).

# %% [markdown]
# **3. Left or right?** $PE(a)\cdot PE(b)$ cannot tell a key before the query from one after it
# (section 2.1). *Predict* the weights of section 2.2's head when its query projection is
# $R(+1)^\top$ instead of $R(-1)^\top$ and there is **no** causal mask; then run the cell. Does the
# rotation tell left from right?

# %%
queries_next = pe16 @ shift_rotation(+1, omega).T                   # q_i = PE(i + 1)
_, w_next = ar.scaled_dot_product_attention(queries_next, pe16, pe16, scale=2.0, return_weights=True)
print("largest weight of queries 0..14 at key:", w_next[:-1].argmax(axis=1))
print("weight on the next position:", np.round(np.diagonal(w_next, 1), 2))

# %% [markdown] nbgrader={"grade": true, "grade_id": "left-right-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Each query $i$ now puts most of its weight on key $i + 1$, the *next* position. The logits are
# $\tau\,PE(i+1)\cdot PE(j) = \tau\sum_f \cos((i + 1 - j)\,\omega_f)$, largest at $j = i + 1$: the
# rotation $R(\delta)$ has a sign ($R(-1) \ne R(+1)$), so a learned projection can pick the left or the
# right neighbour, although the plain dot product $PE(a)\cdot PE(b)$ cannot tell them apart. (The
# last query, position 15, has no key at position 16; the key nearest to 16 is its own position,
# and it attends to itself.)

# %% [markdown]
# **4. Reading Table 1.** For $d_{\text{model}} = 1024$: (a) up to which sequence length $N$ is a
# self-attention layer's $N^2 d_{\text{model}}$ no more work than a recurrent layer's
# $N d_{\text{model}}^2$? (b) For a document of $N = 100{,}000$ tokens, how many multiply-adds does
# full self-attention's $N^2 d_{\text{model}}$ cost, how many does restricted self-attention with
# $r = 1024$ cost, and what is the price in path length?

# %% [markdown] nbgrader={"grade": true, "grade_id": "table1-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# (a) $N^2 d \le N d^2 \iff N \le d$: up to $N = 1024$. (b) Full: $N^2 d = 10^{10} \cdot 1024 \approx 1.0 \times 10^{13}$.
# Restricted: $r N d = 1024 \cdot 10^5 \cdot 1024 \approx 1.0 \times 10^{11}$, about 100 times less
# ($N/r \approx 98$). The price: a signal travels only about $r/2 = 512$ positions per layer, so
# connecting the two ends needs about $N/(r/2) \approx 196$ layers instead of one. Models built on
# windows count on depth to carry information further: Mistral 7B (Jiang et al. 2023) attends over
# a causal window of 4096 tokens in each of its 32 layers, so information can travel up to about
# $32 \times 4096 \approx 131{,}000$ positions.
