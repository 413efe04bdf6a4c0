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
# # 10 · Ring attention: one sequence across many processes
#
# FlashAttention (notebook 05) never forms the $N \times N$ matrix, so attention's *extra* memory is
# linear in $N$. But the linear part grows too: for one layer of a Llama-3-70B-shaped model
# ($H = 64$ query heads, $H_{kv} = 8$ key/value heads, $E = 128$, bfloat16), a million tokens of
# $Q$ and $O$ alone are 32 GiB — and training keeps such activations for every layer. Past one
# device's memory the sequence itself has to be split.
#
# **Ring attention** (Liu, Zaharia & Abbeel 2023) cuts the sequence into $R$ shards, one per
# **rank** (a process, usually one GPU). Rank $r$ keeps its queries $Q_r$ and starts with its own
# keys and values $(K_r, V_r)$. At each of $R$ steps every rank attends its queries to the key/value
# block in hand, passes that block to rank $r+1$ and receives one from rank $r-1$. After $R$ steps
# every query has met every key. The partial results are merged exactly with the rule of split-KV
# decoding (notebook 07):
#
# $$
# (O_b, \lambda_b) = \operatorname{attention}(Q_r, K_{b}, V_{b}),\qquad
# \lambda \leftarrow \log\!\big(e^{\lambda} + e^{\lambda_b}\big),\qquad
# O \leftarrow e^{\lambda_{\text{old}} - \lambda}\, O + e^{\lambda_b - \lambda}\, O_b .
# $$
#
# This notebook runs everything in one process with `simulate_ring_attention`, which executes the
# **same per-rank step function** as the real MPI ranks and a loop in place of the network. The real
# multi-process runs (`mpiexec -n 4 python -m attention_ref.ring ...`) were measured with
# `benchmarks/bench_ring.py`; section 8 shows their stored results.

# %% [markdown]
# **Notation** (the course's table; this notebook uses these rows):
#
# | symbol | meaning | in code |
# | --- | --- | --- |
# | $N$ | length of the whole sequence | `N`, `seq_len` |
# | $R$, $r$ | number of ranks (processes), and one rank $0 \dots R-1$ | `world_size`, `rank` |
# | $N_r$ | tokens a rank holds, $\approx N/R$ (its $L_r$ queries; a block of as many keys) | |
# | $E$, $E_v$ | query/key and value size per head | `E`, `Ev` |
# | $H$, $H_{kv}$ | query heads, key/value heads (GQA: only the $H_{kv}$ heads travel) | `H`, `H_kv` |
# | $Q_r$, $K_b$, $V_b$ | rank $r$'s queries; the keys and values of block $b$ (rank $b$'s shard) | `q`, `k_blk`, `v_blk` |
# | $O$, $\lambda$ | output and logsumexp of each query row, merged step by step | `out`, `lse` |
# | $\tau$, $z_{ij}$, $P$ | the scale $1/\sqrt E$, the logit of query $i$ and key $j$, the weights | `scale`, `weights` |
# | $D$, $dQ, dK, dV, dO$, $dZ$ | rowsum$(dO \circ O)$, and the gradients of the loss (section 5) | `dq`, `dk`, `dv`, `grad_out` |
# | $F$, $\beta$, $\nu$ | a device's FLOP rate, a link's bandwidth (bytes per second, each way), bytes per number (section 7) | `F`, `W`, `bytes_per` |
#
# Local to this notebook: $s$ numbers the steps of the ring ($0 \dots R-1$), $c$ the chunks of a shard.

# %%
import inspect
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from attention_ref import (
    flash_attention,
    flash_attention_backward,
    ring_attention_step,
    scaled_dot_product_attention,
    shard,
    shard_spans,
    simulate_ring_attention,
    simulate_ring_attention_backward,
    unshard,
    visible_chunk_pairs,
)
from attention_ref.plotting import save_figure

# %%
from attention_ref import get_array_module, to_numpy

xp = get_array_module()  # numpy; ATTENTION_REF_BACKEND=cupy for a GPU
rng = np.random.default_rng(10)
RANK_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def max_err(a, b):
    return float(np.max(np.abs(to_numpy(a).astype(np.float64) - to_numpy(b).astype(np.float64))))


# %% [markdown]
# ## 1. Shards: which rank holds which tokens
#
# `shard_spans(N, R, layout)` gives the global positions each rank holds, as a list of chunks
# $[\text{start}, \text{stop})$. Two layouts:
#
# * **contiguous**: rank $r$ holds tokens $[rN/R, (r+1)N/R)$;
# * **zigzag**: the sequence is cut into $2R$ chunks and rank $r$ holds chunk $r$ and chunk
#   $2R-1-r$ — one early, one late (why: section 4).
#
# When $R$ (or $2R$) does not divide $N$ nothing is padded: chunk boundaries are
# $\lfloor iN/R \rfloor$ (or $\lfloor iN/2R \rfloor$), so shards differ by at most one token (two for
# zigzag), and every rank can compute every other rank's shard size from $N$ alone.

# %%
for layout in ("contiguous", "zigzag"):
    print(f"{layout:>10}, N = 16, R = 4:", shard_spans(16, 4, layout))
print(f"{'zigzag':>10}, N = 19, R = 4:", shard_spans(19, 4, "zigzag"),
      "→ shard lengths", [sum(b - a for a, b in s) for s in shard_spans(19, 4, "zigzag")])

x = xp.asarray(rng.standard_normal((2, 3, 19, 8)))  # (batch, H, N, E)
pieces = shard(x, 4, layout="zigzag")
print("shard shapes:", [tuple(p.shape) for p in pieces])
print("unshard(shard(x)) == x:", bool(np.array_equal(to_numpy(unshard(pieces, layout="zigzag")), to_numpy(x))))

# %%
N_demo, R_demo = 16, 4
fig, axes = plt.subplots(2, 1, figsize=(9, 2.6))
for ax, layout in zip(axes, ("contiguous", "zigzag")):
    owner = np.zeros(N_demo, dtype=int)
    for r, spans in enumerate(shard_spans(N_demo, R_demo, layout)):
        for a, b in spans:
            owner[a:b] = r
    ax.imshow(owner[None, :], cmap=ListedColormap(RANK_COLOURS[:R_demo]), vmin=-0.5, vmax=R_demo - 0.5,
              aspect="auto")
    for p in range(N_demo):
        ax.text(p, 0, f"r{owner[p]}", ha="center", va="center", color="white", fontsize=9)
    ax.set_yticks([0])
    ax.set_yticklabels([layout])
    ax.set_xticks(range(N_demo))
axes[1].set_xlabel("token position (labels: the rank that holds it)")
axes[0].set_title("Zigzag gives every rank one early and one late chunk (N = 16 tokens, R = 4 ranks)")
fig.tight_layout()
save_figure(fig, "../figures/10_layouts.png")
plt.show()

# %% [markdown]
# ## 2. One step on one rank
#
# The heart of ring attention is what **one rank does in one step**: attend its queries to the
# key/value block it holds and merge the result into its running $(O, \lambda)$. This is the
# function every rank runs — over MPI and in the simulator alike:

# %%
print(inspect.getsource(ring_attention_step))

# %% [markdown]
# The work comes in **chunk pairs**: a contiguous shard is one chunk, a zigzag shard two. With a
# causal mask, `visible_chunk_pairs` compares the pair's global positions — a key chunk wholly
# before the query chunk is attended without a mask (`"full"`), a key chunk after it is skipped, and
# the pair of a chunk with itself gets the ordinary causal mask (`"diagonal"`: the same positions on
# both sides, $L = S$, so the top-left and bottom-right alignments of notebook 02 coincide). Chunks
# of the two layouts never overlap partly, so there is no other case. Rank 1 of 4, zigzag, at each
# step of the ring (it holds rank $(1 - s) \bmod 4$'s block at step $s$):

# %%
spans = shard_spans(16, 4, "zigzag")
print("rank 1 holds", spans[1])
for step in range(4):
    owner = (1 - step) % 4
    pairs = visible_chunk_pairs(spans[1], spans[owner], is_causal=True)
    print(f"step {step}: block of rank {owner} {spans[owner]} →",
          [(spans[1][c], spans[owner][j], kind) for c, j, kind in pairs])

# %% [markdown]
# Two ranks by hand: rank 1 of 2 (contiguous, causal) holds the last half of the sequence. Its first
# step uses its own block (diagonal, causal mask), its second rank 0's block (entirely in the past:
# no mask). Starting from $O = 0$, $\lambda = -\infty$ — the merge's identity — the two steps give
# exactly the second half of causal attention over the whole sequence:

# %%
q, k, v = (xp.asarray(rng.standard_normal((2, 4, 10, 8))) for _ in range(3))
spans2 = shard_spans(10, 2, "contiguous")
out1 = xp.zeros((2, 4, 5, 8), dtype=xp.float64)
lse1 = xp.full((2, 4, 5), -np.inf, dtype=xp.float64)
out1, lse1 = ring_attention_step(q[..., 5:, :], k[..., 5:, :], v[..., 5:, :], out1, lse1,
                                 spans2[1], spans2[1], is_causal=True)  # step 0: own block
out1, lse1 = ring_attention_step(q[..., 5:, :], k[..., :5, :], v[..., :5, :], out1, lse1,
                                 spans2[1], spans2[0], is_causal=True)  # step 1: rank 0's block
ref = scaled_dot_product_attention(q, k, v, is_causal=True)
print("rank 1's rows equal causal SDPA to 1e-12:", max_err(out1, ref[..., 5:, :]) < 1e-12)

# %% [markdown]
# ## 3. The ring schedule
#
# `simulate_ring_attention(q, k, v, R, ...)` shards the inputs, runs `ring_attention_step` for
# every virtual rank at every step, and then "sends" every block to the next rank. It records a
# `RingEvent` per (step, rank): the block it held, the chunk pairs it computed, the logits that
# cost, and what it sent where. At step $s$ rank $r$ holds rank $(r - s) \bmod R$'s block:

# %%
R = 4
q, k, v = (xp.asarray(rng.standard_normal((1, 2, 64, 16))) for _ in range(3))
out, events = simulate_ring_attention(q, k, v, R, is_causal=True, layout="zigzag")
held = np.zeros((R, R), dtype=int)  # [step, rank]
for e in events:
    held[e.step, e.rank] = e.block
print("block held   rank 0  rank 1  rank 2  rank 3")
for s in range(R):
    print(f"step {s}:    " + "".join(f"{held[s, r]:8d}" for r in range(R)))
e = events[R + 1]  # step 1, rank 1
print(f"\nstep {e.step}, rank {e.rank}: holds block {e.block}, computes {[p[2] for p in e.pairs]} "
      f"({e.work} logits per head), sends {e.bytes_sent} bytes (K and V) to rank {e.sent_to}")

# %%
fig, ax = plt.subplots(figsize=(6.4, 4.2))
ax.imshow(held, cmap=ListedColormap(RANK_COLOURS[:R]), vmin=-0.5, vmax=R - 0.5)
for s in range(R):
    for r in range(R):
        ax.text(r, s, f"K,V of\nrank {held[s, r]}", ha="center", va="center", color="white", fontsize=9)
        if s < R - 1:  # the block moves right (to rank r + 1) and down (to the next step)
            arrow = {"arrowstyle": "->", "color": "0.25"}
            if r < R - 1:
                ax.annotate("", xy=(r + 0.7, s + 0.72), xytext=(r + 0.3, s + 0.28), arrowprops=arrow)
            else:  # rank R−1 passes to rank 0: out on the right, in on the left
                ax.annotate("", xy=(R - 0.3, s + 0.5), xytext=(r + 0.3, s + 0.28), arrowprops=arrow)
                ax.annotate("", xy=(-0.3, s + 0.72), xytext=(-0.7, s + 0.5), arrowprops=arrow)
ax.set_xlim(-0.75, R - 0.25)
ax.set_xticks(range(R))
ax.set_xticklabels([f"rank {r}" for r in range(R)])
ax.set_yticks(range(R))
ax.set_yticklabels([f"step {s}" for s in range(R)])
ax.set_xlabel("rank (keeps its own queries $Q_r$ the whole time)")
ax.set_ylabel("ring step")
ax.set_title("Each step every block moves one rank on:\nafter R steps every rank has seen every block")
fig.tight_layout()
save_figure(fig, "../figures/10_ring_schedule.png")
plt.show()

# %% [markdown]
# The check of every stage: the simulated ring must give attention over the whole sequence, for
# $R = 1 \dots 4$, both layouts, with and without the causal mask, with GQA (4 query heads sharing
# 2 key/value heads; only the 2 key/value heads travel), and a length, $N = 37$, that neither $R$
# nor $2R$ divides.

# %%
N = 37
q = xp.asarray(rng.standard_normal((2, 4, N, 16)))
k, v = (xp.asarray(rng.standard_normal((2, 2, N, 16))) for _ in range(2))
print(" R  layout      causal  | max error vs SDPA < 1e-12")
for R in (1, 2, 3, 4):
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            out, _ = simulate_ring_attention(q, k, v, R, is_causal=causal, layout=layout, enable_gqa=True)
            ref = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            print(f"{R:2d}  {layout:10s}  {causal!s:6s}  | {max_err(out, ref) < 1e-12}")

# %% [markdown]
# ## 4. The causal mask unbalances the ring — zigzag fixes it
#
# With a causal mask, query $i$ sees only keys $j \le i$. In the contiguous layout rank 0 holds the
# first tokens: every other block is in its future and skipped, so it works at step 0 only. Rank
# $R-1$ holds the last tokens and works at every step. But a ring step ends only when its slowest
# rank is done, so the whole ring runs at the pace of rank $R-1$.
#
# Colour each logit $z_{ij}$ of the causal matrix by the rank that computes it ($N = 32$, $R = 4$):

# %%
N, R = 32, 4
q1 = xp.asarray(rng.standard_normal((1, 1, N, 4)))
who = {}
for layout in ("contiguous", "zigzag"):
    _, events = simulate_ring_attention(q1, q1, q1, R, is_causal=True, layout=layout)
    grid = np.full((N, N), -1)
    for e in events:
        for (qa, qb), (ka, kb), kind in e.pairs:
            block = np.full((qb - qa, kb - ka), e.rank)
            if kind == "diagonal":
                block = np.where(np.tril(np.ones_like(block, dtype=bool)), block, -1)
            grid[qa:qb, ka:kb] = np.maximum(grid[qa:qb, ka:kb], block)
    who[layout] = grid
    counts = [int(np.sum(grid == r)) for r in range(R)]
    print(f"{layout:>10}: logits per rank {counts}  (total {sum(counts)} = N(N+1)/2 = {N * (N + 1) // 2})")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
cmap = ListedColormap(["#f2f2f2"] + RANK_COLOURS[:R])
for ax, layout in zip(axes, ("contiguous", "zigzag")):
    ax.imshow(who[layout] + 1, cmap=cmap, vmin=-0.5, vmax=R + 0.5, interpolation="nearest")
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    counts = [int(np.sum(who[layout] == r)) for r in range(R)]
    ax.set_title(f"{layout}: logits per rank {counts}")
handles = [plt.Rectangle((0, 0), 1, 1, color=RANK_COLOURS[r]) for r in range(R)]
handles.append(plt.Rectangle((0, 0), 1, 1, color="#f2f2f2"))
fig.legend(handles, [f"rank {r}" for r in range(R)] + ["masked (never computed)"],
           loc="lower center", ncol=R + 1, fontsize=9)
contiguous_counts = [int(np.sum(who["contiguous"] == r)) for r in range(R)]
fig.suptitle(f"Causal attention over {R} ranks: contiguous gives rank {R - 1} "
             f"{contiguous_counts[-1] / contiguous_counts[0]:.1f}× rank 0's work, zigzag equal shares")
fig.tight_layout(rect=(0, 0.07, 1, 1))
save_figure(fig, "../figures/10_who_computes.png")
plt.show()

# %% [markdown]
# Per step: the work each rank does (the logits it computes, as a fraction of a full
# $\tfrac{N}{R} \times \tfrac{N}{R}$ block), for $R = 8$. The time of a step is that of its busiest
# rank, so the ring's time is the sum over steps of the row maxima — the **critical path**:

# %%
N, R = 1024, 8
q1 = xp.asarray(rng.standard_normal((1, 1, N, 4)))
full_block = (N // R) ** 2
work = {}
for layout in ("contiguous", "zigzag"):
    _, events = simulate_ring_attention(q1, q1, q1, R, is_causal=True, layout=layout)
    w = np.zeros((R, R))
    for e in events:
        w[e.step, e.rank] = e.work / full_block
    work[layout] = w
    print(f"{layout:>10}: critical path {w.max(axis=1).sum():5.2f} blocks; "
          f"perfect balance would be {w.sum() / R:5.2f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
for ax, layout in zip(axes, ("contiguous", "zigzag")):
    image = ax.imshow(work[layout], cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("rank")
    ax.set_ylabel("ring step")
    ax.set_title(f"{layout}: critical path {work[layout].max(axis=1).sum():.2f} blocks")
    ax.set_xticks(range(R))
    ax.set_yticks(range(R))
fig.colorbar(image, ax=axes, label="logits computed / full (N/R)² block", fraction=0.03)
fig.suptitle("Zigzag: every rank does half a block at every step, so the causal ring takes half as long")
save_figure(fig, "../figures/10_causal_work.png")
plt.show()

# %% [markdown]
# Contiguous: rank $R-1$ computes a full block at every step after the first, while rank 0 idles —
# the critical path is $\approx R$ blocks though the work is $\approx R/2$ per rank. Zigzag: at step
# 0 each rank does its own diagonal; after that the block of an *earlier* rank is visible to both of
# the rank's query chunks but only through the block's early chunk, and the block of a *later* rank
# only to the rank's late chunk — half a block either way. The critical path drops to
# $\approx R/2$, the ideal. (Striped attention, Brandon et al. 2023, balances the same way by giving
# rank $r$ every $R$-th token.)
#
# ## 5. The backward pass: dK and dV travel with their blocks
#
# The backward pass needs $O$ and $\lambda$ of the finished forward pass. With the global $\lambda$,
# $P = e^{\tau Q K^\top - \lambda}$ of a chunk pair is the exact slice of the full weights, and
# $D = \operatorname{rowsum}(dO \circ O)$ is the full row's — so the FlashAttention backward of each
# visible pair (notebook 05) gives exact, additive contributions:
# $dQ_r \mathrel{+}= \tau\, dZ\, K_b$ stays on the rank ($dZ = P \circ (dP - D)$, the gradient of the
# logits); $dK_b \mathrel{+}= \tau\, dZ^\top Q_r$ and
# $dV_b \mathrel{+}= P^\top dO_r$ belong to the block's owner. So $dK_b, dV_b$ travel round the ring
# behind $K_b, V_b$, each rank adding its share, and one last pass brings them home.

# %%
N, R = 45, 4
q = xp.asarray(rng.standard_normal((2, 4, N, 16)))
k, v = (xp.asarray(rng.standard_normal((2, 2, N, 16))) for _ in range(2))
grad_out = xp.asarray(rng.standard_normal((2, 4, N, 16)))
out, lse, _ = simulate_ring_attention(q, k, v, R, is_causal=True, layout="zigzag", enable_gqa=True,
                                      return_lse=True)
dq, dk, dv, events = simulate_ring_attention_backward(q, k, v, out, lse, grad_out, R, is_causal=True,
                                                      layout="zigzag", enable_gqa=True)
ref_out, ref_lse = flash_attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
ref_grads = flash_attention_backward(q, k, v, ref_out, ref_lse, grad_out, is_causal=True, enable_gqa=True)
for name, got, want in zip(("dQ", "dK", "dV"), (dq, dk, dv), ref_grads):
    print(f"{name}: equals flash_attention_backward on the whole sequence to 1e-12: {max_err(got, want) < 1e-12}")
print("bytes rank 0 sends per step (K, V, dK, dV; only dK, dV at the last):",
      [e.bytes_sent for e in events if e.rank == 0])


# %% [markdown]
# ## 6. Memory per rank falls as 1/R
#
# Each rank holds its queries and output ($Q_r$, $O_r$: $\tfrac{N}{R} H E$ numbers each), its own
# keys and values, the block in hand and the block arriving ($3 \times 2 \times \tfrac{N}{R} H_{kv}
# E$), and FlashAttention's tiles (independent of $N$). One device running FlashAttention over the
# whole sequence holds $N (2H + 2H_{kv}) E$. Everything that grows with $N$ is divided by $R$. For one
# layer of a Llama-3-70B-shaped attention ($H = 64$, $H_{kv} = 8$, $E = 128$, bfloat16), batch 1:

# %%
def ring_bytes_per_rank(N, R, H=64, H_kv=8, E=128, bytes_per=2):
    # Q_r, O_r, and K, V three times over (own, in hand, arriving); once when R = 1 (no ring)
    kv_copies = np.where(np.asarray(R) > 1, 3, 1)
    return bytes_per * (N / R) * E * (2 * H + kv_copies * 2 * H_kv)


def one_device_bytes(N, H=64, H_kv=8, E=128, bytes_per=2):
    return bytes_per * N * E * (2 * H + 2 * H_kv)


Rs = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
GiB = 2**30
for N in (131072, 1048576):
    print(f"N = {N:>7}: one device {one_device_bytes(N) / GiB:6.1f} GiB; per rank at R = 8, 64, 512: "
          + ", ".join(f"{ring_bytes_per_rank(N, R) / GiB:.3f}" for R in (8, 64, 512)) + " GiB")

# %% [markdown]
# The same, measured: `benchmarks/bench_ring.py` ran the demo with real MPI processes on this
# machine (results stored in `benchmarks/results/ring.json`; float32, 4 heads of size 64, causal,
# zigzag). Per rank: the shards it holds and the peak of the memory `ring_attention` allocated beyond
# them (Python's `tracemalloc`, which sees every NumPy array); for one process: `flash_attention`
# over the whole sequence, measured the same way on the same inputs.

# %%
results = json.loads(Path("../benchmarks/results/ring.json").read_text())
machine = results["machine"]
print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['mpi']}; numpy {machine['numpy']}")
runs = {r["name"]: r for r in results["runs"]}
MiB = 2**20
head = runs["headline"]
conf = head["config"]
worst = max(head["ranks"], key=lambda x: x["inputs_held_bytes"] + x["peak_extra_bytes"])
one = head["one_process"]
print(f"\nN = {conf['seq_len']}, R = {conf['world_size']}, {conf['layout']}, causal, {conf['dtype']}, "
      f"max error vs flash_attention {head['max_abs_error']:.1e}")
print(f"  per rank (largest): inputs {worst['inputs_held_bytes'] / MiB:6.1f} MiB + peak extra "
      f"{worst['peak_extra_bytes'] / MiB:6.1f} MiB = {(worst['inputs_held_bytes'] + worst['peak_extra_bytes']) / MiB:6.1f} MiB")
print(f"  one process:        inputs {one['inputs_held_bytes'] / MiB:6.1f} MiB + peak extra "
      f"{one['peak_extra_bytes'] / MiB:6.1f} MiB = {(one['inputs_held_bytes'] + one['peak_extra_bytes']) / MiB:6.1f} MiB")
print(f"  time: ring {max(x['seconds'] for x in head['ranks']):.1f} s on {conf['world_size']} ranks sharing "
      f"{machine['cores']} cores; one process {one['seconds']:.1f} s")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
ax = axes[0]
for N, style in ((131072, "--"), (1048576, "-")):
    ax.plot(Rs, ring_bytes_per_rank(N, Rs) / GiB, style, marker="o", color="#4c72b0",
            label=f"ring attention, per rank, N = {N // 1024}K")
    ax.axhline(one_device_bytes(N) / GiB, ls=style, color="#c44e52", lw=1,
               label=f"one device, N = {N // 1024}K")
ax.axhline(80e9 / GiB, color="0.3", lw=2, ls=":", label="H100 memory, 80 GB")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("ranks R")
ax.set_ylabel("Q, O, K, V bytes per rank (GiB)")
ax.set_title("Model: one attention layer (H = 64, Hkv = 8, E = 128, bf16)")
ax.legend(fontsize=7, loc="lower left")

ax = axes[1]
measured = [runs[f"memory_vs_R_{R}"] for R in (1, 2, 4)]
labels = [f"R = {r['config']['world_size']}" for r in measured]
inputs = np.array([max(x["inputs_held_bytes"] for x in r["ranks"]) for r in measured]) / MiB
extra = np.array([max(x["peak_extra_bytes"] for x in r["ranks"]) for r in measured]) / MiB
ax.bar(labels, inputs, color="#4c72b0", label="shards held (Q, K, V)")
ax.bar(labels, extra, bottom=inputs, color="#dd8452", label="peak extra in ring_attention")
for i, (a, b) in enumerate(zip(inputs, extra)):
    ax.text(i, a + b, f"{a + b:.0f} MiB", ha="center", va="bottom", fontsize=9)
ax.set_ylim(0, 1.2 * (inputs + extra).max())
ax.set_xlabel(f"ranks (MPI processes), N = {measured[0]['config']['seq_len']} tokens")
ax.set_ylabel("MiB per rank (largest rank)")
ax.set_title(f"Measured on {machine['cores']} CPU cores: float32, H = 4, E = 64")
ax.legend(fontsize=8, loc="upper right")
fig.suptitle("Memory per rank falls as 1/R: modelled for a million tokens (left), measured for 16K (right)")
fig.tight_layout()
save_figure(fig, "../figures/10_memory_per_rank.png")
plt.show()

# %% [markdown]
# The measured extra memory falls more slowly than $1/R$ at first: a rank of a ring also holds the
# key/value block arriving while it computes and the temporaries of the merge, which a single
# process does not need. Both are proportional to $N/R$, so from there on it is $1/R$.
#
# ## 7. When does the transfer hide behind the compute?
#
# At each step a rank computes attention of its $N_r = N/R$ queries against a block of $N_r$ keys and
# sends $N_r$ keys and values. Per step, forward pass, a full block:
#
# $$
# t_{\text{compute}} = \frac{4 N_r^2 E H}{F}, \qquad
# t_{\text{transfer}} = \frac{2 N_r E H_{kv} \nu}{\beta}, \qquad
# \frac{t_{\text{compute}}}{t_{\text{transfer}}} = \frac{2 N_r H \beta}{F H_{kv} \nu},
# $$
#
# with $F$ the FLOP rate, $\beta$ the link bandwidth in bytes per second (one direction: a rank sends to
# one neighbour and receives from the other), $\nu$ bytes per number. The compute grows as $N_r^2$ and
# the transfer as $N_r$, so the transfer hides once the block is long enough:
#
# $$
# N_r \;\ge\; N_r^* = \frac{F\, \nu\, H_{kv}}{2\, H\, \beta}\qquad(\text{with MHA and bfloat16: } N_r^* = F/\beta).
# $$
#
# A zigzag causal step does half a block of work, which doubles $N_r^*$; GQA sends $H/H_{kv}$ times
# less, which divides it. Real hardware, from NVIDIA's public spec sheets: an **H100 SXM** does
# **989 TFLOP/s** of dense BF16 tensor-core math (the datasheet's 1,979 is with 2:4 sparsity); its
# fourth-generation **NVLink** moves **900 GB/s** in total, 450 GB/s each way, between the GPUs of a
# node; between nodes, an **NDR InfiniBand** ConnectX-7 adapter per GPU moves **400 Gb/s = 50 GB/s**
# each way. (A kernel that reaches a fraction of the peak $F$ lowers $N_r^*$ by that fraction.)

# %%
F_H100 = 989e12  # FLOP/s, dense BF16, H100 SXM
LINKS = {"NVLink 4 (450 GB/s each way)": 450e9, "InfiniBand NDR (50 GB/s)": 50e9}


def min_block(F, W, H=64, H_kv=64, bytes_per=2, causal_zigzag=False):
    # N_r* = F ν H_kv / (2 H β), with β = W bytes/s and ν = bytes_per; a zigzag causal step does half a block of work
    return F * bytes_per * H_kv / (2 * H * W) * (2 if causal_zigzag else 1)


print(f"{'link':30s} {'MHA full':>10s} {'MHA causal':>11s} {'GQA 8:1 causal':>15s}   (tokens per device)")
for name, W in LINKS.items():
    print(f"{name:30s} {min_block(F_H100, W):10,.0f} {min_block(F_H100, W, causal_zigzag=True):11,.0f} "
          f"{min_block(F_H100, W, H_kv=8, causal_zigzag=True):15,.0f}")
for N, R in ((1 << 20, 64), (1 << 20, 512)):
    print(f"N = {N:,} tokens on R = {R}: N_r = {N // R:,} tokens per device")

# %% [markdown]
# On this machine the "link" is shared memory between processes and $F$ is NumPy on a CPU core.
# The demo timed both: the compute of each ring step, and one ring pass of a key/value block alone
# (nothing to compute). The runs at $N = 4096 \dots 32768$ on $R = 4$ ranks give $N_r = 1024 \dots
# 8192$ tokens per rank:

# %%
measured_c, t_comp, t_pass = [], [], []
for name in ("steps_N_4096", "steps_N_8192", "memory_vs_R_4", "headline"):
    r = runs[name]
    R_m = r["config"]["world_size"]
    measured_c.append(r["config"]["seq_len"] // R_m)
    # steps 1..R-1 (the diagonal step 0 does a different amount of work); slowest rank
    t_comp.append(np.mean([max(x["compute_s"][s] for x in r["ranks"]) for s in range(1, R_m)]))
    t_pass.append(max(x["pass_seconds"] for x in r["ranks"]))
measured_c, t_comp, t_pass = map(np.array, (measured_c, t_comp, t_pass))
cfg = runs["headline"]["config"]
H_m, E_m, b_m = cfg["heads"], cfg["head_dim"], 4
# a zigzag causal step: two (N_r/2 × N_r/2) chunk pairs = half a block: 2 N_r² E H FLOPs
F_here = np.median(2 * measured_c**2 * E_m * H_m / t_comp)
W_here = np.median(2 * measured_c * E_m * H_m * b_m / t_pass)
for cc, tc, tp in zip(measured_c, t_comp, t_pass):
    print(f"N_r = {cc:5d} tokens per rank: compute {tc * 1e3:8.1f} ms per step, block transfer alone {tp * 1e3:6.2f} ms")
print(f"\nthis machine: F ≈ {F_here / 1e9:.0f} GFLOP/s per rank, β ≈ {W_here / 1e9:.1f} GB/s per rank "
      f"→ N_r* ≈ {min_block(F_here, W_here, H=H_m, H_kv=H_m, bytes_per=b_m, causal_zigzag=True):.0f} tokens")
print(f"an H100 computes {F_H100 / F_here:,.0f}× faster and NVLink moves {450e9 / W_here:,.0f}× faster")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.6), layout="constrained")
ax = axes[0]
Ns = np.logspace(np.log2(32768), 20, 40, base=2)
for R_line, colour in zip((64, 128, 256, 512), RANK_COLOURS):
    ax.plot(Ns, Ns / R_line, color=colour, label=f"N_r = N/R, R = {R_line}")
thresholds = [("NVLink, MHA, causal", min_block(F_H100, 450e9, causal_zigzag=True), "-."),
              ("InfiniBand, MHA, causal", min_block(F_H100, 50e9, causal_zigzag=True), "--"),
              ("InfiniBand, GQA 8:1, causal", min_block(F_H100, 50e9, H_kv=8, causal_zigzag=True), ":")]
for name, threshold, style in thresholds:
    ax.axhline(threshold, color="0.2", ls=style, lw=1.2, label=f"N_r* {name}: {threshold:,.0f}")
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
x_ticks = [2**p for p in range(15, 21)]
ax.set_xticks(x_ticks, [f"{t // 1024}K" if t < 2**20 else "1M" for t in x_ticks])
y_ticks = [2**p for p in range(6, 17, 2)]
ax.set_yticks(y_ticks, [f"{t:,}" for t in y_ticks])
ax.set_xlabel("sequence length N (tokens)")
ax.set_ylabel("tokens per device N_r = N/R")
ax.set_title("H100, causal zigzag: above an N_r* line the transfer is hidden —\n"
             "1M tokens on 64 GPUs: yes (but not MHA over InfiniBand); on 512: no", fontsize=10)
ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
ax.set_ylim(48, 2**16)

ax = axes[1]
cs = np.logspace(np.log2(256), np.log2(16384), 30, base=2)
ax.plot(cs, 2 * cs**2 * E_m * H_m / F_here * 1e3, color="#4c72b0", label=f"compute model, F = {F_here / 1e9:.0f} GFLOP/s")
ax.plot(cs, 2 * cs * E_m * H_m * b_m / W_here * 1e3, color="#dd8452", label=f"transfer model, β = {W_here / 1e9:.1f} GB/s")
ax.plot(measured_c, t_comp * 1e3, "o", color="#4c72b0", label="measured compute per step")
ax.plot(measured_c, t_pass * 1e3, "s", color="#dd8452", label="measured block transfer")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("tokens per rank N_r")
ax.set_ylabel("milliseconds per ring step")
ratio = t_comp / t_pass
ax.set_title(f"Measured here: 4 MPI ranks on {machine['cores']} CPU cores, float32 —\n"
             f"compute is {ratio.min():.0f}–{ratio.max():.0f}× the transfer, so it always hides", fontsize=10)
ax.legend(fontsize=7, loc="upper left")
fig.suptitle("Compute per step ∝ N_r², transfer ∝ N_r: the ring hides communication once blocks are long enough")
save_figure(fig, "../figures/10_compute_vs_comm.png")
plt.show()

# %% [markdown]
# Read the left panel along a coloured line: a million tokens on 64 H100s gives $N_r = 16{,}384$
# tokens per device — enough to hide NVLink transfers easily, and an InfiniBand ring too when GQA
# shrinks the blocks 8×, but not with full multi-head keys and values. On 512 devices $N_r = 2{,}048$:
# the causal ring is then communication-bound even on NVLink. This is why long-context systems
# combine ring attention with other ways to split the work (heads across devices, fewer and larger
# ranks per ring) rather than make the ring ever longer.
#
# On this machine (right) the ratio of compute to bandwidth is very different: a rank computes
# about $10^5$ times slower than an H100 but moves a block only a few hundred times slower than
# NVLink, so $N_r^*$ is a few dozen tokens and every ring step hides its transfer many times over.
#
# ## 8. Measured MPI runs on this machine
#
# The runs of `benchmarks/bench_ring.py`, each `mpiexec -n R python -m attention_ref.ring ...` with
# one BLAS thread per rank. With 4 ranks on 2 cores, ranks share cores: "waiting" includes time a
# rank was ready but not scheduled, so these are facts of this machine, not of a cluster.

# %%
print(f"machine: {machine['cpu']}, {machine['cores']} cores; {machine['mpi']}\n")
print(f"{'run':16s} {'N':>6s} {'R':>2s} {'layout':>10s} {'communication':>13s} | {'slowest rank s':>14s} "
      f"{'computing s':>11s} {'waiting s':>9s}")
for name in ("headline", "memory_vs_R_1", "memory_vs_R_2", "memory_vs_R_4", "contiguous", "sendrecv",
             "steps_N_4096", "steps_N_8192"):
    r = runs[name]
    conf = r["config"]
    ranks = r["ranks"]
    slow = max(ranks, key=lambda x: x["seconds"])
    comp = "" if slow["compute_s"] is None else f"{sum(slow['compute_s']):11.2f}"
    wait = "" if slow["wait_s"] is None else f"{sum(slow['wait_s']):9.2f}"
    print(f"{name:16s} {conf['seq_len']:6d} {conf['world_size']:2d} {conf['layout']:>10s} {conf['communication']:>13s} | "
          f"{slow['seconds']:14.2f} {comp:>11s} {wait:>9s}")

# %%
fig, ax = plt.subplots(figsize=(10, 4.4))
x0, ticks, tick_labels = 0, [], []
for name, label in (("contiguous", "contiguous"), ("memory_vs_R_4", "zigzag")):
    r = runs[name]
    R_m = r["config"]["world_size"]
    for rank in r["ranks"]:
        xs = x0 + np.arange(R_m)
        ax.bar(xs, rank["compute_s"], color="#4c72b0", width=0.8,
               label="computing" if x0 == 0 else None)
        ax.bar(xs, rank["wait_s"], bottom=rank["compute_s"], color="#dd8452", width=0.8,
               label="waiting for the block" if x0 == 0 else None)
        ticks.append(x0 + (R_m - 1) / 2)
        tick_labels.append(f"{label}\nrank {rank['rank']}")
        x0 += R_m + 1
    x0 += 2
ax.set_xticks(ticks)
ax.set_xticklabels(tick_labels, fontsize=8)
ax.set_ylabel("seconds per ring step (bars: steps 0–3)")
N_m = runs["contiguous"]["config"]["seq_len"]
ax.set_title(f"Measured, N = {N_m}, causal, 4 ranks: contiguous ranks wait for rank 3, zigzag ranks do not")
ax.legend(loc="upper right", fontsize=8)
fig.tight_layout()
save_figure(fig, "../figures/10_measured_steps.png")
plt.show()

# %% [markdown]
# The contiguous layout's idle ranks show up as waiting: rank 0 computes only its diagonal block
# and then waits (here mostly at step 1) for neighbours that compute full blocks, and the ring ends
# only when rank 3, which computes at every step, is done. With zigzag every rank computes for about
# the same time at every step and the waits nearly vanish.
# (On 2 shared cores an idle rank hands its core to the busy ones, which softens the contiguous
# layout's penalty here; on dedicated devices idle time is simply lost.)
#
# Here the blocking `Sendrecv` version is no slower than `Isend`/`Irecv`: a block's transfer costs a
# few milliseconds against hundreds of compute, so there is little to hide, and with MPICH's default
# progress a large message moves mostly while a rank is inside an MPI call anyway (true overlap
# needs an asynchronous progress thread or, on GPUs, the copy engines). The non-blocking version
# holds the arriving block during the whole step, which is why its peak memory is higher.
#
# To run it yourself (the virtualenv's `mpiexec` comes with the `mpi` extra, `make test` installs it):
#
# ```bash
# OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 4 .venv/bin/python -m attention_ref.ring \
#     --seq-len 16384 --causal --layout zigzag --backward
# ```
#
# Over MPI, `ring_attention(q, k, v, comm, ...)` runs the steps above on every rank with its
# shards, passing the blocks with non-blocking `Isend`/`Irecv` while it computes;
# `ring_attention_sendrecv` is the readable first version that computes, then passes the block with
# a blocking `Sendrecv`:

# %%
from attention_ref import ring_attention_sendrecv

print(inspect.getsource(ring_attention_sendrecv))

# %% [markdown]
# ## 9. The same code on GPUs
#
# The math in `attention_ref` asks its inputs for their array namespace, so `ring_attention_step`,
# `flash_attention` and `merge_attention_partials` run on CuPy arrays unchanged. `mpi4py` hands CuPy
# arrays to MPI through their CUDA array interface, so with a **CUDA-aware MPI** (Open MPI built with
# UCX and CUDA, MVAPICH2-GDR, or MPICH configured with CUDA) the blocks go GPU to GPU — over NVLink
# inside a node, by GPUDirect RDMA over InfiniBand between nodes — without touching host memory.
# `ring_attention` synchronises the CuPy stream before it hands a buffer to MPI, because MPI does not
# know about CUDA streams. One rank per GPU:
#
# ```python
# import cupy as cp
# from mpi4py import MPI
# from attention_ref import local_shard, ring_attention
#
# comm = MPI.COMM_WORLD
# cp.cuda.Device(comm.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()  # one GPU per rank
# q, k, v = (cp.asarray(local_shard(x, comm.Get_size(), comm.Get_rank(), layout="zigzag"))
#            for x in (q_host, k_host, v_host))
# out = ring_attention(q, k, v, comm, is_causal=True, layout="zigzag")  # CuPy in, CuPy out
# ```
#
# launched as `mpiexec -n 8 python ring_gpu.py` on an 8-GPU node. Production systems do the same
# with NCCL's send/receive instead of MPI (ring-flash-attn uses PyTorch's `torch.distributed`
# point-to-point calls) and fused GPU kernels instead of NumPy-style tiles; the schedule, the merge
# and the zigzag layout are the ones above. (The MPICH wheel used on this CPU machine was not checked
# for CUDA support; without a CUDA-aware build, copy blocks to the host before sending.)
#
# ## Takeaways
#
# * Ring attention is exact: each rank merges per-block results with the logsumexp rule of
#   split-KV decoding, and the simulated and the MPI rings equal whole-sequence attention to float64
#   rounding, forward and backward.
# * Memory per rank is $O(N/R)$: queries, outputs and two key/value blocks in flight.
# * A causal mask makes the contiguous layout take $\approx R$ block-steps while half the ranks idle;
#   zigzag (chunks $r$ and $2R-1-r$) balances it to $\approx R/2$.
# * Compute per step grows as $N_r^2$, the transfer as $N_r$ ($N_r = N/R$): the transfer hides once
#   $N_r \ge F \nu H_{kv} / (2 H \beta)$ — about 2K tokens per H100 over NVLink and 20K over InfiniBand
#   for multi-head attention, doubled for a causal zigzag step, divided by $H/H_{kv}$ with GQA.

# %% [markdown]
# ## Exercises
#
# The checker knows the per-rank step. It hands your function the steps a real ring hands a rank —
# the first step from $O = 0$, $\lambda = -\infty$; later steps with a running $(O, \lambda)$; causal
# blocks that are wholly visible, partly visible or hidden; zigzag shards of two chunks — and names
# the classic mistakes whose answers reproduce yours.

# %%
from attention_ref import merge_attention_partials
from attention_ref.check import check


def chunk_rows(spans):
    """Where each chunk's rows lie in a shard: the chunks one after the other, in the order of spans."""
    starts = np.cumsum([0] + [b - a for a, b in spans])
    return [slice(int(s), int(e)) for s, e in zip(starts[:-1], starts[1:])]


print(chunk_rows([(2, 4), (12, 14)]))  # rank 1 of 4, zigzag, N = 16: rows 0–1 and 2–3


# %% [markdown]
# **1. The per-rank step.** Write
# `ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False)`: attend
# this rank's queries `q` $(\dots, H, L_r, E)$ to the key/value block in hand and merge the result
# into the running `out` $(\dots, H, L_r, E_v)$ and `lse` $(\dots, H, L_r)$. `q_spans` and
# `kv_spans` give the global positions `(start, stop)` of the chunks of `q` and of the block, in the
# order their rows are stored (`chunk_rows` finds the rows). For every pair of a query chunk and a
# key chunk: skip it if the causal mask hides it; otherwise compute
# $(O_b, \lambda_b)$ = `flash_attention(Q_c, K_j, V_j, is_causal=..., return_lse=True)` — with the
# causal mask only for a chunk paired with itself — and merge it into that chunk's running result
# with `merge_attention_partials`. Return the new `(out, lse)` and leave the inputs unchanged.

# %% nbgrader={"grade": false, "grade_id": "ring-step-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False):
    ### BEGIN SOLUTION
    ### STUB # for each query chunk (its rows of q, out, lse) and each key chunk (its rows of the block):
    ### STUB #   skip the pair if the causal mask hides every key from every query, else
    ### STUB #   O_b, λ_b = flash_attention(Q_c, K_j, V_j, is_causal=<the chunk with itself?>, return_lse=True)
    ### STUB #   and merge it into the running (O, λ) of the query chunk with merge_attention_partials
    ### STUB raise NotImplementedError()
    new_out, new_lse = [], []
    for (qa, qb), rows in zip(q_spans, chunk_rows(q_spans)):
        o, lam = out[..., rows, :], lse[..., rows]  # the running (O, λ) of this query chunk
        for (ka, kb), cols in zip(kv_spans, chunk_rows(kv_spans)):
            if is_causal and ka > qb - 1:
                continue  # every key after every query: hidden
            o_b, lam_b = flash_attention(q[..., rows, :], k_blk[..., cols, :], v_blk[..., cols, :],
                                         is_causal=is_causal and (ka, kb) == (qa, qb), return_lse=True)
            o, lam = merge_attention_partials([o, o_b], [lam, lam_b])
        new_out.append(o)
        new_lse.append(lam)
    return np.concatenate(new_out, axis=-2), np.concatenate(new_lse, axis=-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ring-step-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
check(ring_attention_step, "ring_attention_step", raise_on_failure=True)


# %% [markdown]
# **2. Break the merge on purpose.** Copy your step into `broken_step` and replace the merge by a
# plain sum of the partial outputs, `o, lam = o + o_b, np.logaddexp(lam, lam_b)`. Run the checker on
# it (without `raise_on_failure`). Which case fails first, and what does the checker diagnose? Why
# does the first case — the first step of the ring — still pass?

# %% nbgrader={"grade": false, "grade_id": "ring-broken-merge", "locked": false, "schema_version": 3, "solution": true, "task": false}
### BEGIN SOLUTION
def broken_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False):
    new_out, new_lse = [], []
    for (qa, qb), rows in zip(q_spans, chunk_rows(q_spans)):
        o, lam = out[..., rows, :], lse[..., rows]
        for (ka, kb), cols in zip(kv_spans, chunk_rows(kv_spans)):
            if is_causal and ka > qb - 1:
                continue
            o_b, lam_b = flash_attention(q[..., rows, :], k_blk[..., cols, :], v_blk[..., cols, :],
                                         is_causal=is_causal and (ka, kb) == (qa, qb), return_lse=True)
            o, lam = o + o_b, np.logaddexp(lam, lam_b)  # the mistake: no weights e^{λ − λ_new}
        new_out.append(o)
        new_lse.append(lam)
    return np.concatenate(new_out, axis=-2), np.concatenate(new_lse, axis=-1)


check(broken_step, "ring_attention_step")
### END SOLUTION

# %% [markdown] nbgrader={"grade": true, "grade_id": "ring-broken-merge-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# It fails at case 2, "a later step: merge the block into the running (O, λ)", and the checker
# diagnoses "partial outputs added without the logsumexp weights": $O$ and $O_b$ are each averages
# of values, normalised over *different* keys, so they must be weighted by their shares of the
# softmax mass, $e^{\lambda - \lambda_{\text{new}}}$ and $e^{\lambda_b - \lambda_{\text{new}}}$
# (which sum to 1); a sum counts the values twice. At the first step the running result is
# $O = 0$, $\lambda = -\infty$ — the identity of the merge — so $O + O_b = O_b$ happens to be right:
# the mistake only shows once a rank has seen two blocks. (λ stays right, since `np.logaddexp` is
# the correct update of λ.)

# %% [markdown]
# **3. Predict the work per rank.** Causal attention over $N = 16$ tokens on $R = 4$ ranks. Before
# running anything, predict how many logits $z_{ij}$ each rank computes at each step, in the
# contiguous and in the zigzag layout (a chunk paired with itself, $n$ tokens, costs $n(n+1)/2$
# logits; a wholly visible pair of $n$ query and $n'$ key tokens $n n'$; a hidden pair nothing). What is each layout's
# critical path — the sum over steps of the busiest rank's work? Then run the cell below.

# %% [markdown] nbgrader={"grade": true, "grade_id": "ring-work-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# **Contiguous** (4 tokens per rank): at step 0 every rank computes its diagonal block, 10 logits.
# At step $s \ge 1$ rank $r$ holds the block of rank $r - s$, which lies in its past only if
# $s \le r$: 16 logits, otherwise 0. Rank 0: 10, 0, 0, 0; rank 1: 10, 16, 0, 0; rank 2: 10, 16,
# 16, 0; rank 3: 10, 16, 16, 16. Critical path $10 + 3 \cdot 16 = 58$ logits.
# **Zigzag** (chunks of 2 tokens, rank $r$ holds chunks $r$ and $7 - r$): at step 0 two diagonal
# pairs (3 each) and the late chunk against the early one (4): 10 on every rank. At every later
# step exactly two $2 \times 2$ pairs are visible on every rank: 8. Critical path
# $10 + 3 \cdot 8 = 34 = 136 / 4$, the ideal; both layouts compute $16 \cdot 17 / 2 = 136$ logits
# in all.

# %%
x16 = rng.standard_normal((1, 1, 16, 4))
for layout in ("contiguous", "zigzag"):
    _, events = simulate_ring_attention(x16, x16, x16, 4, is_causal=True, layout=layout)
    work = np.zeros((4, 4), dtype=int)  # [step, rank]
    for e in events:
        work[e.step, e.rank] = e.work
    print(f"{layout}: logits per step (rows) and rank (columns)\n{work}\n"
          f"critical path {work.max(axis=1).sum()}, total {work.sum()}\n")

# %% [markdown]
# **4. Change R and watch memory and traffic.** The cell below gives, for one layer of the
# Llama-3-70B-shaped attention of section 6 and $N = 2^{20}$ tokens, the bytes one rank holds
# (`ring_bytes_per_rank`), and from the simulator (a smaller sequence, one head) what one rank sends
# per step and over the whole ring. Change the list of $R$. What is the smallest power of two $R$
# for which one rank holds at most 2 GiB? Memory falls as $1/R$ — does the traffic of a rank fall
# too? Why not?

# %%
x_mem = rng.standard_normal((1, 1, 1024, 64))
print("   R   GiB per rank (N = 1M)   KiB per step, one rank   KiB over the ring, one rank   (N = 1024)")
for R in (1, 2, 4, 8, 16, 32):
    _, events = simulate_ring_attention(x_mem, x_mem, x_mem, R, is_causal=True, layout="zigzag")
    sent = [e.bytes_sent for e in events if e.rank == 0]
    print(f"{R:4d}   {ring_bytes_per_rank(2**20, R) / GiB:20.3f}   {max(sent) / 1024:22.1f}   "
          f"{sum(sent) / 1024:27.1f}")

# %% [markdown] nbgrader={"grade": true, "grade_id": "ring-memory-answer", "locked": false, "points": 1, "schema_version": 3, "solution": true, "task": false}
# On a ring ($R \ge 2$) one rank holds $44\,\text{GiB}/R$ here ($2 \cdot \tfrac{N}{R} \cdot 128 \cdot (2 \cdot 64 +
# 3 \cdot 2 \cdot 8)$ bytes), so $R = 32$ is the smallest power of two under 2 GiB (1.375 GiB; $R =
# 16$ needs 2.75 GiB). A block shrinks as $1/R$, so what a rank sends per step falls as $1/R$ too —
# but it sends $R - 1$ blocks, so over the whole ring each rank still sends $\tfrac{R-1}{R}$ of the
# whole sequence's keys and values: the traffic per rank hardly changes with $R$ (and the total over
# all ranks grows as $R - 1$). Ring attention trades memory for time on the link, which is why the
# transfer must hide behind compute (exercise 5).

# %% [markdown]
# **5. Where does communication stop hiding?** A cluster links its nodes with 200 Gb/s Ethernet
# ($\beta = 25$ GB/s each way); its GPUs do $F = 400$ TFLOP/s of bfloat16. A causal zigzag ring runs
# $H = 32$ query heads of $E = 128$. With `min_block` (section 7) compute $N_r^*$ for multi-head
# attention ($H_{kv} = 32$) and for GQA with $H_{kv} = 4$, and the largest number of ranks $R$ for
# which a sequence of $N = 256\text{K}$ tokens still hides every transfer. Keep them in the dicts
# `N_r_star` and `R_max` (keys `"MHA"`, `"GQA"`). Which would you change first to run on $R = 128$?

# %% nbgrader={"grade": false, "grade_id": "ring-link-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
### BEGIN SOLUTION
F_cluster, W_ethernet, N_long = 400e12, 25e9, 256 * 1024
N_r_star = {name: min_block(F_cluster, W_ethernet, H=32, H_kv=H_kv, causal_zigzag=True)
            for name, H_kv in (("MHA", 32), ("GQA", 4))}
R_max = {name: int(N_long // n) for name, n in N_r_star.items()}  # N_r = N/R must stay ≥ N_r*
for name in N_r_star:
    print(f"{name}: N_r* = {N_r_star[name]:,.0f} tokens per rank → R ≤ {R_max[name]} for N = {N_long:,} "
          f"(N_r = {N_long / R_max[name]:,.0f})")
print(f"at R = 128: N_r = {N_long // 128:,} tokens per rank")
### END SOLUTION

# %% [markdown] nbgrader={"grade": true, "grade_id": "ring-link-answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# $N_r^* = F \nu H_{kv} / (2 H \beta)$, doubled for a causal zigzag step: 32,000 tokens for multi-head
# attention and 4,000 with GQA 8:1. A ring of $R$ ranks gives each $N_r = N/R$ tokens, so with
# $N = 262{,}144$ the transfers hide for $R \le 8$ (MHA) and $R \le 65$ (GQA; 64 as a power of two).
# At $R = 128$, $N_r = 2{,}048$: even the GQA ring would wait for the link about half of every step.
# The first lever is the link: inside a node, NVLink's 450 GB/s lowers $N_r^*$ 18-fold (GQA: 222
# tokens), so rings are laid out within nodes or split across them with other parallelism (heads
# across nodes, a shorter ring per node). Fewer key/value heads help the same way; a faster GPU
# makes it worse.
