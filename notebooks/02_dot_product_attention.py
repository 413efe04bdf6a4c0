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
# Before the queries, keys and values, this notebook starts from an older idea that already has
# all three: **kernel regression** (Nadaraya 1964, Watson 1964), the way the d2l book introduces
# attention. Then it takes `scaled_dot_product_attention` from `attention_ref` apart: a tiny
# labelled example, why the scale $1/\sqrt{E}$ is there, the masks, a query that may attend to
# nothing, and attention dropout.

# %% [markdown]
# ## Notation
#
# The course's notation (README, "Notation"), the part this notebook uses:
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $L$, $S$ | number of queries, number of keys and values | `L`, `S` |
# | $E$, $E_v$ | query/key feature size, value feature size | `E`, `Ev` |
# | $Q, K, V, O$ | queries ($L \times E$), keys ($S \times E$), values ($S \times E_v$), output ($L \times E_v$); rows $q_i$, $k_j$, $v_j$ | `q`, `k`, `v`, `out` |
# | $\tau$ | the scale, $1/\sqrt{E}$ unless given | `scale` |
# | $Z$ | logits $Z = \tau Q K^\top + \Delta$ ($L \times S$), entries $z_{ij}$ | `logits` |
# | $A$ | boolean mask, $A_{ij}$ = True where query $i$ may attend key $j$ | `attn_mask` (bool) |
# | $\Delta$ | additive float mask ($0$ or $-\infty$) | `attn_mask` (float) |
# | $P$ | attention weights, $P = \operatorname{softmax}(Z)$ row by row, entries $p_{ij}$ | `weights` |
#
# Query $i$ is always the row index and key $j$ the column index. Two letters are local to this
# notebook: in the kernel regression of section 1 the data are pairs $(x_j, y_j)$, and in
# section 6 the dropout rate is $\rho$ (`dropout_p` in code).

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

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


# %%
def label_colorbar(ax, text):
    """Name the quantity that the colour of ``ax``'s heatmap shows."""
    ax.images[0].colorbar.set_label(text)


# %% [markdown]
# ## 1. Attention before Transformers: kernel regression
#
# We have $S$ training pairs $(x_j, y_j)$ and want to predict $y$ at a new point $q$. The
# Nadaraya–Watson estimator averages the training targets, each weighted by how close its $x_j$
# is to $q$:
#
# $$
# \hat f(q) = \sum_{j=1}^{S} p_j(q)\, y_j, \qquad
# p_j(q) = \frac{\kappa(q - x_j)}{\sum_{l=1}^{S} \kappa(q - x_l)} .
# $$
#
# With the Gaussian kernel $\kappa(u) = e^{-u^2/2}$ the weights are a **softmax**:
#
# $$
# p_j(q) = \frac{e^{-(q - x_j)^2/2}}{\sum_l e^{-(q - x_l)^2/2}} = \operatorname{softmax}_j\!\left(z_j\right),
# \qquad z_j = -\tfrac{1}{2}(q - x_j)^2 .
# $$
#
# This is attention: the **query** is $q$, the **keys** are the $x_j$, the **values** the $y_j$,
# the logits $z_j$ say how well a key matches the query, and the output is the weighted average of
# the values. The data follow d2l's example, $y = 2\sin x + x^{0.8} + \varepsilon$ with
# $\varepsilon \sim \mathcal N(0, 0.5^2)$, at $S = 50$ random points; we predict at $L = 50$
# evenly spaced queries.

# %%
rng = np.random.default_rng(0)
S_train, L_test = 50, 50


def true_f(x):
    return 2 * np.sin(x) + x**0.8


x_train = np.sort(rng.uniform(0, 5, S_train))                  # keys x_j
y_train = true_f(x_train) + rng.normal(0, 0.5, S_train)        # values y_j
q_test = np.linspace(0, 5, L_test)                             # queries q_i

Z_kr = -0.5 * (q_test[:, None] - x_train[None, :]) ** 2        # z_ij = -(q_i - x_j)² / 2: (L, S)
P_kr = to_numpy(softmax(xp.asarray(Z_kr)))                    # p_ij, each row sums to 1
y_hat = P_kr @ y_train                                         # f̂(q_i) = Σ_j p_ij y_j
print("weights:", P_kr.shape, "| rows sum to 1:", bool(np.allclose(P_kr.sum(axis=1), 1)))
print(f"mean squared error against the true function: kernel regression {np.mean((y_hat - true_f(q_test)) ** 2):.3f}, "
      f"plain average of the y_j {np.mean((y_train.mean() - true_f(q_test)) ** 2):.3f}")

# %% [markdown]
# **It is dot-product attention.** Expand the square: $-\tfrac12 (q - x_j)^2 = q\,x_j - \tfrac12 x_j^2 - \tfrac12 q^2$.
# The last term is the same for every key, and a softmax does not change when the same number is
# added to a whole row. So the logits may as well be $q\,x_j - \tfrac12 x_j^2$: the dot product of
# the query vector $(q, 1)$ with the key vector $(x_j, -\tfrac12 x_j^2)$. The library's
# `scaled_dot_product_attention` with these 2-dimensional queries and keys and $\tau = 1$ gives the
# same predictions:

# %%
Q_kr = np.stack([q_test, np.ones(L_test)], axis=1)               # (L, 2): (q, 1)
K_kr = np.stack([x_train, -0.5 * x_train**2], axis=1)           # (S, 2): (x_j, -x_j²/2)
V_kr = y_train[:, None]                                          # (S, 1)
out_kr = to_numpy(scaled_dot_product_attention(*(xp.asarray(a) for a in (Q_kr, K_kr, V_kr)), scale=1.0))
print("same predictions as the kernel regression, max abs difference < 1e-12:",
      bool(np.max(np.abs(out_kr[:, 0] - y_hat)) < 1e-12))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.15, 1]})
ax1.plot(q_test, true_f(q_test), "k-", lw=1.5, label="true function")
ax1.plot(x_train, y_train, "o", color="tab:orange", ms=4, label="training pairs $(x_j, y_j)$")
ax1.plot(q_test, y_hat, "-", color="tab:blue", lw=2, label=r"kernel regression $\hat f(q)$")
ax1.axhline(y_train.mean(), color="tab:gray", ls="--", lw=1, label="plain average of the $y_j$")
ax1.set_xlabel("input $x$ (queries $q$ and keys $x_j$)")
ax1.set_ylabel("output $y$")
ax1.set_title("predictions")
ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
image = ax2.imshow(P_kr, cmap="viridis", aspect="auto", interpolation="nearest",
                   extent=(-0.5, S_train - 0.5, q_test[-1], q_test[0]))
ax2.set_xlabel("key $j$ (training points, sorted by $x_j$)")
ax2.set_ylabel("query $q$")
ax2.set_title("weights $p_{ij}$: a band along the diagonal")
fig.colorbar(image, ax=ax2, fraction=0.046, pad=0.04, label="$p_{ij}$")
fig.suptitle("Kernel regression is attention: each prediction averages the targets of the nearby training points")
fig.tight_layout()
save_figure(fig, "../figures/02_kernel_regression.png")
plt.show()

# %% [markdown]
# Each query puts its weight on the training points near it, so the prediction follows the
# data; the plain average (every logit equal) ignores the query and is a flat line. Here the
# kernel is fixed. In a Transformer the queries and keys are *learned* projections of the tokens,
# so the model learns its own notion of "near" — and, since $q\,x_j$ is a dot product, it scores
# with the dot product of the next section.

# %% [markdown]
# ## 2. Scaled dot-product attention
#
# $$
# O = \operatorname{softmax}\!\left(Z\right) V, \qquad Z = \tau\, Q K^\top + \Delta, \quad \tau = \frac{1}{\sqrt{E}},
# \qquad Q \in \mathbb{R}^{L\times E},\; K \in \mathbb{R}^{S\times E},\; V \in \mathbb{R}^{S\times E_v}
# $$
#
# * row $i$ of $\tau Q K^\top$ holds the *logits* of query $i$ against the $S$ keys;
# * the softmax turns each row into weights $p_{ij} \ge 0$ that sum to 1;
# * $\Delta$ is a mask: $0$ where query $i$ may look at key $j$, $-\infty$ where it may not. In
#   code it is usually given as the boolean $A$ (**True = attend**).
#
# ### A tiny labelled example: 4 queries × 5 keys
#
# Four features, chosen by hand so that we can read the dot products:
# `animal`, `food`, `motion`, `place`. Each **key** describes a word; each **query** asks for one
# feature ("which word is a pet?"). The **values** are what a key hands over when it is attended to;
# here they are seeded random vectors of size $E_v = 3$.

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
E = Q.shape[-1]
print("Q", Q.shape, " K", K.shape, " V", V.shape, " E =", E)

# %% [markdown]
# The logits are the scaled dot products $z_{ij} = q_i \cdot k_j / \sqrt{E}$; `return_weights=True`
# also returns the weights $P$.

# %%
logits = to_numpy(Q @ K.T) / np.sqrt(E)
out, weights = scaled_dot_product_attention(Q, K, V, return_weights=True)

print("logits Z = QKᵀ/√E (rows = queries, columns = keys):")
print(np.round(logits, 3))
print("\nweights P = softmax(Z):")
print(np.round(to_numpy(weights), 3))
print("\nrow sums:", np.round(to_numpy(weights).sum(axis=-1), 6))
print("\noutput O = P V  (L = 4 queries × Ev = 3):")
print(np.round(to_numpy(out), 4))

# %%
fig, ax = plt.subplots(figsize=(5.6, 3.6))
plot_attention(weights, query_words, key_words, ax=ax, annotate=True,
               title="Each query puts its weight on the keys\nthat have its feature: P = softmax(QKᵀ/√E)")
ax.set_xlabel("key $j$")
ax.set_ylabel("query $i$")
label_colorbar(ax, "$p_{ij}$")
save_figure(fig, "../figures/02_tiny_example_weights.png")
plt.show()


# %% [markdown]
# "pet?" splits its attention between *cat* and *dog*, "meal?" goes almost entirely to *pizza*,
# and each output row is the correspondingly weighted mix of the rows of $V$.
#
# ### Check against the formula, written in NumPy
#
# The whole stage fits in three lines of NumPy. Subtracting each row's maximum $\max_j z_{ij}$
# before the exponential changes nothing mathematically ($e^{z - m} / \sum e^{z - m} = e^{z} / \sum e^{z}$)
# but keeps $e^{z}$ from overflowing: in float32 $e^{z}$ is infinite for $z > 88.7$.

# %%
def numpy_attention(Q, K, V):
    Z = Q @ np.swapaxes(K, -1, -2) / np.sqrt(Q.shape[-1])       # Z = τ Q Kᵀ
    e = np.exp(Z - Z.max(axis=-1, keepdims=True))                # subtract each row's max m
    return e / e.sum(axis=-1, keepdims=True) @ V                 # O = P V


diff = np.max(np.abs(to_numpy(out) - numpy_attention(Q_np, K_np, V_np)))
print("tiny example, max abs difference < 1e-12:", bool(diff < 1e-12))

# batch 2, 3 heads, L = 7 queries, S = 9 keys, E = 16, Ev = 5
q_np, k_np, v_np = rng.normal(size=(2, 3, 7, 16)), rng.normal(size=(2, 3, 9, 16)), rng.normal(size=(2, 3, 9, 5))
out_b = scaled_dot_product_attention(xp.asarray(q_np), xp.asarray(k_np), xp.asarray(v_np))
diff = np.max(np.abs(to_numpy(out_b) - numpy_attention(q_np, k_np, v_np)))
print("output shape", tuple(out_b.shape), "| max abs difference < 1e-12:", bool(diff < 1e-12))

# %% [markdown]
# Without the maximum, large logits give $\infty / \infty$ = NaN. The tiny example's queries
# multiplied by 100, in float32:

# %%
big = [a.astype(np.float32) for a in (100 * Q_np, K_np, V_np)]
Z_big = big[0] @ big[1].T / np.float32(2.0)
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(Z_big) / np.exp(Z_big).sum(axis=-1, keepdims=True) @ big[2]
print("largest logit:", Z_big.max())
print("without the max: NaN in the output:", bool(np.isnan(naive).any()))
print("with the max:    finite output:    ", bool(np.isfinite(numpy_attention(*big)).all()))

# %% [markdown]
# ## 3. Why divide by $\sqrt{E}$?
#
# If the entries of $q$ and $k$ are independent with mean 0 and variance 1, then
# $q\cdot k = \sum_{e=1}^{E} q_e k_e$ is a sum of $E$ terms of variance 1, so
# $\operatorname{Var}(q\cdot k) = E$. Dividing by $\sqrt{E}$ brings the variance back to 1,
# whatever the head size (Vaswani et al. 2017, footnote 4).
#
# Without it, logits of size $\sim\sqrt{E}$ push the softmax into **saturation**: one key takes
# almost all the weight, and the gradient through the softmax almost vanishes. Below: 2000 random
# $(q, k)$ pairs per $E$ for the variance, and for the saturation 200 queries against $S = 32$ keys,
# recording the largest weight in each row.

# %%
rng = np.random.default_rng(0)
head_sizes = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
S = 32
var_raw, var_scaled, max_raw, max_scaled = [], [], [], []
for size in head_sizes:
    q, k = rng.normal(size=(2000, size)), rng.normal(size=(2000, size))
    dots = np.sum(q * k, axis=-1)
    var_raw.append(dots.var())
    var_scaled.append((dots / np.sqrt(size)).var())
    qs, ks = rng.normal(size=(200, size)), rng.normal(size=(S, size))
    lg = qs @ ks.T
    max_raw.append(to_numpy(softmax(xp.asarray(lg))).max(axis=-1).mean())
    max_scaled.append(to_numpy(softmax(xp.asarray(lg / np.sqrt(size)))).max(axis=-1).mean())

print("    E   Var(q·k)/E   Var(q·k/√E)   mean largest weight: unscaled  scaled")
for row in zip(head_sizes, var_raw, var_scaled, max_raw, max_scaled, strict=True):
    size, vr, vs, mr, ms = row
    print(f"{size:5d}   {vr / size:10.1f}   {vs:11.1f}   {mr:28.2f}  {ms:7.2f}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.9))
ax1.loglog(head_sizes, var_raw, "o-", label="unscaled  $q\\cdot k$")
ax1.loglog(head_sizes, var_scaled, "s-", label="scaled  $q\\cdot k / \\sqrt{E}$")
ax1.loglog(head_sizes, head_sizes, "k:", lw=1, label="$E$ (theory)")
ax1.set_xlabel("head size $E$")
ax1.set_ylabel("variance of the logit")
ax1.set_title("unscaled logit variance grows like E")
ax1.legend()
ax2.semilogx(head_sizes, max_raw, "o-", label="unscaled")
ax2.semilogx(head_sizes, max_scaled, "s-", label="scaled by $1/\\sqrt{E}$")
ax2.axhline(1 / S, color="k", ls=":", lw=1, label=f"uniform $1/S$ ($S$ = {S})")
ax2.set_ylim(0, 1.05)
ax2.set_xlabel("head size $E$")
ax2.set_ylabel("mean of the largest weight per row")
ax2.set_title("unscaled, the softmax saturates")
ax2.legend(loc="center right")
fig.suptitle("Dividing by √E keeps the logits' variance at 1 and the softmax unsaturated for every head size")
fig.tight_layout()
save_figure(fig, "../figures/02_why_sqrt_d.png")
plt.show()

# %% [markdown]
# Unscaled, the largest weight climbs towards 1 (a one-hot softmax) as $E$ grows; scaled, the
# typical sharpness is the same for every head size, and the model, not the dimension, decides how
# peaked attention is.
#
# ## 4. Masks
#
# A mask says which keys each query may see. `attention_ref.masks` builds boolean arrays $A$,
# **True = attend**:
#
# * `padding_mask(lengths, S)`: batch element $b$ has only `lengths[b]` real keys; the rest is padding.
#   Shape `(B, 1, 1, S)`, so it broadcasts over heads and queries.
# * `causal_mask(L, S, alignment)`: no peeking at the future. With $L \ne S$ the alignment matters:
#   **top-left** (PyTorch's `is_causal`) lets query $i$ see keys $j \le i$; **bottom-right**
#   (flash-attn, decoding with a KV cache) lines the last query up with the last key: $j \le i + S - L$.
# * `sliding_window_mask(L, S, left, right)`: the query at position $i$ sees keys
#   $i - \text{left} \le j \le i + \text{right}$ (Longformer, Mistral).

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
fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.8), layout="constrained")
for ax, (name, m) in zip(axes.flat, masks.items(), strict=True):
    ax.imshow(m, cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_xlabel("key $j$")
    ax.set_ylabel("query $i$")
    ax.set_title(name, fontsize=9)
fig.legend(handles=[Patch(facecolor="white", edgecolor="black", label="True: attend"),
                    Patch(facecolor="black", edgecolor="black", label="False: masked")],
           loc="outside lower center", ncol=2)
fig.suptitle("Boolean masks A: which keys each query may see")
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

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, name in zip(axes, chosen, strict=True):
    m = masks[name]
    _, w = scaled_dot_product_attention(q, k, v, attn_mask=xp.asarray(m), return_weights=True)
    w = to_numpy(w)
    plot_attention(w, [f"q{i}" for i in range(4)], [f"k{j}" for j in range(7)], ax=ax,
                   annotate=True, vmax=1, title=name.replace("\n", " "))
    ax.set_xlabel("key $j$")
    ax.set_ylabel("query $i$")
    label_colorbar(ax, "$p_{ij}$")
    print(f"{name.replace(chr(10), ' '):42s} rows sum to 1: {bool(np.allclose(w.sum(-1), 1.0))}"
          f" | masked weights exactly 0: {bool(np.all(w[~m] == 0.0))}")
fig.suptitle("Masked keys get weight exactly 0; each row's other weights still sum to 1")
fig.tight_layout()
save_figure(fig, "../figures/02_masked_weights.png")
plt.show()

# %% [markdown]
# `is_causal=True` is the top-left causal mask, and a floating mask $\Delta$ is *added* to the
# logits: $0$ / $-\infty$ does the same job as True / False.

# %%
m = causal_mask(4, 7, xp=xp)
out_bool = scaled_dot_product_attention(q, k, v, attn_mask=m)
out_causal = scaled_dot_product_attention(q, k, v, is_causal=True)
additive = xp.where(m, xp.asarray(0.0), xp.asarray(-xp.inf))
out_float = scaled_dot_product_attention(q, k, v, attn_mask=additive)
print("is_causal == top-left bool mask A:", bool(np.max(np.abs(to_numpy(out_causal - out_bool))) < 1e-12))
print("float 0/-inf mask Δ == bool mask A:", bool(np.max(np.abs(to_numpy(out_float - out_bool))) < 1e-12))

# %% [markdown]
# ## 5. A query that may attend to nothing
#
# Bottom-right alignment with **more queries than keys** ($L = 6$, $S = 4$): query $i$ sees keys
# $j \le i + S - L = i - 2$, so queries 0 and 1 see no key at all. Their row of logits is all
# $-\infty$ and the bare formula gives $0/0 = $ NaN. PyTorch returns **zeros** for such rows (since
# 2.5); that is our default, and `fully_masked="nan"` gives what the formula says.

# %%
rng = np.random.default_rng(2)
q6, k4, v4 = (xp.asarray(rng.normal(size=s)) for s in [(6, 8), (4, 8), (4, 3)])
m = causal_mask(6, 4, "bottom_right", xp=xp)
print("mask A (L=6, S=4, bottom-right):\n", to_numpy(m).astype(int))

out0, w0 = scaled_dot_product_attention(q6, k4, v4, attn_mask=m, return_weights=True)
print("\nfully_masked='zero' (default): output")
print(np.round(to_numpy(out0), 4))
print("weights\n", np.round(to_numpy(w0), 3))

out_nan = scaled_dot_product_attention(q6, k4, v4, attn_mask=m, fully_masked="nan")
print("\nfully_masked='nan': output")
print(np.round(to_numpy(out_nan), 4))
print("rows 2-5 identical in both modes:", bool(np.array_equal(to_numpy(out0)[2:], to_numpy(out_nan)[2:])))

# %% [markdown]
# ## 6. Attention dropout
#
# While a model trains, dropout is often applied to the attention weights themselves: BERT does it
# with probability 0.1 (`attention_probs_dropout_prob`), and PyTorch's
# `scaled_dot_product_attention` has the argument `dropout_p`, which `attention_ref` copies. Each
# weight is kept with probability $1 - \rho$ and set to 0 otherwise, and the kept weights are
# divided by $1 - \rho$:
#
# $$
# \tilde p_{ij} = \frac{\xi_{ij}\, p_{ij}}{1 - \rho}, \qquad \xi_{ij} = \begin{cases} 1 & \text{with probability } 1 - \rho\\ 0 & \text{with probability } \rho \end{cases},
# \qquad O = \tilde P V .
# $$
#
# A row of $\tilde P$ no longer sums to exactly 1, but **on average nothing changes**:
# $\mathbb E[\tilde p_{ij}] = p_{ij}\,(1 - \rho)/(1 - \rho) = p_{ij}$, hence $\mathbb E[O] = P V$.
# That is why the survivors are rescaled: the layers after attention see outputs of the same size
# in training as at evaluation, when dropout is off ($\rho = 0$) and no correction is needed. A query
# cannot rely on a single key, since that key is sometimes dropped. The random draws come from the
# NumPy generator passed as `rng`. The tiny example with $\rho = 0.3$:

# %%
rho = 0.3
out_drop, w_drop = scaled_dot_product_attention(Q, K, V, dropout_p=rho, rng=np.random.default_rng(0),
                                                 return_weights=True)
P, P_drop = to_numpy(weights), to_numpy(w_drop)
kept = P_drop != 0
print("weights after dropout:\n", np.round(P_drop, 3))
print("kept weights equal p_ij / (1 − ρ):", bool(np.allclose(P_drop[kept], P[kept] / (1 - rho))))
print("row sums:", np.round(P_drop.sum(axis=-1), 3))
print("output is P̃ V:", bool(np.allclose(to_numpy(out_drop), P_drop @ V_np)))

# %% [markdown]
# **Check: the expectation is unchanged.** Average $\tilde P$ and $O$ over 4000 independent draws
# (a batch of 4000 copies of the example, one draw each). The standard error of the mean of
# $\tilde p_{ij}$ is $p_{ij}\sqrt{\rho/(1-\rho)}/\sqrt{4000}$, at most 0.011 here:

# %%
draws = 4000
batch = [np.broadcast_to(a, (draws, *a.shape)) for a in (Q_np, K_np, V_np)]
out_many, w_many = scaled_dot_product_attention(*(xp.asarray(a) for a in batch), dropout_p=rho,
                                                 rng=np.random.default_rng(1), return_weights=True)
mean_P, mean_O = to_numpy(w_many).mean(axis=0), to_numpy(out_many).mean(axis=0)
std_error = P * np.sqrt(rho / (1 - rho)) / np.sqrt(draws)
print("largest |mean of P̃ − P|:", np.round(np.max(np.abs(mean_P - P)), 4),
      "| within 4 standard errors everywhere:", bool(np.all(np.abs(mean_P - P) <= 4 * std_error + 1e-12)))
print("largest |mean of O − P V|:", np.round(np.max(np.abs(mean_O - to_numpy(out))), 4))

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
vmax = float(P_drop.max())
panels = [(P, "P, no dropout"), (P_drop, f"one draw of P̃ (ρ = {rho})"), (mean_P, f"mean of {draws} draws of P̃")]
for ax, (w, title) in zip(axes, panels, strict=True):
    plot_attention(w, query_words, key_words, ax=ax, annotate=True, vmax=vmax, title=title)
    ax.set_xlabel("key $j$")
    ax.set_ylabel("query $i$")
    label_colorbar(ax, "weight")
fig.suptitle("Dropout zeroes weights and scales the survivors by 1/(1 − ρ): one draw is noisy, the average is P")
fig.tight_layout()
save_figure(fig, "../figures/02_dropout.png")
plt.show()

# %% [markdown]
# ## What we learned / next stage
#
# * Attention is an old idea: kernel regression already averages values with softmax weights of how
#   well a query matches each key. With the Gaussian kernel it *is* dot-product attention.
# * Scaled dot-product attention is $\operatorname{softmax}(\tau Q K^\top + \Delta) V$: one matrix
#   product for the logits, a row-wise softmax (subtract the row maximum first), one matrix product
#   for the mix; `attention_ref` matches the NumPy formula to $10^{-12}$.
# * $\tau = 1/\sqrt{E}$ keeps the logit variance at 1 for every head size, so the softmax does not
#   saturate.
# * Masks are boolean, **True = attend**; masked keys get weight exactly 0, the other weights still
#   sum to 1. For $L \ne S$ decide between top-left and bottom-right causal alignment. A query with
#   nothing to attend to returns zeros (or NaN with `fully_masked="nan"`).
# * Attention dropout zeroes weights at random in training and rescales the rest by $1/(1-\rho)$, so
#   the expected output is unchanged.
#
# `scaled_dot_product_attention` materialises the full $L \times S$ weight matrix, which is exactly
# why it is the float64 **reference** every later stage is checked against.
#
# **Next — 03 self-attention:** where do $Q$, $K$ and $V$ come from? From the same sequence, through
# learned projections, with positional encodings telling the model where each token sits.

# %% [markdown]
# ## Exercises
#
# The checker (`attention_ref.check`) runs your function against a float64 reference on cases from
# easy to hard and diagnoses the classic mistakes.

# %%
import attention_ref as ar
from attention_ref.check import check

# %% [markdown]
# **1. Softmax.** Write `softmax(x, axis=-1)` in NumPy: the softmax of `x` along `axis`. It must not
# overflow for large logits (subtract the maximum), must give weight 0 to entries equal to $-\infty$,
# and must keep float32 inputs float32.

# %% nbgrader={"grade": false, "grade_id": "softmax-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def softmax(x, axis=-1):
    ### BEGIN SOLUTION
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)  # a row of all −∞: shift by 0, not by −∞
    e = np.exp(x - m)
    total = e.sum(axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "softmax-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check(softmax, "softmax", raise_on_failure=True)

# %% [markdown]
# **2. Scaled dot-product attention.** Complete
# `scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None)`
# with your `softmax`. Shapes `(..., L, E)`, `(..., S, E)`, `(..., S, Ev)`; $\tau = 1/\sqrt{E}$
# unless `scale` is given; a boolean `attn_mask` is True where a query may attend (masked logits
# become $-\infty$), a float one is added to the logits; `is_causal=True` is the top-left causal mask.

# %% nbgrader={"grade": false, "grade_id": "sdpa-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None):
    ### BEGIN SOLUTION
    ### STUB tau = ...     # 1/√E unless scale is given
    ### STUB logits = ...  # Z = τ Q Kᵀ, then the masks
    ### STUB return softmax(logits) @ value
    E = query.shape[-1]
    tau = E ** -0.5 if scale is None else scale  # a Python float keeps float32 float32
    logits = tau * (query @ np.swapaxes(key, -1, -2))
    L, S = logits.shape[-2:]
    if is_causal:
        logits = np.where(np.tril(np.ones((L, S), bool)), logits, -np.inf)
    if attn_mask is not None and attn_mask.dtype == bool:
        logits = np.where(attn_mask, logits, -np.inf)
    elif attn_mask is not None:
        logits = logits + attn_mask
    return softmax(logits) @ value
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "sdpa-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(scaled_dot_product_attention, "scaled_dot_product_attention", raise_on_failure=True)

# %% [markdown]
# **3. Break the scaling.** *Predict* the largest weight of a query against $S = 16$ random keys
# when $E = 256$, once with $\tau = 1/\sqrt{E}$ and once with $\tau = 1$ (no scaling). Run the
# cell, then explain what the unscaled weights would do to learning.

# %%
rng = np.random.default_rng(3)
q3, k3, v3 = rng.normal(size=(1, 256)), rng.normal(size=(16, 256)), rng.normal(size=(16, 4))
for tau, name in ((1 / 16, "τ = 1/√E"), (1.0, "τ = 1   ")):
    _, w3 = ar.scaled_dot_product_attention(q3, k3, v3, scale=tau, return_weights=True)
    print(f"{name}: largest weight {w3.max():.3f}, weights above 0.01: {int((w3 > 0.01).sum())} of 16")

# %% [markdown] nbgrader={"grade": true, "grade_id": "scaling-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# With $\tau = 1/\sqrt{E}$ the logits have standard deviation about 1, and the weight spreads over
# several keys (largest weight about 0.2, every weight above 0.01). With $\tau = 1$ they have standard deviation
# $\sqrt{256} = 16$: the largest logit beats the others by tens of units and takes essentially all
# the weight (one-hot softmax). In that regime $\partial p_{ij}/\partial z_{il} = p_{ij}(\delta_{jl} - p_{il})$
# is almost 0 for every pair, so the gradients that would teach the model which keys to look at
# vanish.

# %% [markdown]
# **4. Change the mask.** For $L = 3$ queries and $S = 5$ keys, *predict* which keys each query
# sees with the top-left causal mask and with the bottom-right one, then print both masks. Which
# one do you need when the 3 queries are the *last* 3 tokens of a 5-token sequence (decoding with
# a KV cache)?

# %%
for alignment in ("top_left", "bottom_right"):
    print(alignment, "\n", to_numpy(ar.causal_mask(3, 5, alignment)).astype(int))

# %% [markdown] nbgrader={"grade": true, "grade_id": "mask-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Top-left: query $i$ sees keys $j \le i$ — query 0 sees key 0, query 1 keys 0–1, query 2 keys 0–2;
# keys 3 and 4 are never seen. Bottom-right: query $i$ sees $j \le i + S - L = i + 2$ — query 0
# sees keys 0–2, query 1 keys 0–3, query 2 all five. When the queries are the last three tokens
# (positions 2, 3, 4) of the sequence, each must see every key up to its own position: that is
# the bottom-right mask.

# %% [markdown]
# **5. The width of the kernel.** A kernel of width $\sigma$ gives the logits
# $z_{ij} = -(q_i - x_j)^2 / (2\sigma^2)$ — in attention's words, a scale $\tau = 1/\sigma^2$ on
# section 1's logits, which used $\sigma = 1$. *Predict* what the kernel-regression curve looks
# like for $\sigma = 0.01$ and for $\sigma = 3$, and which of $\sigma = 0.01, 0.3, 1, 3$ fits the
# true function best; then run the cell.

# %%
for sigma in (0.01, 0.3, 1.0, 3.0):
    fit = to_numpy(ar.softmax(xp.asarray(Z_kr / sigma**2))) @ y_train
    print(f"σ = {sigma:4}: mean squared error {np.mean((fit - true_f(q_test)) ** 2):.3f}, "
          f"roughness (mean |jump| between neighbouring queries) {np.mean(np.abs(np.diff(fit))):.3f}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "bandwidth-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# With $\sigma = 0.01$ (a large scale, a one-hot softmax) each query copies the target of its
# nearest training point: the curve jumps from one noisy $y_j$ to the next and follows the noise.
# With $\sigma = 3$ (a small scale, a flat softmax) every query averages almost all the points: the
# curve is smooth but nearly flat, close to the plain average. $\sigma = 0.3$ fits best: it
# averages a handful of neighbours, enough to cancel much of the noise but local enough to follow
# the curve; section 1's $\sigma = 1$ already smooths too much (it flattens the peaks). The scale
# of the logits sets how local attention is — here chosen by hand, in a Transformer learned.
