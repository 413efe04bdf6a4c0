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
# # 02 · Scaled dot-product attention
#
# Stage 01 scored every (decoder state, encoder state) pair with a small neural network (Bahdanau's
# additive score). The Transformer (Vaswani et al. 2017) replaced it with a plain **dot product**:
# a *query* asks a question, every *key* is scored by how well it matches, and the answer is the
# weighted average of the *values*.
#
# $$
# \operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}} + M\right) V,
# \qquad Q \in \mathbb{R}^{L\times d_k},\; K \in \mathbb{R}^{S\times d_k},\; V \in \mathbb{R}^{S\times d_v}
# $$
#
# * row $i$ of $\frac{QK^\top}{\sqrt{d_k}}$ holds the *logits* of query $i$ against the $S$ keys;
# * the softmax turns each row into weights $\ge 0$ that sum to 1;
# * $M$ is a mask: $0$ where query $i$ may look at key $j$, $-\infty$ where it may not
#   (in code: a boolean array, **True = attend**).
#
# This notebook takes `scaled_dot_product_attention` from `attention_ref` apart: a tiny labelled
# example, why the $\sqrt{d_k}$ is there, the masks, and what happens to a query that may attend to nothing.

# %%
import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
    softmax,
)
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. A tiny labelled example: 4 queries × 5 keys
#
# Four features, chosen by hand so that we can read the dot products:
# `animal`, `food`, `motion`, `place`. Each **key** describes a word; each **query** asks for one
# feature ("which word is a pet?"). The **values** are what a key hands over when it is attended to;
# here they are seeded random vectors of size $d_v = 3$.

# %%
features = ["animal", "food", "motion", "place"]
key_words = ["cat", "dog", "pizza", "runs", "park"]
query_words = ["pet?", "meal?", "moving?", "where?"]

K_np = np.array([
    # animal food motion place
    [2.0, 0.0, 0.3, 0.0],   # cat
    [1.8, 0.0, 0.8, 0.0],   # dog
    [0.0, 2.0, 0.0, 0.0],   # pizza
    [0.3, 0.0, 2.0, 0.2],   # runs
    [0.2, 0.0, 0.5, 2.0],   # park
])
Q_np = 3.0 * np.eye(4)      # query i asks for feature i
rng = np.random.default_rng(0)
V_np = rng.normal(size=(5, 3))

Q, K, V = (xp.asarray(a) for a in (Q_np, K_np, V_np))
d_k = Q.shape[-1]
print("Q", Q.shape, " K", K.shape, " V", V.shape)

# %% [markdown]
# The logits are the scaled dot products $q_i \cdot k_j / \sqrt{d_k}$; `return_weights=True` also
# returns the softmax weights.

# %%
logits = to_numpy(Q @ K.T) / np.sqrt(d_k)
out, weights = scaled_dot_product_attention(Q, K, V, return_weights=True)

print("logits QKᵀ/√d (rows = queries, columns = keys):")
print(np.round(logits, 3))
print("\nweights softmax(QKᵀ/√d):")
print(np.round(to_numpy(weights), 3))
print("\nrow sums:", np.round(to_numpy(weights).sum(axis=-1), 6))
print("\noutput = weights @ V  (4 queries × d_v = 3):")
print(np.round(to_numpy(out), 4))

# %%
fig, ax = plt.subplots(figsize=(5.2, 3.4))
plot_attention(weights, query_words, key_words, ax=ax, annotate=True,
               title="softmax(QKᵀ/√d): 4 queries × 5 keys")
save_figure(fig, "../figures/02_tiny_example_weights.png")
plt.show()


# %% [markdown]
# "pet?" splits its attention between *cat* and *dog*, "meal?" goes almost entirely to *pizza*,
# and each output row is the correspondingly weighted mix of the rows of $V$.
#
# ### Check against the formula
#
# The whole stage is one line of NumPy: `softmax(Q Kᵀ / √d) V`. The library must agree with it,
# on this example and on a batched, multi-head random one (shapes `(..., H, L, E)`).

# %%
def numpy_attention(Q, K, V):
    return (e := np.exp(Q @ np.swapaxes(K, -1, -2) / np.sqrt(Q.shape[-1]))) / e.sum(-1, keepdims=True) @ V

diff = np.max(np.abs(to_numpy(out) - numpy_attention(Q_np, K_np, V_np)))
print("tiny example, max abs difference < 1e-12:", bool(diff < 1e-12))

# batch 2, 3 heads, L = 7 queries, S = 9 keys, E = 16, Ev = 5
q_np, k_np, v_np = rng.normal(size=(2, 3, 7, 16)), rng.normal(size=(2, 3, 9, 16)), rng.normal(size=(2, 3, 9, 5))
out_b = scaled_dot_product_attention(xp.asarray(q_np), xp.asarray(k_np), xp.asarray(v_np))
diff = np.max(np.abs(to_numpy(out_b) - numpy_attention(q_np, k_np, v_np)))
print("output shape", tuple(out_b.shape), "| max abs difference < 1e-12:", bool(diff < 1e-12))

# %% [markdown]
# ## 2. Why divide by $\sqrt{d_k}$?
#
# If the entries of $q$ and $k$ are independent with mean 0 and variance 1, then
# $q\cdot k = \sum_{m=1}^{d_k} q_m k_m$ is a sum of $d_k$ terms of variance 1, so
# $\operatorname{Var}(q\cdot k) = d_k$. Dividing by $\sqrt{d_k}$ brings the variance back to 1,
# whatever the head size (Vaswani et al. 2017, footnote 4).
#
# Without it, logits of size $\sim\sqrt{d_k}$ push the softmax into **saturation**: one key takes
# almost all the weight, and the gradient through the softmax almost vanishes. Below: 2000 random
# (q, k) pairs per $d_k$ for the variance, and for the saturation 200 queries against $S = 32$ keys,
# recording the largest weight in each row.

# %%
rng = np.random.default_rng(0)
dims = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
S = 32
var_raw, var_scaled, max_raw, max_scaled = [], [], [], []
for d in dims:
    q, k = rng.normal(size=(2000, d)), rng.normal(size=(2000, d))
    dots = np.sum(q * k, axis=-1)
    var_raw.append(dots.var())
    var_scaled.append((dots / np.sqrt(d)).var())
    qs, ks = rng.normal(size=(200, d)), rng.normal(size=(S, d))
    lg = qs @ ks.T
    max_raw.append(to_numpy(softmax(xp.asarray(lg))).max(axis=-1).mean())
    max_scaled.append(to_numpy(softmax(xp.asarray(lg / np.sqrt(d)))).max(axis=-1).mean())

print(" d_k   Var(q·k)/d_k   Var(q·k/√d_k)   mean max weight: unscaled  scaled")
for row in zip(dims, var_raw, var_scaled, max_raw, max_scaled, strict=True):
    d, vr, vs, mr, ms = row
    print(f"{d:5d}   {vr / d:10.1f}   {vs:13.1f}   {mr:22.2f}  {ms:7.2f}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
ax1.loglog(dims, var_raw, "o-", label="unscaled  q·k")
ax1.loglog(dims, var_scaled, "s-", label="scaled  q·k / √d")
ax1.loglog(dims, dims, "k:", lw=1, label="d (theory)")
ax1.set_xlabel("head size d")
ax1.set_ylabel("variance of the logit")
ax1.set_title("logit variance grows like d")
ax1.legend()
ax2.semilogx(dims, max_raw, "o-", label="unscaled")
ax2.semilogx(dims, max_scaled, "s-", label="scaled by 1/√d")
ax2.axhline(1 / S, color="k", ls=":", lw=1, label=f"uniform 1/S (S={S})")
ax2.set_ylim(0, 1.05)
ax2.set_xlabel("head size d")
ax2.set_ylabel("mean of the largest weight per row")
ax2.set_title("softmax saturation")
ax2.legend()
fig.tight_layout()
save_figure(fig, "../figures/02_why_sqrt_d.png")
plt.show()

# %% [markdown]
# Unscaled, the largest weight climbs towards 1 (a one-hot softmax) as $d$ grows; scaled, the
# typical sharpness is the same for every head size, and the model, not the dimension, decides how
# peaked attention is.
#
# ## 3. Masks
#
# A mask says which keys each query may see. `attention_ref.masks` builds boolean arrays,
# **True = attend**:
#
# * `padding_mask(lengths, S)`: batch element $b$ has only `lengths[b]` real keys; the rest is padding.
#   Shape `(B, 1, 1, S)`, so it broadcasts over heads and queries.
# * `causal_mask(L, S, alignment)`: no peeking at the future. With $L \ne S$ the alignment matters:
#   **top-left** (PyTorch's `is_causal`) lets query $i$ see keys $j \le i$; **bottom-right**
#   (flash-attn, decoding with a KV cache) lines the last query up with the last key: $j \le i + S - L$.
# * `sliding_window_mask(L, S, left, right)`: query at position $p$ sees keys
#   $p - \text{left} \le j \le p + \text{right}$ (Longformer, Mistral).

# %%
L, S = 4, 7
masks = {
    "padding, lengths=[7, 4]\n(batch element 1)": np.broadcast_to(
        to_numpy(padding_mask(np.array([7, 4]), S, xp=xp))[1, 0], (L, S)),
    "causal top-left\n(L=4, S=7)": to_numpy(causal_mask(L, S, "top_left", xp=xp)),
    "causal bottom-right\n(L=4, S=7)": to_numpy(causal_mask(L, S, "bottom_right", xp=xp)),
    "sliding window left=2, right=0\n(L=S=7)": to_numpy(sliding_window_mask(7, 7, 2, 0, xp=xp)),
    "sliding window left=1, right=1\n(L=S=7)": to_numpy(sliding_window_mask(7, 7, 1, 1, xp=xp)),
    "window left=1, right=0,\nbottom-right (L=4, S=7)": to_numpy(
        sliding_window_mask(L, S, 1, 0, "bottom_right", xp=xp)),
}
for name, m in masks.items():
    print(name.replace("\n", " "), "\n", m.astype(int), "\n")

# %%
fig, axes = plt.subplots(2, 3, figsize=(10, 5.4))
for ax, (name, m) in zip(axes.flat, masks.items(), strict=True):
    ax.imshow(m, cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(name, fontsize=9)
fig.suptitle("boolean masks (white = attend, black = masked)")
fig.tight_layout()
save_figure(fig, "../figures/02_masks.png")
plt.show()

# %% [markdown]
# ### Attention weights under a mask
#
# A masked key gets logit $-\infty$, hence weight exactly 0; the remaining weights of the row are
# renormalised to sum to 1. Four queries attend to seven keys under the top-left causal, bottom-right
# causal and padding masks:

# %%
rng = np.random.default_rng(1)
q = xp.asarray(rng.normal(size=(4, 8)))
k = xp.asarray(rng.normal(size=(7, 8)))
v = xp.asarray(rng.normal(size=(7, 3)))
chosen = ["causal top-left\n(L=4, S=7)", "causal bottom-right\n(L=4, S=7)",
          "padding, lengths=[7, 4]\n(batch element 1)"]

fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for ax, name in zip(axes, chosen, strict=True):
    m = masks[name]
    _, w = scaled_dot_product_attention(q, k, v, attn_mask=xp.asarray(m), return_weights=True)
    w = to_numpy(w)
    plot_attention(w, [f"q{i}" for i in range(4)], [f"k{j}" for j in range(7)], ax=ax,
                   annotate=True, title=name.replace("\n", " "))
    print(f"{name.replace(chr(10), ' '):42s} rows sum to 1: {bool(np.allclose(w.sum(-1), 1.0))}"
          f" | masked weights exactly 0: {bool(np.all(w[~m] == 0.0))}")
fig.tight_layout()
save_figure(fig, "../figures/02_masked_weights.png")
plt.show()

# %% [markdown]
# `is_causal=True` is the top-left causal mask, and a floating mask is *added* to the logits:
# $0$ / $-\infty$ does the same job as True / False.

# %%
m = causal_mask(4, 7, xp=xp)
out_bool = scaled_dot_product_attention(q, k, v, attn_mask=m)
out_causal = scaled_dot_product_attention(q, k, v, is_causal=True)
additive = xp.where(m, xp.asarray(0.0), xp.asarray(-xp.inf))
out_float = scaled_dot_product_attention(q, k, v, attn_mask=additive)
print("is_causal == top-left bool mask:", bool(np.max(np.abs(to_numpy(out_causal - out_bool))) < 1e-12))
print("float 0/-inf mask == bool mask: ", bool(np.max(np.abs(to_numpy(out_float - out_bool))) < 1e-12))

# %% [markdown]
# ## 4. A query that may attend to nothing
#
# Bottom-right alignment with **more queries than keys** ($L = 6$, $S = 4$): query $i$ sees keys
# $j \le i + S - L = i - 2$, so queries 0 and 1 see no key at all. Their row of logits is all
# $-\infty$ and the bare formula gives $0/0 = $ NaN. PyTorch returns **zeros** for such rows (since
# 2.5); that is our default, and `fully_masked="nan"` gives what the formula says.

# %%
rng = np.random.default_rng(2)
q6, k4, v4 = (xp.asarray(rng.normal(size=s)) for s in [(6, 8), (4, 8), (4, 3)])
m = causal_mask(6, 4, "bottom_right", xp=xp)
print("mask (L=6, S=4, bottom-right):\n", to_numpy(m).astype(int))

out0, w0 = scaled_dot_product_attention(q6, k4, v4, attn_mask=m, return_weights=True)
print("\nfully_masked='zero' (default): output")
print(np.round(to_numpy(out0), 4))
print("weights\n", np.round(to_numpy(w0), 3))

out_nan = scaled_dot_product_attention(q6, k4, v4, attn_mask=m, fully_masked="nan")
print("\nfully_masked='nan': output")
print(np.round(to_numpy(out_nan), 4))
print("rows 2-5 identical in both modes:", bool(np.array_equal(to_numpy(out0)[2:], to_numpy(out_nan)[2:])))

# %% [markdown]
# ## What we learned / next stage
#
# * Scaled dot-product attention is `softmax(Q Kᵀ / √d) V`: one matrix product for the scores, a
#   row-wise softmax, one matrix product for the mix; `attention_ref` matches the one-line NumPy
#   formula to $10^{-12}$.
# * The $1/\sqrt{d}$ keeps the logit variance at 1 for every head size, so the softmax does not saturate.
# * Masks are boolean, **True = attend**; masked keys get weight exactly 0, the other weights still
#   sum to 1. For $L \ne S$ decide between top-left and bottom-right causal alignment. A query with
#   nothing to attend to returns zeros (or NaN with `fully_masked="nan"`).
#
# `scaled_dot_product_attention` materialises the full $L \times S$ weight matrix, which is exactly
# why it is the float64 **reference** every later stage is checked against.
#
# **Next — 03 self-attention:** where do $Q$, $K$ and $V$ come from? From the same sequence, through
# learned projections, with positional encodings telling the model where each token sits.
