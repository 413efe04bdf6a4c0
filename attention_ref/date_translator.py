"""Stage 01: a toy translator, human-readable dates -> ISO dates, with Bahdanau attention.

"Friday, 27 November 2026", "27/11/26", "nov 27 2026", "2026 November 27th", ... all become
"2026-11-27". The model is the RNNsearch of Bahdanau, Cho and Bengio 2014 (arXiv:1409.0473,
appendix A), shrunk to a few tens of thousands of parameters:

* encoder (A.2.1): character embeddings, a forward and a backward GRU; the annotation of source
  character j is h_j = [→h_j; ←h_j];
* initial decoder state s_0 = tanh(W_s ←h_1 + b_s);
* at output step i, additive attention with the previous state as the query
  (e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j), α_i = softmax(e_i), c_i = Σ_j α_ij h_j);
* decoder GRU s_i = GRU(s_{i-1}, [Emb y_{i-1}; c_i]) (eq. 4 / A.2.2; Emb: the target embedding);
* output p(y_i | ...) = softmax(s_i W_os + c_i W_oc + b_o) (a linear "deep output", no maxout).

Everything is NumPy: the forward pass keeps what the backward pass needs, the backward pass is
written out by hand (backpropagation through time), and Adam updates the parameters. The output
always has 10 characters, so the decoder runs exactly 10 steps (no end-of-sequence token).

Weight layout: matrices are (in_features, out_features), so ``W_a s`` is ``s @ W_a``. GRU gate
matrices are stacked [update z | reset r | candidate] along the output axis.

Padded source positions (token ``PAD``) do not change the encoder state (the GRU state is carried
over them) and get attention weight exactly 0, so a sentence's translation does not depend on how
much padding its batch needs.
"""

from __future__ import annotations

import datetime as _dt
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from os import PathLike

import numpy as np

__all__ = [
    "SOURCE_CHARS",
    "TARGET_CHARS",
    "DATE_FORMATS",
    "OUTPUT_LENGTH",
    "DateTranslator",
    "Adam",
    "format_date",
    "make_date_dataset",
    "init_date_translator",
    "encode_sources",
    "encode_targets",
    "translator_loss",
    "translator_loss_and_gradients",
    "clip_gradients",
    "greedy_decode",
    "translate",
    "exact_match_accuracy",
    "save_date_translator",
    "load_date_translator",
    "DEFAULT_WEIGHTS",
]

# ----------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------
SOURCE_CHARS = string.digits + string.ascii_letters + " ,./-'"
"""Characters the translator accepts (index 0 of the source vocabulary is the padding token)."""
TARGET_CHARS = "0123456789-"
"""Characters the translator writes (index 0 of the target vocabulary is the start token)."""
OUTPUT_LENGTH = 10
"""len("YYYY-MM-DD")."""

FIRST_DATE = _dt.date(1950, 1, 1)
LAST_DATE = _dt.date(2049, 12, 31)

_MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(day: int) -> str:
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def _parts(d: _dt.date) -> dict[str, str]:
    month, weekday = _MONTHS[d.month - 1], _WEEKDAYS[d.weekday()]
    return {
        "D": str(d.day), "DD": f"{d.day:02d}", "Dth": _ordinal(d.day),
        "M": str(d.month), "MM": f"{d.month:02d}", "Month": month, "Mon": month[:3],
        "YYYY": f"{d.year:04d}", "YY": f"{d.year % 100:02d}",
        "Weekday": weekday, "Wkd": weekday[:3],
    }  # fmt: skip


DATE_FORMATS: dict[str, str] = {
    # day before month
    "weekday_day_month_year": "{Weekday}, {D} {Month} {YYYY}",  # Friday, 27 November 2026
    "day_month_year": "{D} {Month} {YYYY}",  # 27 November 2026
    "wkd_day_mon_year": "{Wkd} {D} {Mon} {YYYY}",  # Fri 27 Nov 2026
    "ordinal_of_month_year": "{Dth} of {Month} {YYYY}",  # 27th of November 2026
    "dd/mm/yy": "{DD}/{MM}/{YY}",  # 27/11/26
    "dd/mm/yyyy": "{DD}/{MM}/{YYYY}",  # 27/11/2026
    "d/m/yyyy": "{D}/{M}/{YYYY}",  # 5/6/2026
    "dd.mm.yyyy": "{DD}.{MM}.{YYYY}",  # 27.11.2026
    "dd-mon-yyyy": "{DD}-{Mon}-{YYYY}",  # 27-Nov-2026
    # month before day
    "mon_day_year": "{Mon} {D} {YYYY}",  # Nov 27 2026
    "month_day_comma_year": "{Month} {D}, {YYYY}",  # November 27, 2026
    "mon_dot_day_comma_year": "{Mon}. {D}, {YYYY}",  # Nov. 27, 2026
    "weekday_month_ordinal_year": "{Weekday}, {Month} {Dth}, {YYYY}",  # Friday, November 27th, 2026
    "wkd_mon_day_year": "{Wkd}, {Mon} {D}, {YYYY}",  # Fri, Nov 27, 2026
    # year first
    "year_month_ordinal": "{YYYY} {Month} {Dth}",  # 2026 November 27th
    "year_mon_day": "{YYYY} {Mon} {D}",  # 2026 Nov 27
    "iso": "{YYYY}-{MM}-{DD}",  # 2026-11-27
}
"""Name -> template of every input format. Numeric formats are day-first ('/' and '.') or ISO,
never month-first, so that no numeric input is ambiguous; the textual ones put the day before the
month, after it, or after the year. ``dd/mm/yy`` reads 50-99 as 19xx and 00-49 as 20xx."""

_CASES = ("as_is", "lower", "upper")
_CASE_PROBS = (0.5, 0.3, 0.2)


def format_date(date: _dt.date, fmt: str, case: str = "as_is") -> str:
    """Write ``date`` in the input format ``fmt`` (a key of :data:`DATE_FORMATS`), with
    ``case`` one of ``"as_is"``, ``"lower"``, ``"upper"``. Returns the string."""
    if fmt not in DATE_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(DATE_FORMATS)}, got {fmt!r}")
    text = DATE_FORMATS[fmt].format(**_parts(date))
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    if case != "as_is":
        raise ValueError(f"case must be 'as_is', 'lower' or 'upper', got {case!r}")
    return text


def _random_dates(rng: np.random.Generator, n: int) -> list[_dt.date]:
    span = (LAST_DATE - FIRST_DATE).days + 1
    return [FIRST_DATE + _dt.timedelta(days=int(k)) for k in rng.integers(0, span, size=n)]


def make_date_dataset(n: int, seed: int | Sequence[int] = 0) -> list[tuple[str, str]]:
    """``n`` (input, target) pairs, e.g. ("Fri 27 Nov 2026", "2026-11-27").

    Dates are uniform over 1950-01-01 .. 2049-12-31, the format uniform over
    :data:`DATE_FORMATS`, the case "as is" / lower / upper with probabilities 0.5 / 0.3 / 0.2.
    This is exactly the distribution the training command samples from; a different ``seed``
    gives an independent sample (the training run draws its batches from its own seed).
    """
    if not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = np.random.default_rng(seed)
    dates = _random_dates(rng, n)
    names = list(DATE_FORMATS)
    fmts = rng.integers(0, len(names), size=n)
    cases = rng.choice(len(_CASES), size=n, p=_CASE_PROBS)
    return [
        (format_date(d, names[f], _CASES[c]), d.isoformat())
        for d, f, c in zip(dates, fmts, cases, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
PARAM_NAMES = (
    "src_embed",  # (Vs, m)      source character embeddings (row 0: padding)
    "enc_fwd_W", "enc_fwd_U", "enc_fwd_b",  # forward GRU: (m, 3n), (n, 3n), (3n,)
    "enc_bwd_W", "enc_bwd_U", "enc_bwd_b",  # backward GRU
    "init_W", "init_b",  # s_0 = tanh(←h_1 W_s + b_s): (n, d), (d,)
    "att_W", "att_U", "att_v",  # additive attention: W_a (d, a), U_a (2n, a), v_a (a,)
    "tgt_embed",  # (Vt, mt)     target character embeddings (row 0: start token)
    "dec_W_y", "dec_W_c", "dec_U", "dec_b",  # decoder GRU: (mt, 3d), (2n, 3d), (d, 3d), (3d,)
    "out_W_s", "out_W_c", "out_b",  # logits = s_i W_os + c_i W_oc + b_o: (d, Vt), (2n, Vt), (Vt,)
)  # fmt: skip


@dataclass
class DateTranslator:
    """The parameters of the encoder-decoder and its two vocabularies.

    ``params`` maps the names in ``PARAM_NAMES`` to NumPy arrays (all of one float dtype);
    ``source_chars`` / ``target_chars`` are the characters with ids 1, 2, ... (id 0 is the
    padding token of the source and the start token of the target).
    """

    params: dict[str, np.ndarray]
    source_chars: str = SOURCE_CHARS
    target_chars: str = TARGET_CHARS
    output_length: int = OUTPUT_LENGTH
    _src_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [k for k in PARAM_NAMES if k not in self.params]
        if missing:
            raise ValueError(f"params is missing {missing}")
        self._src_index = {ch: i + 1 for i, ch in enumerate(self.source_chars)}

    @property
    def sizes(self) -> dict[str, int]:
        """The layer sizes: embed, encoder (per direction), decoder, attention (the alignment size
        Da of stage 01) and target_embed."""
        p = self.params
        return {
            "embed": p["src_embed"].shape[1],
            "encoder": p["enc_fwd_U"].shape[0],
            "decoder": p["dec_U"].shape[0],
            "attention": p["att_v"].shape[0],
            "target_embed": p["tgt_embed"].shape[1],
        }

    @property
    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))


def init_date_translator(
    rng: np.random.Generator,
    *,
    embed: int = 24,
    encoder: int = 48,
    decoder: int = 64,
    attention: int = 48,
    target_embed: int = 16,
    source_chars: str = SOURCE_CHARS,
    target_chars: str = TARGET_CHARS,
    output_length: int = OUTPUT_LENGTH,
    dtype: type = np.float32,
) -> DateTranslator:
    """A freshly initialised translator: weights ~ N(0, 1/fan_in), biases 0, embeddings N(0, 1/embed)...
    scaled so that activations start in the linear range of tanh/sigmoid."""
    m, n, d, a, mt = embed, encoder, decoder, attention, target_embed
    vs, vt = len(source_chars) + 1, len(target_chars) + 1

    def w(fan_in: int, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    params = {
        "src_embed": w(m, vs, m),
        "enc_fwd_W": w(m, m, 3 * n), "enc_fwd_U": w(n, n, 3 * n), "enc_fwd_b": zeros(3 * n),
        "enc_bwd_W": w(m, m, 3 * n), "enc_bwd_U": w(n, n, 3 * n), "enc_bwd_b": zeros(3 * n),
        "init_W": w(n, n, d), "init_b": zeros(d),
        "att_W": w(d, d, a), "att_U": w(2 * n, 2 * n, a), "att_v": w(a, a),
        "tgt_embed": w(mt, vt, mt),
        "dec_W_y": w(mt + 2 * n, mt, 3 * d), "dec_W_c": w(mt + 2 * n, 2 * n, 3 * d),
        "dec_U": w(d, d, 3 * d), "dec_b": zeros(3 * d),
        "out_W_s": w(d + 2 * n, d, vt), "out_W_c": w(d + 2 * n, 2 * n, vt), "out_b": zeros(vt),
    }  # fmt: skip
    params["src_embed"][0] = 0.0  # the padding row is never read by a real position
    return DateTranslator(params, source_chars, target_chars, output_length)


# ----------------------------------------------------------------------------------------------
# encoding text
# ----------------------------------------------------------------------------------------------
def _as_text_list(texts: str | Sequence[str], name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or isinstance(texts, bytes):
        raise TypeError(f"{name} must be a string or a sequence of strings, got {type(texts)}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: give at least one date")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{name}[{i}] is an empty (or blank) string")
    return texts


def encode_sources(model: DateTranslator, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Character ids of the inputs, right-padded with 0: ``(ids (B, S) int64, mask (B, S) bool)``
    with S the longest input (the keys of attention) and mask True on real characters.

    Raises ValueError naming any character outside the source vocabulary.
    """
    texts = _as_text_list(texts)
    index = model._src_index
    unknown = sorted({ch for t in texts for ch in t if ch not in index})
    if unknown:
        raise ValueError(
            f"texts contain characters the translator does not know: {unknown}; "
            f"it reads only {model.source_chars!r}"
        )
    T = max(len(t) for t in texts)
    ids = np.zeros((len(texts), T), dtype=np.int64)
    for b, t in enumerate(texts):
        ids[b, : len(t)] = [index[ch] for ch in t]
    return ids, ids > 0


def encode_targets(model: DateTranslator, targets: Sequence[str]) -> np.ndarray:
    """Target ids (B, output_length) of ISO strings (ids 1.. index ``target_chars``)."""
    index = {ch: i + 1 for i, ch in enumerate(model.target_chars)}
    out = np.zeros((len(targets), model.output_length), dtype=np.int64)
    for b, t in enumerate(targets):
        if len(t) != model.output_length or any(ch not in index for ch in t):
            raise ValueError(
                f"targets[{b}] = {t!r} is not a {model.output_length}-character ISO date"
            )
        out[b] = [index[ch] for ch in t]
    return out


# ----------------------------------------------------------------------------------------------
# forward and backward pieces
# ----------------------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _gru_step(xw: np.ndarray, h: np.ndarray, U: np.ndarray) -> tuple[np.ndarray, tuple]:
    """One GRU step (Cho et al. 2014; Bahdanau et al. A.1.1) given the input part ``xw = x W + b``
    (B, 3n) and the state h (B, n): z = σ(.), r = σ(.), h̃ = tanh(xW_h + (r∘h) U_h),
    h' = (1 - z)∘h + z∘h̃. Returns h' and the values the backward step needs."""
    n = h.shape[1]
    hu = h @ U[:, : 2 * n]
    z = _sigmoid(xw[:, :n] + hu[:, :n])
    r = _sigmoid(xw[:, n : 2 * n] + hu[:, n:])
    rh = r * h
    cand = np.tanh(xw[:, 2 * n :] + rh @ U[:, 2 * n :])
    return h + z * (cand - h), (h, z, r, rh, cand)


def _gru_step_backward(
    dh_new: np.ndarray, cache: tuple, U: np.ndarray, dU: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Backward of :func:`_gru_step`: given dL/dh', accumulate dL/dU into ``dU`` and return
    (dL/dxw (B, 3n), dL/dh (B, n))."""
    h, z, r, rh, cand = cache
    n = h.shape[1]
    dz = dh_new * (cand - h)
    dh = dh_new * (1.0 - z)
    da_cand = dh_new * z * (1.0 - cand * cand)  # through tanh
    dU[:, 2 * n :] += rh.T @ da_cand
    drh = da_cand @ U[:, 2 * n :].T
    dh += drh * r
    da_zr = np.concatenate([dz * z * (1.0 - z), drh * h * r * (1.0 - r)], axis=1)
    dU[:, : 2 * n] += h.T @ da_zr
    dh += da_zr @ U[:, : 2 * n].T
    return np.concatenate([da_zr, da_cand], axis=1), dh


def _encode_direction(
    xw: np.ndarray, mask: np.ndarray, U: np.ndarray, reverse: bool
) -> tuple[np.ndarray, list]:
    """Run one encoder GRU over time. xw (B, T, 3n); padded steps carry the state over."""
    B, T, _ = xw.shape
    n = U.shape[0]
    h = np.zeros((B, n), dtype=xw.dtype)
    out = np.empty((B, T, n), dtype=xw.dtype)
    caches: list = [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        h_new, caches[t] = _gru_step(xw[:, t], h, U)
        h = np.where(mask[:, t, None], h_new, h)
        out[:, t] = h
    return out, caches


def _encode_direction_backward(
    d_out: np.ndarray, mask: np.ndarray, U: np.ndarray, dU: np.ndarray, caches: list, reverse: bool
) -> np.ndarray:
    """Backward of :func:`_encode_direction`: returns dL/dxw (B, T, 3n)."""
    B, T, n = d_out.shape
    dxw = np.zeros((B, T, 3 * n), dtype=d_out.dtype)
    dh = np.zeros((B, n), dtype=d_out.dtype)
    for t in range(T) if reverse else reversed(range(T)):
        dh = dh + d_out[:, t]
        m = mask[:, t, None]
        dxw_t, dh_prev = _gru_step_backward(np.where(m, dh, 0.0), caches[t], U, dU)
        dxw[:, t] = dxw_t
        dh = np.where(m, dh_prev, dh)
    return dxw


def _encode(p: dict[str, np.ndarray], src: np.ndarray, mask: np.ndarray) -> dict:
    """Encoder: annotations H (B, T, 2n), U_a h_j (B, T, a), s_0 (B, d), plus caches."""
    x = p["src_embed"][src]  # (B, T, m)
    hf, cf = _encode_direction(x @ p["enc_fwd_W"] + p["enc_fwd_b"], mask, p["enc_fwd_U"], False)
    hb, cb = _encode_direction(x @ p["enc_bwd_W"] + p["enc_bwd_b"], mask, p["enc_bwd_U"], True)
    H = np.concatenate([hf, hb], axis=-1)
    s0 = np.tanh(hb[:, 0] @ p["init_W"] + p["init_b"])  # s_0 = tanh(W_s ←h_1)
    return {"x": x, "H": H, "keys": H @ p["att_U"], "s0": s0, "hb0": hb[:, 0], "cf": cf, "cb": cb}


def _attend(
    p: dict[str, np.ndarray], s: np.ndarray, H: np.ndarray, keys: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Additive attention for one output step (the NumPy twin of
    :func:`attention_ref.bahdanau.additive_attention`): returns c (B, 2n), α (B, T) and the
    tanh activations (B, T, a) for the backward pass."""
    hidden = np.tanh(keys + (s @ p["att_W"])[:, None, :])  # tanh(W_a s_{i-1} + U_a h_j)
    e = np.where(mask, hidden @ p["att_v"], -np.inf)  # e_ij; padding -> -inf
    e = np.exp(e - e.max(axis=1, keepdims=True))  # every row has a real character
    alpha = e / e.sum(axis=1, keepdims=True)
    context = (alpha[:, None, :] @ H)[:, 0]  # c_i = Σ_j α_ij h_j
    return context, alpha, hidden


def _decoder_step(
    p: dict[str, np.ndarray], s: np.ndarray, y_prev: np.ndarray, enc: dict, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """s_{i-1}, y_{i-1} -> s_i, c_i, α_i (attention uses s_{i-1}, as in the paper)."""
    context, alpha, hidden = _attend(p, s, enc["H"], enc["keys"], mask)
    xw = p["tgt_embed"][y_prev] @ p["dec_W_y"] + context @ p["dec_W_c"] + p["dec_b"]
    s_new, gru_cache = _gru_step(xw, s, p["dec_U"])
    return s_new, context, alpha, (hidden, gru_cache)


def _forward(model: DateTranslator, src: np.ndarray, mask: np.ndarray, tgt: np.ndarray) -> tuple:
    """Teacher-forced forward pass: logits (B, L, Vt), alignments (B, L, T) and the cache."""
    p = model.params
    B, L = tgt.shape
    enc = _encode(p, src, mask)
    y_in = np.concatenate([np.zeros((B, 1), dtype=tgt.dtype), tgt[:, :-1]], axis=1)  # start token
    s = enc["s0"]
    states, contexts, alphas, caches = [], [], [], []
    prev_states = []
    for i in range(L):
        prev_states.append(s)
        s, context, alpha, cache = _decoder_step(p, s, y_in[:, i], enc, mask)
        states.append(s)
        contexts.append(context)
        alphas.append(alpha)
        caches.append(cache)
    S, C = np.stack(states, axis=1), np.stack(contexts, axis=1)
    logits = S @ p["out_W_s"] + C @ p["out_W_c"] + p["out_b"]
    cache = {"enc": enc, "y_in": y_in, "S": S, "C": C, "prev": prev_states, "dec": caches}
    return logits, np.stack(alphas, axis=1), cache


def _cross_entropy(logits: np.ndarray, tgt: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over all output characters and dL/dlogits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    count = tgt.size
    dlogits = np.exp(logp)
    np.put_along_axis(
        dlogits, tgt[..., None], np.take_along_axis(dlogits, tgt[..., None], -1) - 1, -1
    )
    return float(-picked.sum() / count), dlogits / count


def _check_batch(model: DateTranslator, src: np.ndarray, mask: np.ndarray, tgt: np.ndarray) -> None:
    if src.ndim != 2 or mask.shape != src.shape or tgt.ndim != 2 or tgt.shape[0] != src.shape[0]:
        raise ValueError(
            f"src (B, T), mask (B, T) and tgt (B, L) must agree, got shapes {src.shape}, "
            f"{mask.shape}, {tgt.shape}"
        )
    if not mask[:, 0].all():
        raise ValueError("every source sentence needs at least one character (mask[:, 0] is False)")


def translator_loss(
    model: DateTranslator, src: np.ndarray, mask: np.ndarray, tgt: np.ndarray
) -> float:
    """Mean per-character cross-entropy (teacher forcing) of a batch: src/mask (B, S), tgt (B, L)."""
    _check_batch(model, src, mask, tgt)
    logits, _, _ = _forward(model, src, mask, tgt)
    return _cross_entropy(logits, tgt)[0]


def translator_loss_and_gradients(
    model: DateTranslator, src: np.ndarray, mask: np.ndarray, tgt: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """The loss of :func:`translator_loss` and its gradient with respect to every parameter,
    by backpropagation through time written out by hand. Returns ``(loss, grads)`` with
    ``grads[name]`` shaped like ``model.params[name]``."""
    _check_batch(model, src, mask, tgt)
    p = model.params
    logits, alphas, cache = _forward(model, src, mask, tgt)
    loss, dlogits = _cross_entropy(logits, tgt)
    g = {k: np.zeros_like(v) for k, v in p.items()}
    S, C, H = cache["S"], cache["C"], cache["enc"]["H"]
    B, L, Vt = dlogits.shape
    d, n2 = S.shape[-1], H.shape[-1]

    # output layer, all steps at once
    g["out_W_s"] = S.reshape(-1, d).T @ dlogits.reshape(-1, Vt)
    g["out_W_c"] = C.reshape(-1, n2).T @ dlogits.reshape(-1, Vt)
    g["out_b"] = dlogits.sum(axis=(0, 1))
    dH, dkeys, dxw_all, ds = _decoder_backward(p, g, cache, alphas, dlogits @ p["out_W_s"].T,
                                               dlogits @ p["out_W_c"].T)

    # decoder inputs: y_{i-1} embeddings
    y_in = cache["y_in"]
    ye = p["tgt_embed"][y_in]
    g["dec_W_y"] = ye.reshape(-1, ye.shape[-1]).T @ dxw_all.reshape(-1, dxw_all.shape[-1])
    g["dec_b"] = dxw_all.sum(axis=(0, 1))
    np.add.at(g["tgt_embed"], y_in, dxw_all @ p["dec_W_y"].T)
    _encoder_backward(p, g, cache["enc"], src, mask, dH, dkeys, ds)
    return loss, g


def _decoder_backward(p: dict, g: dict, cache: dict, alphas: np.ndarray, dS: np.ndarray, dC: np.ndarray) -> tuple:
    """The decoder, backwards in time: accumulates into ``g`` and returns dH, d(U_a h), the GRU
    input gradients of every step and d s_0."""
    S, C, H, keys = cache["S"], cache["C"], cache["enc"]["H"], cache["enc"]["keys"]
    B, L = dS.shape[:2]
    dH = np.zeros_like(H)
    dkeys = np.zeros_like(keys)
    dxw_all = np.empty((B, L, p["dec_U"].shape[1]), dtype=S.dtype)
    ds = np.zeros_like(cache["enc"]["s0"])
    for i in reversed(range(L)):
        hidden, gru_cache = cache["dec"][i]
        dxw, ds_prev = _gru_step_backward(ds + dS[:, i], gru_cache, p["dec_U"], g["dec_U"])
        dxw_all[:, i] = dxw
        context, alpha = C[:, i], alphas[:, i]
        g["dec_W_c"] += context.T @ dxw
        dcontext = dC[:, i] + dxw @ p["dec_W_c"].T
        # c = Σ_j α_j h_j
        dalpha = (H @ dcontext[:, :, None])[:, :, 0]
        dH += alpha[:, :, None] * dcontext[:, None, :]
        # α = softmax(e): de = α ∘ (dα - Σ α dα); masked positions have α = 0 -> de = 0
        de = alpha * (dalpha - (alpha * dalpha).sum(axis=1, keepdims=True))
        g["att_v"] += (de.reshape(1, -1) @ hidden.reshape(-1, hidden.shape[-1]))[0]
        dpre = de[:, :, None] * p["att_v"] * (1.0 - hidden * hidden)  # through tanh
        dkeys += dpre
        dq = dpre.sum(axis=1)  # d(W_a s_{i-1})
        g["att_W"] += cache["prev"][i].T @ dq
        ds = ds_prev + dq @ p["att_W"].T
    return dH, dkeys, dxw_all, ds


def _encoder_backward(p: dict, g: dict, enc: dict, src: np.ndarray, mask: np.ndarray, dH: np.ndarray,
                      dkeys: np.ndarray, ds: np.ndarray) -> None:
    """s_0, the keys U_a h, the encoder GRUs and the source embeddings, backwards: into ``g``."""
    H, n2 = enc["H"], enc["H"].shape[-1]
    # s_0 = tanh(←h_1 W_s + b_s)
    da0 = ds * (1.0 - enc["s0"] ** 2)
    g["init_W"] = enc["hb0"].T @ da0
    g["init_b"] = da0.sum(axis=0)

    # keys = H U_a
    g["att_U"] = H.reshape(-1, n2).T @ dkeys.reshape(-1, dkeys.shape[-1])
    dH = dH + dkeys @ p["att_U"].T
    n = n2 // 2
    dHf, dHb = dH[..., :n], dH[..., n:].copy()
    dHb[:, 0] += da0 @ p["init_W"].T

    # encoder GRUs and source embeddings
    x = enc["x"]
    m = x.shape[-1]
    dx = np.zeros_like(x)
    for name, d_out, caches, reverse in (
        ("fwd", dHf, enc["cf"], False),
        ("bwd", dHb, enc["cb"], True),
    ):
        U = p[f"enc_{name}_U"]
        dxw = _encode_direction_backward(d_out, mask, U, g[f"enc_{name}_U"], caches, reverse)
        g[f"enc_{name}_W"] = x.reshape(-1, m).T @ dxw.reshape(-1, dxw.shape[-1])
        g[f"enc_{name}_b"] = dxw.sum(axis=(0, 1))
        dx += dxw @ p[f"enc_{name}_W"].T
    np.add.at(g["src_embed"], src, dx)


def clip_gradients(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``
    (Pascanu et al. 2013). Returns the norm before clipping."""
    norm = float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())))
    if norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


@dataclass
class Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1) for a dict of NumPy parameters, updated in place."""

    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    t: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def step(
        self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float | None = None
    ) -> None:
        """w ← w − lr · m̂ / (√v̂ + ε) for every parameter w, with bias-corrected moments m̂, v̂."""
        lr = self.lr if lr is None else lr
        self.t += 1
        c1, c2 = 1.0 - self.beta1**self.t, 1.0 - self.beta2**self.t
        for k, g in grads.items():
            if k not in self.m:
                self.m[k], self.v[k] = np.zeros_like(g), np.zeros_like(g)
            m, v = self.m[k], self.v[k]
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            params[k] -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
def greedy_decode(
    model: DateTranslator, src: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding: at every step feed back the most likely character.

    src, mask: (B, S) from :func:`encode_sources`. Returns (ids (B, L) into ``[start] +
    target_chars``, alignments (B, L, S)) with L = ``model.output_length``.
    """
    p = model.params
    B = src.shape[0]
    enc = _encode(p, src, mask)
    s = enc["s0"]
    y = np.zeros(B, dtype=np.int64)
    out, alphas = [], []
    for _ in range(model.output_length):
        s, context, alpha, _ = _decoder_step(p, s, y, enc, mask)
        logits = s @ p["out_W_s"] + context @ p["out_W_c"] + p["out_b"]
        logits[:, 0] = -np.inf  # never emit the start token
        y = logits.argmax(axis=1)
        out.append(y)
        alphas.append(alpha)
    return np.stack(out, axis=1), np.stack(alphas, axis=1)


def translate(
    model: DateTranslator, texts: str | Sequence[str]
) -> tuple[str, np.ndarray] | tuple[list[str], list[np.ndarray]]:
    """Translate human-readable dates to ISO "YYYY-MM-DD" with greedy decoding.

    ``texts`` is one string or a sequence of strings. Returns ``(isos, alignments)``: the ISO
    strings and, for each, its alignment matrix α of shape (10 output characters, len(text)
    input characters) — row i is the attention over the input when writing output character i
    (rows sum to 1). For a single string, returns one string and one matrix.

    Raises ValueError for an empty input or characters outside ``model.source_chars`` (named in
    the message), TypeError for non-strings. Inputs far from the training formats give
    confident nonsense: the model only knows :data:`DATE_FORMATS`.
    """
    single = isinstance(texts, str)
    texts = _as_text_list(texts)
    src, mask = encode_sources(model, texts)
    ids, alphas = greedy_decode(model, src, mask)
    chars = "\0" + model.target_chars
    isos = ["".join(chars[k] for k in row) for row in ids]
    aligns = [alphas[b, :, : len(t)].copy() for b, t in enumerate(texts)]
    if single:
        return isos[0], aligns[0]
    return isos, aligns


def exact_match_accuracy(
    model: DateTranslator, pairs: Sequence[tuple[str, str]], batch_size: int = 1000
) -> float:
    """Fraction of (input, target) pairs whose whole ISO translation is right."""
    if len(pairs) == 0:
        raise ValueError("pairs is empty: accuracy over no examples is undefined")
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        isos, _ = translate(model, [src for src, _ in chunk])
        correct += sum(iso == tgt for iso, (_, tgt) in zip(isos, chunk, strict=True))
    return correct / len(pairs)


# ----------------------------------------------------------------------------------------------
# saving and loading
# ----------------------------------------------------------------------------------------------
DEFAULT_WEIGHTS = "data/date_translator.npz"
"""Where the committed weights live inside the package."""


def save_date_translator(
    model: DateTranslator, path: str | PathLike, dtype: type = np.float32
) -> None:
    """Write the model to a compressed ``.npz`` (parameters as ``dtype``, vocabularies as strings)."""
    arrays = {k: v.astype(dtype) for k, v in model.params.items()}
    np.savez_compressed(
        path,
        **arrays,
        meta_source_chars=np.array(model.source_chars),
        meta_target_chars=np.array(model.target_chars),
        meta_output_length=np.array(model.output_length),
    )


def load_date_translator(path: str | PathLike | None = None) -> DateTranslator:
    """Load a translator saved by :func:`save_date_translator`; by default the committed model
    ``attention_ref/data/date_translator.npz`` (regenerate it with
    ``python -m attention_ref.train_bahdanau``)."""
    if path is None:
        ref = resources.files("attention_ref").joinpath(DEFAULT_WEIGHTS)
        with resources.as_file(ref) as real_path:
            return load_date_translator(real_path)
    with np.load(path, allow_pickle=False) as f:
        params = {k: f[k] for k in PARAM_NAMES}
        return DateTranslator(
            params,
            source_chars=str(f["meta_source_chars"]),
            target_chars=str(f["meta_target_chars"]),
            output_length=int(f["meta_output_length"]),
        )
