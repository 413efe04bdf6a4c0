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
# # 01 · Bahdanau attention: learning to align
#
# In 2014 neural machine translation squeezed a whole source sentence into **one** fixed-length
# vector and decoded the translation from it; quality fell off a cliff for long sentences.
# Bahdanau, Cho and Bengio ("Neural Machine Translation by Jointly Learning to Align and Translate",
# arXiv:1409.0473) let the decoder **look back** at every source word while it writes each target
# word. That look-back is *attention*, and everything in this course grows out of it.
#
# **The model (paper, §3 and appendix A).** A bidirectional RNN reads the source $x_1 \dots x_{T_x}$
# and gives one *annotation* per word, $h_j = [\overrightarrow{h}_j ; \overleftarrow{h}_j]$.
# The decoder, in state $s_{i-1}$ before writing word $i$, computes
#
# $$
# \begin{aligned}
# e_{ij} &= a(s_{i-1}, h_j) = v_a^\top \tanh\!\left(W_a s_{i-1} + U_a h_j\right) &&\text{(alignment model, eq. 6 and A.1.2)}\\
# \alpha_{ij} &= \frac{\exp(e_{ij})}{\sum_{k=1}^{T_x} \exp(e_{ik})} &&\text{(eq. 6)}\\
# c_i &= \sum_{j=1}^{T_x} \alpha_{ij} h_j &&\text{(eq. 5)}\\
# s_i &= f(s_{i-1}, y_{i-1}, c_i), \qquad p(y_i \mid y_{<i}, x) = g(y_{i-1}, s_i, c_i) &&\text{(eq. 4)}
# \end{aligned}
# $$
#
# * the **query** is the previous decoder state $s_{i-1}$; the **keys** and **values** are the
#   annotations $h_j$ (the words "query / key / value" come later, with the Transformer);
# * $U_a h_j$ does not depend on $i$: it is computed once per sentence;
# * $\alpha_{i\cdot}$ is a probability distribution over source positions: the *alignment*. The
#   paper's Figure 3 shows these matrices for English→French sentences.
#
# In the paper: $n = 1000$ hidden units per GRU, $m = 620$-dimensional word embeddings,
# $n' = 1000$ units in the alignment model, vocabularies of 30,000 words; RNNsearch-50 reached
# 26.75 BLEU on WMT'14 English→French against 17.82 for the same encoder–decoder without attention.
# Here everything is tiny and runs on a laptop CPU in seconds.

# %%
import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    additive_attention,
    additive_score,
    exact_match_accuracy,
    load_date_translator,
    luong_attention,
    luong_attentional_state,
    luong_concat_score,
    luong_dot_score,
    luong_general_score,
    make_date_dataset,
    translate,
)
from attention_ref.plotting import plot_attention, save_figure

np.set_printoptions(precision=4, suppress=True)

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. The additive score, step by step
#
# A decoder state $s$ of size 3, four annotations $h_1 \dots h_4$ of size 3, an alignment model with
# $n' = 2$ hidden units. Weight matrices are stored *(in, out)*, so the paper's $W_a s$ is `s @ W_a`.

# %%
rng = np.random.default_rng(0)
s_np = np.array([1.0, -0.5, 0.25])                 # previous decoder state s_{i-1}
H_np = np.array([[ 1.0,  0.0,  0.5],               # annotations h_j, one row per source position
                 [ 0.2,  1.0, -0.3],
                 [-0.8,  0.4,  0.9],
                 [ 0.5, -0.6,  0.1]])
W_a_np = rng.normal(size=(3, 2))                  # W_a: decoder state -> alignment space
U_a_np = rng.normal(size=(3, 2))                  # U_a: annotation    -> alignment space
v_a_np = rng.normal(size=2)                       # v_a: alignment space -> a number

Ws = s_np @ W_a_np                                # W_a s_{i-1}: once per output step
Uh = H_np @ U_a_np                                # U_a h_j: once per sentence
hidden = np.tanh(Ws + Uh)                         # tanh(W_a s + U_a h_j), one row per j
e = hidden @ v_a_np                               # e_j = v_aᵀ tanh(...)
alpha = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
c = alpha @ H_np                                  # c = Σ_j α_j h_j

print("W_a s         =", np.round(Ws, 4))
print("U_a h_j       =\n", np.round(Uh, 4))
print("tanh(W_a s + U_a h_j) =\n", np.round(hidden, 4))
print("e_j           =", np.round(e, 4))
print("α_j           =", np.round(alpha, 4), " sum =", np.round(alpha.sum(), 6))
print("c = Σ α_j h_j =", np.round(c, 4))

# %% [markdown]
# The library function does the same, batched over any leading dimensions, on NumPy or CuPy arrays:

# %%
s, H, W_a, U_a, v_a = (xp.asarray(a) for a in (s_np, H_np, W_a_np, U_a_np, v_a_np))
context, weights = additive_attention(s, H, W_a, U_a, v_a)
print("additive_attention weights:", np.round(to_numpy(weights), 4))
print("additive_attention context:", np.round(to_numpy(context), 4))
print("matches the step-by-step numbers:",
      np.allclose(to_numpy(weights), alpha, rtol=1e-12), np.allclose(to_numpy(context), c, rtol=1e-12))

# padding: a masked position gets weight exactly 0, and the rest renormalise
mask = xp.asarray([True, True, True, False])
_, w_masked = additive_attention(s, H, W_a, U_a, v_a, mask=mask)
print("with the last position masked:", np.round(to_numpy(w_masked), 4))

# %% [markdown]
# ## 2. Additive vs multiplicative scores (Luong et al. 2015)
#
# Luong, Pham and Manning (arXiv:1508.04025, §3.1, eq. 8) compared three scores of the *current*
# decoder state $h_t$ against each source state $\bar h_s$:
#
# $$
# \operatorname{score}(h_t, \bar h_s) =
# \begin{cases}
# h_t^\top \bar h_s & \text{dot}\\
# h_t^\top W_a \bar h_s & \text{general}\\
# v_a^\top \tanh\!\left(W_a [h_t; \bar h_s]\right) & \text{concat (Bahdanau's score)}
# \end{cases}
# \qquad
# \tilde h_t = \tanh\!\left(W_c [c_t; h_t]\right) \text{ (eq. 5)}
# $$
#
# On the same vectors as above:

# %%
e_add = to_numpy(additive_score(s, H, W_a, U_a, v_a))
e_dot = to_numpy(luong_dot_score(s, H))
e_gen = to_numpy(luong_general_score(s, H, xp.asarray(np.eye(3))))      # W_a = I gives the dot score
e_cat = to_numpy(luong_concat_score(s, H, xp.asarray(np.concatenate([W_a_np, U_a_np])), v_a))

print("additive (Bahdanau)      :", np.round(e_add, 4))
print("concat, W = [W_a; U_a]   :", np.round(e_cat, 4), "(the same score)")
print("dot                      :", np.round(e_dot, 4))
print("general with W_a = I     :", np.round(e_gen, 4), "(= dot)")

# %% [markdown]
# The two families behave differently when the query grows. The additive score is bounded,
# $|e_j| \le \lVert v_a \rVert_1$, because $\tanh$ saturates: once $W_a s$ dominates, every key
# lands in the same saturated corner, the scores become alike and the weights *flatten*. The dot
# score grows linearly with $\lVert s \rVert$, so its softmax gets sharper and sharper until it
# picks one key. Stage 02 divides the dot product by $\sqrt{d}$ to keep the logits in a sensible
# range.

# %%
scales = [0.5, 1.0, 4.0, 16.0]
w_add = np.stack([to_numpy(additive_attention(k * s, H, W_a, U_a, v_a)[1]) for k in scales])
w_dot = np.stack([to_numpy(luong_attention(k * s, H, "dot")[1]) for k in scales])
print("bound on |additive score|: ||v_a||_1 =", np.round(np.abs(v_a_np).sum(), 4))
for k, a, d in zip(scales, w_add, w_dot):
    print(f"query × {k:4}:  additive α = {np.round(a, 3)}   dot α = {np.round(d, 3)}")

fig, axes = plt.subplots(1, 2, figsize=(8.5, 2.8))
labels = [f"s × {k:g}" for k in scales]
keys = [f"h{j + 1}" for j in range(4)]
plot_attention(w_add, labels, keys, ax=axes[0], annotate=True, vmax=1, title="additive: bounded scores, flatten")
plot_attention(w_dot, labels, keys, ax=axes[1], annotate=True, vmax=1, title="dot: sharpens with ‖s‖")
fig.tight_layout()
save_figure(fig, "../figures/01_additive_vs_dot.png")
plt.show()

# %% [markdown]
# Luong's attentional state mixes the context back into the decoder state before the softmax over
# the vocabulary: $\tilde h_t = \tanh(W_c [c_t; h_t])$.

# %%
c_t, a_t = luong_attention(s, H, "dot")
W_c = xp.asarray(rng.normal(size=(6, 3)) / np.sqrt(6))
h_tilde = luong_attentional_state(c_t, s, W_c)
print("c_t =", np.round(to_numpy(c_t), 4))
print("h̃_t = tanh(W_c [c_t; h_t]) =", np.round(to_numpy(h_tilde), 4))

# %% [markdown]
# ## 3. A trained translator whose alignments we can see
#
# The task: human-readable dates in 17 formats — day before the month ("27/11/26",
# "Friday, 27 November 2026"), month before the day ("nov 27 2026"), year first
# ("2026 November 27th"), upper and lower case, weekday names, ordinal suffixes, two-digit years —
# to ISO "2026-11-27". `make_date_dataset(n, seed)` draws (input, target) pairs.
#
# The model is the paper's RNNsearch in miniature (`attention_ref.date_translator`): character
# embeddings, a bidirectional GRU encoder (48 units per direction), a GRU decoder (64 units) fed the
# context $c_i$, additive attention with 48 hidden units, ~70k parameters. Its backward pass is written
# out by hand in NumPy and checked against finite differences for every parameter; Adam trains it.
# The committed weights come from
#
# ```
# python -m attention_ref.train_bahdanau --steps 1500 --seed 0 --output attention_ref/data/date_translator.npz
# ```
#
# (about 40 s on two CPU cores).

# %%
for source, target in make_date_dataset(8, seed=1):
    print(f"{source!r:34} -> {target}")

# %%
model = load_date_translator()
print("sizes:", model.sizes, " parameters:", model.num_parameters)
held_out = make_date_dataset(1000, seed=12345)
print(f"exact match on 1,000 fresh dates: {exact_match_accuracy(model, held_out):.1%}")

# %%
examples = ["Friday, 27 November 2026", "November 27, 2026", "27/11/26", "2026 November 27th"]
isos, alignments = translate(model, examples)
for text, iso in zip(examples, isos):
    print(f"{text!r:28} -> {iso}")


# %% [markdown]
# Each alignment matrix has one row per output character and one column per input character.
# Row $i$ is $\alpha_{i\cdot}$: where the decoder looked while writing character $i$.

# %%
def key_labels(text):
    return [ch if ch != " " else "␣" for ch in text]  # make spaces visible


def show_alignment(ax, text, iso, a):
    plot_attention(a, list(iso), key_labels(text), ax=ax, vmax=1.0, title=f"{text!r} → {iso}")
    ax.set_xlabel("input character")
    ax.set_ylabel("output character")


fig, axes = plt.subplots(2, 2, figsize=(12, 7))
for ax, text, iso, a in zip(axes.flat, examples, isos, alignments):
    show_alignment(ax, text, iso, a)
fig.tight_layout()
save_figure(fig, "../figures/01_alignments.png")
plt.show()

# %% [markdown]
# The year digits look at the year wherever it is, the month digits at the month name or number,
# the day digits at the day. Nobody told the model where the day is: the alignment is learned only
# from (input, output) pairs. The separators "-" need no information from the input, and their
# rows are spread out.
#
# **Day and month swapped.** The same date with the day before and after the month: the alignment
# is not monotonic, and it follows the words, not the positions.

# %%
swap = ["27 Nov 2026", "Nov 27 2026"]
swap_isos, swap_aligns = translate(model, swap)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for ax, text, iso, a in zip(axes, swap, swap_isos, swap_aligns):
    show_alignment(ax, text, iso, a)
fig.tight_layout()
save_figure(fig, "../figures/01_day_month_swap.png")
plt.show()

for text, iso, a in zip(swap, swap_isos, swap_aligns):
    looked_at = [text[j] for j in a.argmax(axis=1)]
    print(f"{text!r}: day digits '{iso[8:]}' look most at input characters {looked_at[8:]}, "
          f"month digits '{iso[5:7]}' at {looked_at[5:7]}")

# %% [markdown]
# ## 4. Corrupting an input character
#
# Which characters does the model actually use? Above, both month digits looked at the **v** of
# "Nov": November is the only month with a "v", so that one letter identifies it. Let us change one
# character at a time: a letter the model does not need (the first "e"), the letter it relies on
# (the "v"), and a digit of the year.

# %%
corrupt = ["27 November 2026", "27 Novxmber 2026", "27 Noxember 2026", "27 November 20x6"]
c_isos, c_aligns = translate(model, corrupt)
for text, iso, a in zip(corrupt, c_isos, c_aligns):
    month_rows = a[5:7]
    print(f"{text!r:20} -> {iso}   month digits look at {[text[j] for j in month_rows.argmax(1)]} "
          f"(max weight {np.round(month_rows.max(1), 2)}), year digits' max weight "
          f"{np.round(a[:4].max(1), 2)}")

fig, axes = plt.subplots(2, 2, figsize=(11, 7))
for ax, text, iso, a in zip(axes.flat, corrupt, c_isos, c_aligns):
    show_alignment(ax, text, iso, a)
fig.tight_layout()
save_figure(fig, "../figures/01_corrupted.png")
plt.show()

# %% [markdown]
# * "Novxmber": the model never looked at that letter; translation and alignment are unchanged.
# * "Noxember": the cue is gone. The month rows spread over "N", "o", "x" — the decoder searches
#   the input for something it recognises — and the model answers with a *different month*,
#   confidently.
# * "20x6": the third year digit has nothing to copy; its attention becomes diffuse and the model
#   guesses.
#
# A model trained only on valid inputs has no way to say "I don't know". Attention shows *where* it
# looked, which is often enough to see *why* it went wrong — but not whether it is right.

# %% [markdown]
# ## 5. Alignments are learned: a short training run from scratch
#
# The training loop (`train_date_translator`) draws fresh batches every step, backpropagates by hand
# and takes Adam steps. 150 steps take a few seconds; compare the alignment before and after.

# %%
# NBVAL_IGNORE_OUTPUT
from attention_ref import init_date_translator, train_date_translator

fresh = init_date_translator(np.random.default_rng(0))
_, before = translate(fresh, "27 Nov 2026")
trained, losses = train_date_translator(150, seed=0, model=fresh, progress=False)
iso_after, after = translate(trained, "27 Nov 2026")
print(f"loss: {losses[0]:.3f} at step 1, {np.mean(losses[-10:]):.4f} over the last 10 steps")
print(f"exact match on 200 fresh dates: {exact_match_accuracy(trained, held_out[:200]):.1%}")
print("after 150 steps: '27 Nov 2026' ->", iso_after)

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
axes[0].plot(losses)
axes[0].set_yscale("log")
axes[0].set_xlabel("step")
axes[0].set_ylabel("cross-entropy per character")
axes[0].set_title("training loss")
plot_attention(before, list("YYYY-MM-DD"), key_labels("27 Nov 2026"), ax=axes[1], vmax=1.0,
               title="alignment before training")
plot_attention(after, list("YYYY-MM-DD"), key_labels("27 Nov 2026"), ax=axes[2], vmax=1.0,
               title="after 150 steps")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What to take away
#
# * Attention is a **soft lookup**: score every source position against the current query, softmax
#   the scores, average the values. Bahdanau's score is a one-hidden-layer network
#   $v_a^\top \tanh(W_a s + U_a h)$; Luong's dot score is a plain inner product.
# * The weights $\alpha$ are an interpretable by-product: the model's alignment. It is learned, not
#   programmed, and it is not monotonic when the languages (here, date formats) reorder.
# * Masks give padded positions weight exactly 0, so padding cannot change a translation.
#
# **Next (stage 02):** drop the recurrent network and the $\tanh$ layer, score with a dot product
# scaled by $1/\sqrt{d}$, and attend with whole matrices at once.
