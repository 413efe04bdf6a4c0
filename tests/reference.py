"""Float64 references that materialise the full attention matrix with plain NumPy loops over the
batch, written independently of attention_ref so the library can be checked against them."""

from __future__ import annotations

import numpy as np


def reference_attention(q, k, v, allowed=None, bias=None, scale=None):
    """softmax(q kᵀ · scale + bias) v, row by row, in float64.

    q (..., L, E), k (..., S, E), v (..., S, Ev) with equal leading shapes; ``allowed`` a boolean
    (L, S)-broadcastable mask (True = attend); rows with nothing allowed give 0.
    Returns (out, weights).
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    lead = q.shape[:-2]
    L, S = q.shape[-2], k.shape[-2]
    allowed = np.ones(lead + (L, S), bool) if allowed is None else np.broadcast_to(allowed, lead + (L, S))
    bias = np.zeros(lead + (L, S)) if bias is None else np.broadcast_to(bias, lead + (L, S))
    out = np.zeros(lead + (L, v.shape[-1]))
    weights = np.zeros(lead + (L, S))
    for idx in np.ndindex(*lead):
        for i in range(L):
            logits = np.array([q[idx][i] @ k[idx][j] * scale + bias[idx][i, j] for j in range(S)])
            ok = allowed[idx][i] & np.isfinite(logits)
            if not ok.any():
                continue
            e = np.where(ok, np.exp(logits - logits[ok].max()), 0.0)
            weights[idx][i] = e / e.sum()
            out[idx][i] = weights[idx][i] @ v[idx]
    return out, weights
