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
# **The model (paper, §3 and appendix A).** A bidirectional RNN reads the source
# $x_1 \dots x_{T_x}$ and gives one *annotation* per word, $h_j = [\overrightarrow{h}_j ; \overleftarrow{h}_j]$.
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

# %% [markdown]
# ## Notation
#
# This stage keeps the paper's own letters, so that you can read it side by side with the paper.
# The rest of the course writes the same quantities in one notation (README, "Notation"); here is
# the dictionary:
#
# | this notebook (Bahdanau) | meaning | course notation (stage 02 on) |
# | --- | --- | --- |
# | $s_{i-1}$ | decoder state before writing output $i$: the **query** | a row $q_i$ of $Q$ |
# | $h_j$ | annotation of source position $j$: a **key** and its **value** | rows $k_j$ of $K$, $v_j$ of $V$ |
# | $e_{ij}$ | score (logit) of output $i$ against source position $j$ | $z_{ij}$, an entry of $Z$ |
# | $\alpha_{ij}$ | attention weight, $\alpha_{i\cdot} = \operatorname{softmax}(e_{i\cdot})$ | $p_{ij}$, an entry of $P$ |
# | $c_i$ | context vector $\sum_j \alpha_{ij} h_j$ | a row of the output $O$ |
# | $T_x$, $T_y$ | source and output lengths | $S$ (keys), $L$ (queries) |
# | $W_a$, $U_a$, $v_a$, $n'$ | alignment-model weights, hidden size $n'$ | — |
#
# Two more letters of the paper would collide with the course's: the GRU's update gate (the paper's
# $z_i$; $Z$ is the logits from stage 02 on) is written $u_i$ here, and the embedding of a
# character $y$ (the paper's $E y$; $E$ is the head size from stage 02 on) is written
# $\operatorname{emb}(y)$. Luong et al. (section 2) write the decoder state $h_t$ and the source
# states $\bar h_s$; we keep $s$ and $h_j$ for them too.

# %%
import inspect

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


def show(fn):
    """Print a function's source exactly as the library defines it."""
    print(inspect.getsource(fn))


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
# decoder state $s$ (their $h_t$) against each source state $h_j$ (their $\bar h_s$):
#
# $$
# \operatorname{score}(s, h_j) =
# \begin{cases}
# s^\top h_j & \text{dot}\\
# s^\top W_g\, h_j & \text{general (Luong's } W_a\text{)}\\
# v_a^\top \tanh\!\left(W_a s + U_a h_j\right) = v_a^\top \tanh\!\left([W_a\; U_a]\,[s; h_j]\right) & \text{concat (Bahdanau's score)}
# \end{cases}
# $$
#
# On the same vectors as above:

# %%
e_add = to_numpy(additive_score(s, H, W_a, U_a, v_a))
e_dot = to_numpy(luong_dot_score(s, H))
e_gen = to_numpy(luong_general_score(s, H, xp.asarray(np.eye(3))))      # W_g = I gives the dot score
e_cat = to_numpy(luong_concat_score(s, H, xp.asarray(np.concatenate([W_a_np, U_a_np])), v_a))

print("additive (Bahdanau)      :", np.round(e_add, 4))
print("concat, W = [W_a; U_a]   :", np.round(e_cat, 4), "(the same score)")
print("dot                      :", np.round(e_dot, 4))
print("general with W_g = I     :", np.round(e_gen, 4), "(= dot)")

# %% [markdown]
# The two families behave differently when the query grows. The additive score is bounded,
# $|e_j| \le \lVert v_a \rVert_1$, because $\tanh$ saturates: once $W_a s$ dominates, every key
# lands in the same saturated corner, the scores become alike and the weights *flatten*. The dot
# score grows linearly with $\lVert s \rVert$, so its softmax gets sharper and sharper until it
# picks one key.
#
# Stage 02's scale $1/\sqrt{E}$ is about something else: the **dimension** $E$ of the vectors, not
# the norm of one of them. A dot product of two vectors with $E$ independent entries of variance 1
# is a sum of $E$ terms, so its variance is $E$ and its typical size $\sqrt{E}$; dividing by
# $\sqrt{E}$ keeps the logits of the same size whatever $E$ is. A query that grows, as here, is
# not undone by that scale: with the dot score, the model controls sharpness through the norms it
# learns.

# %%
scales = [0.5, 1.0, 4.0, 16.0]
w_add = np.stack([to_numpy(additive_attention(k * s, H, W_a, U_a, v_a)[1]) for k in scales])
w_dot = np.stack([to_numpy(luong_attention(k * s, H, "dot")[1]) for k in scales])
print("bound on |additive score|: ||v_a||_1 =", np.round(np.abs(v_a_np).sum(), 4))
for k, a, d in zip(scales, w_add, w_dot):
    print(f"query × {k:4}:  additive α = {np.round(a, 3)}   dot α = {np.round(d, 3)}")


# %%
def label_colorbar(ax, text):
    """Name the quantity that the colour of ``ax``'s heatmap shows."""
    ax.images[0].colorbar.set_label(text)


fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2))
labels = [f"s × {k:g}" for k in scales]
keys = [f"h{j + 1}" for j in range(4)]
plot_attention(w_add, labels, keys, ax=axes[0], annotate=True, vmax=1, title="additive score: weights flatten")
plot_attention(w_dot, labels, keys, ax=axes[1], annotate=True, vmax=1, title="dot score: weights sharpen")
for ax in axes:
    ax.set_xlabel("annotation $h_j$ (key)")
    ax.set_ylabel("query: $s$ times a factor")
    label_colorbar(ax, r"weight $\alpha_j$")
fig.suptitle("A growing query flattens additive attention (tanh saturates) and sharpens dot-product attention")
fig.tight_layout()
save_figure(fig, "../figures/01_additive_vs_dot.png")
plt.show()

# %% [markdown]
# Luong's attentional state mixes the context back into the decoder state before the softmax over
# the vocabulary: the *attentional state* $\hat s_i = \tanh(W_c [c_i; s_i])$ (eq. 5, their $\tilde h_t$).

# %%
c_i, a_i = luong_attention(s, H, "dot")
W_c = xp.asarray(rng.normal(size=(6, 3)) / np.sqrt(6))
s_hat = luong_attentional_state(c_i, s, W_c)
print("c_i =", np.round(to_numpy(c_i), 4))
print("ŝ_i = tanh(W_c [c_i; s_i]) =", np.round(to_numpy(s_hat), 4))

# %% [markdown]
# ## 3. A translator whose alignments we can see
#
# The task: human-readable dates in 17 formats — day before the month ("27/11/26",
# "Friday, 27 November 2026"), month before the day ("nov 27 2026"), year first
# ("2026 November 27th"), upper and lower case, weekday names, ordinal suffixes, two-digit years —
# to ISO "2026-11-27". `make_date_dataset(n, seed)` draws (input, target) pairs.

# %%
for source, target in make_date_dataset(8, seed=1):
    print(f"{source!r:34} -> {target}")

# %% [markdown]
# The model is the paper's RNNsearch in miniature (`attention_ref.date_translator`): character
# embeddings, a bidirectional GRU encoder (48 units per direction), a GRU decoder (64 units) fed the
# context $c_i$, additive attention with $n' = 48$ hidden units, about 70k parameters. Its backward
# pass is written out by hand in NumPy and checked against finite differences for every parameter;
# Adam trains it. The committed weights come from
#
# ```
# python -m attention_ref.train_bahdanau --steps 1500 --seed 0 --output attention_ref/data/date_translator.npz
# ```
#
# (about 40 s on a 2-core Intel Xeon virtual machine).

# %%
model = load_date_translator()
print("sizes:", model.sizes, " parameters:", model.num_parameters)

# %% [markdown]
# ### 3.1 The pieces of the model, equation by equation
#
# Each piece below is the library's own code, printed from `attention_ref.date_translator`. Matrices
# are stored *(in, out)*, so $W x$ in an equation is `x @ W` in the code, and a batch of $B$
# sentences runs at once (the first axis of every array).
#
# **The GRU step** (Cho et al. 2014; Bahdanau et al. appendix A.1.1). With input $x$ (in the encoder
# the embedding of one source character, in the decoder $[\operatorname{emb}(y_{i-1}); c_i]$) and
# previous state $s$:
#
# $$
# \begin{aligned}
# u &= \sigma(W_u x + U_u s) &&\text{update gate (the code's } \texttt{z}\text{)}\\
# r &= \sigma(W_r x + U_r s) &&\text{reset gate}\\
# \tilde s &= \tanh\!\big(W x + U (r \circ s)\big) &&\text{candidate}\\
# s' &= (1 - u) \circ s + u \circ \tilde s &&\text{new state}
# \end{aligned}
# $$
#
# The input parts $W_u x$, $W_r x$, $W x$ (plus biases) arrive precomputed and stacked as `xw`; `U`
# stacks $[U_u \mid U_r \mid U]$ along its columns. The encoder runs one GRU forwards and one
# backwards over the characters; the decoder runs a third one.

# %%
from attention_ref import date_translator as dt

show(dt._gru_step)

# %% [markdown]
# **The encoder** reads the embedded characters with both GRUs; the annotation of position $j$
# is $h_j = [\overrightarrow{h}_j; \overleftarrow{h}_j]$, the decoder starts from
# $s_0 = \tanh(W_s \overleftarrow{h}_1 + b_s)$ (appendix A.2.2), and $U_a h_j$ — the
# query-independent half of the score — is computed here, once per sentence (`keys`).

# %%
show(dt._encode)

# %% [markdown]
# **The attention step** is section 1's computation for a whole batch; padded positions get
# $e_{ij} = -\infty$, hence $\alpha_{ij} = 0$:
#
# $$
# e_{ij} = v_a^\top \tanh(W_a s_{i-1} + U_a h_j), \qquad
# \alpha_{ij} = \frac{e^{e_{ij}}}{\sum_k e^{e_{ik}}}, \qquad c_i = \sum_j \alpha_{ij} h_j .
# $$

# %%
show(dt._attend)

# %% [markdown]
# **The decoder step** attends with the *previous* state $s_{i-1}$, then feeds the embedding of the
# previous output character and the context to the decoder GRU:
#
# $$
# s_i = \operatorname{GRU}\big(s_{i-1},\, [\operatorname{emb}(y_{i-1});\, c_i]\big) \qquad\text{(eq. 4, appendix A.2.2)}.
# $$

# %%
show(dt._decoder_step)

# %% [markdown]
# **The output layer and the loss.** The scores of the 12 output symbols (start token, ten digits,
# "-") are one linear layer of the new state and the context, and the loss is the mean
# cross-entropy of the right character, with the true previous character fed in at every step
# (teacher forcing):
#
# $$
# g_i = s_i W_{os} + c_i W_{oc} + b_o, \qquad
# p(y_i \mid y_{<i}, x) = \operatorname{softmax}(g_i), \qquad
# \mathcal{L} = -\frac{1}{B\,T_y} \sum_{b=1}^{B} \sum_{i=1}^{T_y} \log p\big(y^{(b)}_i \mid y^{(b)}_{<i}, x^{(b)}\big).
# $$
#
# The logits line appears in `_forward` (training) and in `greedy_decode` (below); the loss, with
# its gradient $\partial\mathcal{L}/\partial g = (\operatorname{softmax}(g) - \text{one-hot}(y))/(B\,T_y)$
# that starts the hand-written backward pass:

# %%
show(dt._cross_entropy)

# %% [markdown]
# **Decoding.** At inference there is no true previous character: greedy decoding feeds back the
# most likely one, for exactly ten steps ("YYYY-MM-DD"):

# %%
show(dt.greedy_decode)

# %% [markdown]
# **Check: the pieces give the translator.** Run the encoder and ten decoder steps by hand on one
# input and compare with `translate`:

# %%
text = "27 Nov 2026"
src, src_mask = dt.encode_sources(model, [text])
enc = dt._encode(model.params, src, src_mask)
state, previous, written, rows = enc["s0"], np.zeros(1, dtype=np.int64), "", []
for i in range(10):
    state, c_i, alpha_i, _ = dt._decoder_step(model.params, state, previous, enc, src_mask)
    g_i = state @ model.params["out_W_s"] + c_i @ model.params["out_W_c"] + model.params["out_b"]
    previous = g_i[:, 1:].argmax(axis=1) + 1           # never the start token (id 0)
    written += model.target_chars[previous[0] - 1]
    rows.append(alpha_i[0])
iso, alignment = translate(model, text)
print(f"by hand: {written!r}   translate: {iso!r}")
print("same alignment:", bool(np.array_equal(np.stack(rows), alignment)))

# %% [markdown]
# **Where this model departs from the paper.**
#
# * **Output layer.** The paper's output (appendix A.2.2) is a "deep output": one hidden layer of
#   *maxout* units that reads the decoder state, the embedding of the previous word $y_{i-1}$ and
#   the context, then a softmax. Here $g_i$ is a single linear layer of $s_i$ and $c_i$: **no
#   maxout**, and the **previous character $y_{i-1}$ is dropped** from the output layer (it still
#   reaches it through $s_i$, whose GRU reads $\operatorname{emb}(y_{i-1})$).
# * Characters instead of words, about 70k parameters instead of tens of millions, and a fixed output
#   length of 10 (no end-of-sentence symbol).
# * Adam with a cosine learning-rate decay and gradient-norm clipping, instead of Adadelta;
#   greedy decoding instead of beam search.
#
# The alignment model — the part this course is about — is the paper's, unchanged.

# %% [markdown]
# ## 4. Alignments of the trained translator
#
# On 1,000 dates it has never seen:

# %%
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
    ax.set_xlabel("input character $j$ (␣ = space)")
    ax.set_ylabel("output character $i$")
    label_colorbar(ax, r"$\alpha_{ij}$")


fig, axes = plt.subplots(2, 2, figsize=(12, 7.4))
for ax, text, iso, a in zip(axes.flat, examples, isos, alignments):
    show_alignment(ax, text, iso, a)
fig.suptitle("Wherever the format puts them, the year, month and day digits look at the year, month and day")
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
fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
for ax, text, iso, a in zip(axes, swap, swap_isos, swap_aligns):
    show_alignment(ax, text, iso, a)
fig.suptitle("Swap day and month in the input: the alignment follows the words, not the positions")
fig.tight_layout()
save_figure(fig, "../figures/01_day_month_swap.png")
plt.show()

for text, iso, a in zip(swap, swap_isos, swap_aligns):
    looked_at = [text[j] for j in a.argmax(axis=1)]
    print(f"{text!r}: day digits '{iso[8:]}' look most at input characters {looked_at[8:]}, "
          f"month digits '{iso[5:7]}' at {looked_at[5:7]}")

# %% [markdown]
# ## 5. Corrupting an input character
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

fig, axes = plt.subplots(2, 2, figsize=(11.5, 7.4))
for ax, text, iso, a in zip(axes.flat, corrupt, c_isos, c_aligns):
    show_alignment(ax, text, iso, a)
fig.suptitle("Remove the one letter that names the month ('v') and the month rows search the input")
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
# ## 6. Alignments are learned: a short training run from scratch
#
# The training loop (`train_date_translator`) draws fresh batches every step, backpropagates by hand
# and takes Adam steps. We train a fresh model for 150 steps and compare its alignment before and
# after. (Its numbers depend on the machine's floating-point library, so they are not compared
# when the notebook is tested.)

# %%
# NBVAL_IGNORE_OUTPUT
import os
import platform
import time

from attention_ref import init_date_translator, train_date_translator

fresh = init_date_translator(np.random.default_rng(0))
_, before = translate(fresh, "27 Nov 2026")
start = time.perf_counter()
trained, losses = train_date_translator(150, seed=0, model=fresh, progress=False)
seconds = time.perf_counter() - start
iso_after, after = translate(trained, "27 Nov 2026")
print(f"150 steps in {seconds:.1f} s on this machine ({platform.machine()}, {os.cpu_count()} CPU cores)")
print(f"loss: {losses[0]:.3f} at step 1, {np.mean(losses[-10:]):.4f} over the last 10 steps")
print(f"exact match on 200 fresh dates: {exact_match_accuracy(trained, held_out[:200]):.1%}")
print("after 150 steps: '27 Nov 2026' ->", iso_after)

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
axes[0].plot(np.arange(1, len(losses) + 1), losses)
axes[0].set_yscale("log")
axes[0].set_xlabel("training step")
axes[0].set_ylabel("cross-entropy per character")
axes[0].set_title("training loss")
for ax, a, title in ((axes[1], before, "before training"), (axes[2], after, "after 150 steps")):
    plot_attention(a, list("YYYY-MM-DD"), key_labels("27 Nov 2026"), ax=ax, vmax=1.0, title=title)
    ax.set_xlabel("input character $j$ (␣ = space)")
    ax.set_ylabel("output position $i$")
    label_colorbar(ax, r"$\alpha_{ij}$")
fig.suptitle("As the loss falls, the near-uniform alignment of an untrained model becomes sharp")
fig.tight_layout()
save_figure(fig, "../figures/01_training.png")
plt.show()

# %% [markdown]
# ## What to take away
#
# * Attention is a **soft lookup**: score every source position against the current query, softmax
#   the scores, average the values. Bahdanau's score is a one-hidden-layer network
#   $v_a^\top \tanh(W_a s + U_a h)$; Luong's dot score is a plain inner product.
# * The whole translator is four small pieces — a GRU step, an attention step, a decoder step, a
#   linear output layer with a cross-entropy loss — each a few lines of NumPy.
# * The weights $\alpha$ are an interpretable by-product: the model's alignment. It is learned, not
#   programmed, and it is not monotonic when the languages (here, date formats) reorder.
# * Masks give padded positions weight exactly 0, so padding cannot change a translation.
#
# **Next (stage 02):** drop the recurrent network and the $\tanh$ layer, score with a dot product
# scaled by $1/\sqrt{E}$, and attend with whole matrices at once.

# %% [markdown]
# ## Exercises
#
# The checker (`attention_ref.check`) runs your function against a float64 reference on cases
# from easy to hard, and says what is wrong when it fails.

# %%
import attention_ref as ar
from attention_ref.check import check

# %% [markdown]
# **1. Implement additive attention.** Write `additive_attention(query, keys, W_a, U_a, v_a, mask=None)`
# in NumPy: `query` is $s$ of shape `(..., Dq)`, `keys` the annotations $h_j$ of shape
# `(..., S, Dk)`, `W_a` `(Dq, n')`, `U_a` `(Dk, n')`, `v_a` `(n',)`. Return `(context, weights)`:
# $c$ of shape `(..., Dk)` and $\alpha$ of shape `(..., S)`. Subtract the maximum before
# exponentiating; a position where the boolean `mask` is False gets weight exactly 0 (the mask is a
# bonus case). Keep float32 inputs float32.

# %% nbgrader={"grade": false, "grade_id": "additive-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def additive_attention(query, keys, W_a, U_a, v_a, mask=None):
    ### BEGIN SOLUTION
    ### STUB e = ...        # e_j = v_aᵀ tanh(W_a s + U_a h_j): shape (..., S)
    ### STUB alpha = ...    # softmax over j (subtract the max); masked positions get 0
    ### STUB context = ...  # c = Σ_j α_j h_j: shape (..., Dk)
    ### STUB return context, alpha
    e = np.tanh((query @ W_a)[..., None, :] + keys @ U_a) @ v_a  # (..., S)
    if mask is not None:
        e = np.where(mask, e, -np.inf)
    m = e.max(axis=-1, keepdims=True)
    weights = np.exp(e - np.where(np.isfinite(m), m, 0))  # a fully masked row: shift by 0
    total = weights.sum(axis=-1, keepdims=True)
    alpha = weights / np.where(total > 0, total, 1)
    context = (alpha[..., None, :] @ keys)[..., 0, :]
    return context, alpha
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "additive-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(additive_attention, "additive_attention", raise_on_failure=True)

# %% [markdown]
# **2. Once per sentence.** $U_a h_j$ does not depend on the output step $i$. Count the
# multiply-adds spent on $U_a h_j$ while translating one sentence of $T_x$ characters into $T_y$
# characters, with annotations of size $2n$ and $n'$ alignment units, (a) when it is recomputed at
# every output step and (b) when it is computed once. What are the two numbers for this notebook's
# translator on "27 November 2026" ($2n = 96$, $n' = 48$, $T_y = 10$)?

# %% [markdown] nbgrader={"grade": true, "grade_id": "once-per-sentence-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Each product $U_a h_j$ costs $2n \cdot n'$ multiply-adds, and there are $T_x$ of them.
# (a) Recomputed at each of the $T_y$ steps: $T_y\, T_x\, 2n\, n'$. (b) Once: $T_x\, 2n\, n'$, a
# factor $T_y$ fewer. For "27 November 2026" ($T_x = 16$): (a) $10 \cdot 16 \cdot 96 \cdot 48 = 737{,}280$,
# (b) $73{,}728$. The query half $W_a s_{i-1}$ does change with $i$ and is computed once per step.

# %% [markdown]
# **3. Who sets the sharpness of additive attention?** Section 2 showed that a larger query does
# not sharpen the additive weights. *Predict* what multiplying $v_a$ by 10, and by 0.1, does to the
# weights $\alpha$ of section 1's example; then run the cell and explain.

# %%
for factor in (0.1, 1.0, 10.0):
    _, w = ar.additive_attention(s, H, W_a, U_a, factor * v_a)
    print(f"v_a × {factor:4}: α = {np.round(to_numpy(w), 3)}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "sharpness-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# The scores are $e_j = v_a^\top \tanh(\cdot)$, linear in $v_a$: multiplying $v_a$ by a factor
# multiplies every score by it, like a softmax temperature. $v_a \times 10$ makes the weights much
# sharper (the largest score wins almost everything); $v_a \times 0.1$ makes them nearly uniform
# ($1/4$ each). Since $|e_j| \le \lVert v_a \rVert_1$ whatever the query, the model learns the
# sharpness of its attention through the size of $v_a$, not through the size of $s$.

# %% [markdown]
# **4. A format the model never saw.** Every numeric format in the training data puts the day
# first ("27/11/2026"). *Predict* what the translator writes for the American "11/27/2026", then run
# the cell and use the alignment to explain its answer.

# %%
us_iso, us_alignment = ar.translate(model, "11/27/2026")
print("'11/27/2026' ->", us_iso)
for name, rows in (("month", slice(5, 7)), ("day", slice(8, 10))):
    looked = ["11/27/2026"[j] for j in us_alignment[rows].argmax(axis=1)]
    print(f"{name} digits look most at input characters {looked}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "us-format-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# It writes 2026-07-11. The alignment shows why: the day digits look at "11" and the month digits at
# "27", the positions where every day-first format it was trained on keeps the day and the month.
# A month "27" does not exist, so it copies the one digit it can use, the "7", and writes "07". The
# model has learned *where* the day and month are in its training formats; it does not know what a
# month is, and attention shows it copying from the wrong places with confidence.
