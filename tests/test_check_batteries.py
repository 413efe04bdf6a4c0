"""The checker's batteries: the library's own functions pass every case; implementations written as
a student would pass too; and each classic mistake, written into an otherwise correct function,
fails with that mistake's diagnosis (found by the checker computing the mistake, not guessing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.check import battery_names, check

CHECKED = [
    "softmax", "masked_softmax", "online_softmax", "additive_attention", "scaled_dot_product_attention",
    "self_attention", "multi_head_attention", "flash_attention", "flash_attention_backward",
    "merge_attention_partials", "decode_step",
]


def test_every_course_function_has_a_battery():
    assert set(CHECKED) <= set(battery_names())


@pytest.mark.parametrize("name", battery_names())
def test_the_library_passes_every_case_bonus_included(name):
    # A battery is named after the library function it checks (later stages' batteries included).
    result = check(getattr(ar, name), name)
    assert result.passed, result.report()
    assert all(r.status == "pass" for r in result.results), result.report()
    assert "PASS" in result.report().splitlines()[0]


def first_failure(result):
    """The first failing case, required or bonus (bonus cases run after the required ones)."""
    failing = [r for r in result.results if r.status == "fail"]
    assert failing, f"expected a failure:\n{result.report()}"
    return failing[0]


def assert_diagnosed(fn, name, title, **options):
    """``fn`` fails ``name``'s battery and the first failure is diagnosed as ``title``."""
    result = check(fn, name, **options)
    assert not result.passed, result.report()
    first = first_failure(result)
    assert any(d.startswith(title) for d in first.diagnoses), (
        f"expected the diagnosis {title!r}, got {first.diagnoses}\n{result.report()}"
    )
    assert title in result.report()
    return result


# ---------------------------------------------------------------------------------------------
# softmax, masked_softmax, online_softmax
# ---------------------------------------------------------------------------------------------


def stable_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    total = e.sum(axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1)


def softmax_naive(x, axis=-1):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_axis0(x, axis=-1):
    return stable_softmax(x, axis=0)


def softmax_sum_no_keepdims(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis)


def softmax_global_max(x, axis=-1):
    e = np.exp(x - x.max())
    return e / e.sum(axis=axis, keepdims=True)


def softmax_whole_array(x, axis=-1):
    e = np.exp(x - x.max())
    return e / e.sum()


def softmax_ignores_axis(x, axis=-1):
    return stable_softmax(x)


def softmax_in_place(x, axis=-1):
    x -= np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_promotes(x, axis=-1):
    out = np.zeros(x.shape)  # float64, whatever x is
    out[...] = stable_softmax(x, axis)
    return out


def test_a_student_softmax_passes():
    assert check(stable_softmax, "softmax").passed


@pytest.mark.parametrize(
    "fn, title",
    [
        (softmax_naive, "no max-subtraction"),
        (softmax_axis0, "softmax over the wrong axis"),
        (softmax_sum_no_keepdims, "sum taken without keepdims=True"),
        (softmax_global_max, "subtracted the maximum of the whole array"),
        (softmax_whole_array, "normalised over the whole array"),
        (softmax_ignores_axis, "ignores the `axis` argument"),
        (softmax_in_place, "the input mutated in place"),
        (softmax_promotes, "float32 silently promoted to float64"),
    ],
)
def test_softmax_mistakes_are_diagnosed(fn, title):
    assert_diagnosed(fn, "softmax", title)


def test_the_no_max_diagnosis_shows_a_small_overflowing_input():
    first = check(softmax_naive, "softmax").first_failure
    assert first.case.title.startswith("float32, large logits")
    call, expected, got, sizes = first.smallest
    assert call.args[0].size <= 6
    assert np.isnan(got[0]).any() and np.isfinite(expected[0]).all()


def make_masked_softmax(*, invert=False, after=False, multiply=False, fill=-np.inf, guard=True, stable=True):
    def masked_softmax(x, mask, axis=-1):
        mask = np.broadcast_to(mask, x.shape)
        keep = ~mask if invert else mask
        if after:
            return stable_softmax(x, axis) * keep
        z = x * keep if multiply else np.where(keep, x, fill)
        if stable:
            m = np.max(z, axis=axis, keepdims=True)
            z = z - (np.where(np.isfinite(m), m, 0) if guard else m)
        e = np.exp(z)
        total = e.sum(axis=axis, keepdims=True)
        return e / np.where(total > 0, total, 1) if guard else e / total

    return masked_softmax


def test_a_student_masked_softmax_passes():
    assert check(make_masked_softmax(), "masked_softmax").passed


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(invert=True), "mask convention inverted"),
        (dict(after=True), "mask applied after the softmax"),
        (dict(multiply=True), "logits multiplied by the mask"),
        (dict(fill=-1e9), "masked logits set to a large finite number"),
        (dict(guard=False), "a fully masked row gives NaN"),
        (dict(stable=False), "no max-subtraction"),
    ],
)
def test_masked_softmax_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_masked_softmax(**knobs), "masked_softmax", title)


def make_online_softmax(*, rescale=True, drop_last=False, use_max=True):
    def online_softmax(x, chunk_size):
        n = x.shape[-1]
        m = np.full(x.shape[:-1] + (1,), -np.inf, dtype=x.dtype)
        ell = np.zeros(x.shape[:-1] + (1,), dtype=x.dtype)
        stop = n - n % chunk_size if drop_last else n
        for start in range(0, stop, chunk_size):
            chunk = x[..., start : start + chunk_size]
            m_new = np.maximum(m, chunk.max(axis=-1, keepdims=True)) if use_max else np.zeros_like(m)
            ell = (ell * np.exp(m - m_new) if rescale else ell) + np.exp(chunk - m_new).sum(axis=-1, keepdims=True)
            m = m_new
        return np.exp(x - m) / ell

    return online_softmax


def test_a_student_online_softmax_passes_the_required_cases():
    result = check(make_online_softmax(), "online_softmax")
    assert result.passed, result.report()
    assert "axis" in result.report()  # the axis case is a bonus this student's function skips


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(rescale=False), "online-softmax running sum not rescaled"),
        (dict(drop_last=True), "the last, shorter chunk is left out"),
        (dict(use_max=False), "no max-subtraction"),
    ],
)
def test_online_softmax_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_online_softmax(**knobs), "online_softmax", title)


# ---------------------------------------------------------------------------------------------
# additive_attention
# ---------------------------------------------------------------------------------------------


def make_additive(*, tanh=True, swap=False, context_of="keys", weights="alpha", axis=-1, stable=True,
                  invert=False, guard=True):
    def additive_attention(query, keys, W_a, U_a, v_a, mask=None):
        if swap:
            hidden = (query @ U_a)[..., None, :] + keys @ W_a
        else:
            hidden = (query @ W_a)[..., None, :] + keys @ U_a
        e = (np.tanh(hidden) if tanh else hidden) @ v_a
        keep = np.ones(e.shape, bool) if mask is None else np.broadcast_to(~mask if invert else mask, e.shape)
        z = np.where(keep, e, -np.inf)
        if stable:
            m = z.max(axis=axis, keepdims=True)
            z = z - (np.where(np.isfinite(m), m, 0) if guard else m)
        p = np.exp(z)
        total = p.sum(axis=axis, keepdims=True)
        alpha = p / np.where(total > 0, total, 1) if guard else p / total
        values = keys @ U_a if context_of == "projected" else keys
        w = e if weights == "scores" else alpha
        context = (w[..., None, :] @ values)[..., 0, :]
        return context, alpha

    return additive_attention


def test_a_student_additive_attention_passes_bonus_included():
    result = check(make_additive(), "additive_attention")
    assert all(r.status == "pass" for r in result.results), result.report()


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(tanh=False), "tanh missing"),
        (dict(swap=True), "W_a and U_a swapped"),
        (dict(context_of="projected"), "context built from the projected keys"),
        (dict(weights="scores"), "context built from the scores instead of the weights"),
        (dict(axis=0), "softmax over the wrong axis"),
        (dict(stable=False), "no max-subtraction"),
        (dict(invert=True), "mask convention inverted"),
        (dict(guard=False), "a fully masked row gives NaN"),
    ],
)
def test_additive_attention_mistakes_are_diagnosed(knobs, title):
    # With the mask required, the mask cases count (they are bonus cases by default).
    assert_diagnosed(make_additive(**knobs), "additive_attention", title, options=("mask",))


def test_the_mask_is_a_bonus_unless_the_exercise_requires_it():
    result = check(make_additive(invert=True), "additive_attention")
    assert result.passed, result.report()
    assert any(r.bonus and r.status == "fail" for r in result.results)
    assert "bonus" in result.report() and "mask convention inverted" in result.report()


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------


def make_sdpa(*, tau="sqrt", ignore_scale=False, transpose="swapaxes", swap_qk=False, axis=-1, stable=True,
              invert=False, mask_mode="where", pad_on_queries=False, transpose_mask=False, causal="top_left",
              fill=-np.inf, guard=True, in_place=False, promote=False):
    def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None):
        E = query.shape[-1]
        factor = {"sqrt": 1 / math.sqrt(E), "none": 1.0, "E": 1 / E, "mul": math.sqrt(E)}[tau]
        if scale is not None and not ignore_scale:
            factor = scale
        if promote:
            factor = np.float64(1) / np.sqrt(np.float64(E)) if scale is None else np.float64(scale)
        if in_place:
            query *= factor
            factor = 1.0
        kt = {"swapaxes": np.swapaxes(key, -1, -2), "none": key, ".T": key.T}[transpose]
        z = (key @ np.swapaxes(query, -1, -2)) * factor if swap_qk else (query @ kt) * factor
        L, S = z.shape[-2:]
        keep = np.ones(z.shape, bool)
        if is_causal:
            tri = {"top_left": np.tril(np.ones((L, S), bool)),
                   "bottom_right": np.tril(np.ones((L, S), bool), S - L),
                   "triu": np.triu(np.ones((L, S), bool))}[causal]
            keep = keep & tri
        if attn_mask is not None and attn_mask.dtype == bool:
            m = ~attn_mask if invert else attn_mask
            if (pad_on_queries and m.shape[-2] == 1) or transpose_mask:
                m = np.swapaxes(m, -1, -2)
            if mask_mode == "add":
                z = z + m
            elif mask_mode == "multiply":
                z = z * m
            else:
                keep = keep & m
        elif attn_mask is not None:
            z = z + attn_mask
        z = np.where(keep, z, fill)
        if stable:
            zmax = z.max(axis=axis, keepdims=True)
            z = z - (np.where(np.isfinite(zmax), zmax, 0) if guard else zmax)
        e = np.exp(z)
        total = e.sum(axis=axis, keepdims=True)
        weights = e / np.where(total > 0, total, 1) if guard else e / total
        return weights @ value

    return scaled_dot_product_attention


def test_a_student_sdpa_passes_the_required_cases_and_skips_gqa():
    result = check(make_sdpa(), "scaled_dot_product_attention")
    assert result.passed, result.report()
    assert "enable_gqa" in result.report()
    assert all(r.status == "skipped" for r in result.bonus)


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(tau="none"), "no scale"),
        (dict(tau="E"), "wrong scale: divided by E"),
        (dict(tau="mul"), "wrong scale: multiplied by √E"),
        (dict(ignore_scale=True), "ignores the `scale` argument"),
        (dict(transpose="none"), "K not transposed"),
        (dict(swap_qk=True), "Q and K swapped"),
        (dict(transpose=".T"), "`.T` on a batched array"),
        (dict(axis=-2), "softmax over the wrong axis"),
        (dict(stable=False), "no max-subtraction"),
        (dict(invert=True), "mask convention inverted"),
        (dict(mask_mode="add"), "boolean mask added to the logits"),
        (dict(mask_mode="multiply"), "logits multiplied by the mask"),
        (dict(pad_on_queries=True), "padding mask applied to queries instead of keys"),
        (dict(transpose_mask=True), "attn_mask transposed"),
        (dict(causal="bottom_right"), "causal mask aligned bottom-right where top-left was asked"),
        (dict(causal="triu"), "causal mask built with triu"),
        (dict(guard=False), "a fully masked row gives NaN"),
        (dict(fill=-1e9), "masked logits set to a large finite number"),
        (dict(in_place=True), "the input mutated in place"),
        (dict(promote=True), "float32 silently promoted to float64"),
    ],
)
def test_sdpa_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_sdpa(**knobs), "scaled_dot_product_attention", title)


def test_an_error_names_the_line_and_the_probe_finds_the_mistake():
    result = check(make_sdpa(transpose="none"), "scaled_dot_product_attention")
    first = result.first_failure
    assert first.case.title == "tiny hand-checkable example"
    assert "raised ValueError" in first.problem.message
    assert "test_check_batteries.py, line" in first.problem.message
    assert "seen with" in first.diagnoses[0]


def test_a_narrower_exercise_makes_mask_cases_bonus():
    def sdpa_without_masks(query, key, value):
        return ar.scaled_dot_product_attention(query, key, value)

    assert not check(sdpa_without_masks, "scaled_dot_product_attention").passed
    result = check(sdpa_without_masks, "scaled_dot_product_attention", options=())
    assert result.passed, result.report()
    assert "has no parameter" not in result.report()


# ---------------------------------------------------------------------------------------------
# self_attention and multi_head_attention
# ---------------------------------------------------------------------------------------------


def _attend(q, k, v, tau, keep, axis=-1, stable=True):
    z = tau * (q @ np.swapaxes(k, -1, -2))
    if keep is not None:
        z = np.where(keep, z, -np.inf)
    if stable:
        m = z.max(axis=axis, keepdims=True)
        z = z - np.where(np.isfinite(m), m, 0)
    e = np.exp(z)
    total = e.sum(axis=axis, keepdims=True)
    return (e / np.where(total > 0, total, 1)) @ v


def make_self_attention(*, scale_by="head", bias=True, w_o=True, keys_wq=False, axis=-1, stable=True,
                        invert=False, triu=False, pad_on_queries=False, transpose_mask=False):
    def self_attention(x, params, *, attn_mask=None, is_causal=False):
        def proj(W, b):
            return x @ W + b if bias else x @ W

        q = proj(params.W_q, params.b_q)
        k = proj(params.W_q, params.b_q) if keys_wq else proj(params.W_k, params.b_k)
        v = proj(params.W_v, params.b_v)
        width = params.W_q.shape[0] if scale_by == "d_model" else q.shape[-1]
        tau = 1.0 if scale_by == "none" else 1 / math.sqrt(width)
        L = x.shape[-2]
        keep = np.ones((L, L), bool)
        if is_causal:
            keep = np.triu(keep) if triu else np.tril(keep)
        if attn_mask is not None:
            m = ~attn_mask if invert else attn_mask
            transpose = transpose_mask or (pad_on_queries and m.shape[-2] == 1)
            keep = keep & (np.swapaxes(m, -1, -2) if transpose else m)
        out = _attend(q, k, v, tau, keep, axis, stable)
        return out @ params.W_o + (params.b_o if bias else 0) if w_o else out

    return self_attention


def test_a_student_self_attention_passes_bonus_included():
    result = check(make_self_attention(), "self_attention")
    assert all(r.status == "pass" for r in result.results), result.report()


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(scale_by="d_model"), "scaled by the model width, not the head size"),
        (dict(scale_by="none"), "no scale"),
        (dict(bias=False), "biases ignored"),
        (dict(w_o=False), "output projection W_o missing"),
        (dict(keys_wq=True), "keys projected with W_q"),
        (dict(axis=-2), "softmax over the wrong axis"),
        (dict(stable=False), "no max-subtraction"),
    ],
)
def test_self_attention_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_self_attention(**knobs), "self_attention", title)


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(invert=True), "mask convention inverted"),
        (dict(triu=True), "causal mask built with triu"),
        (dict(pad_on_queries=True), "padding mask applied to queries instead of keys"),
        (dict(transpose_mask=True), "attn_mask transposed"),
    ],
)
def test_self_attention_mask_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_self_attention(**knobs), "self_attention", title, options=("attn_mask", "is_causal"))


def make_mha(*, scale_by="head", bias=True, w_o=True, split="transpose", merge="transpose", kv_heads="repeat",
             invert=False, pad_on_queries=False, stable=True):
    def multi_head_attention(query, key, value, params, num_heads, *, num_kv_heads=None, attn_mask=None,
                             is_causal=False):
        H = num_heads
        Hkv = num_kv_heads or H

        def heads(x, W, b, n):
            y = x @ W + b if bias else x @ W
            *lead, T, D = y.shape
            if split == "reshape":
                return y.reshape(*lead, n, T, D // n)
            return np.swapaxes(y.reshape(*lead, T, n, D // n), -2, -3)

        q = heads(query, params.W_q, params.b_q, H)
        k = heads(key, params.W_k, params.b_k, Hkv)
        v = heads(value, params.W_v, params.b_v, Hkv)
        if Hkv != H:
            pick = np.arange(H) // (H // Hkv) if kv_heads == "repeat" else np.arange(H) % Hkv
            k, v = k[..., pick, :, :], v[..., pick, :, :]
        tau = 1 / math.sqrt(params.W_q.shape[0] if scale_by == "d_model" else q.shape[-1])
        L, S = q.shape[-2], k.shape[-2]
        keep = np.tril(np.ones((L, S), bool)) if is_causal else np.ones((L, S), bool)
        if attn_mask is not None:
            m = ~attn_mask if invert else attn_mask
            keep = keep & (np.swapaxes(m, -1, -2) if pad_on_queries else m)
        o = _attend(q, k, v, tau, keep, stable=stable)
        *lead, _, _, Ev = o.shape
        if merge == "reshape":
            o = o.reshape(*lead, L, H * Ev)
        else:
            o = np.swapaxes(o, -2, -3).reshape(*lead, L, H * Ev)
        if not w_o:
            return o
        return o @ params.W_o + params.b_o if bias else o @ params.W_o

    return multi_head_attention


def test_a_student_multi_head_attention_passes_bonus_included():
    result = check(make_mha(), "multi_head_attention")
    assert all(r.status == "pass" for r in result.results), result.report()


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(scale_by="d_model"), "scaled by the model width, not the head size"),
        (dict(bias=False), "biases ignored"),
        (dict(w_o=False), "output projection W_o missing"),
        (dict(split="reshape"), "heads split with a plain reshape"),
        (dict(merge="reshape"), "heads merged with a plain reshape"),
        (dict(split="reshape", merge="reshape"), "heads split and merged with plain reshapes"),
        (dict(stable=False), "no max-subtraction"),
    ],
)
def test_multi_head_attention_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_mha(**knobs), "multi_head_attention", title)


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(kv_heads="tile"), "GQA heads tiled instead of repeated"),
        (dict(invert=True), "mask convention inverted"),
        (dict(pad_on_queries=True), "padding mask applied to queries instead of keys"),
    ],
)
def test_multi_head_attention_option_mistakes_are_diagnosed(knobs, title):
    options = ("num_kv_heads", "attn_mask", "is_causal")
    assert_diagnosed(make_mha(**knobs), "multi_head_attention", title, options=options)


# ---------------------------------------------------------------------------------------------
# flash_attention, flash_attention_backward, merge_attention_partials
# ---------------------------------------------------------------------------------------------


def make_flash(*, rescale_l=True, rescale_o=True, typo=False, drop_k=False, drop_q=False, use_max=True,
               tau_mode="sqrt", transpose=True, alignment_ok=True, default_blocks=(64, 64), takes_blocks=True):
    def tiled(query, key, value, is_causal, block_q, block_k, causal_alignment):
        L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
        tau = {"sqrt": 1 / math.sqrt(E), "none": 1.0}[tau_mode]
        out = np.zeros(query.shape[:-1] + (value.shape[-1],), dtype=query.dtype)
        q_stop = L - L % block_q if drop_q else L
        k_stop = S - S % block_k if drop_k else S
        offset = S - L if (causal_alignment == "bottom_right" and alignment_ok) else 0
        for i0 in range(0, q_stop, block_q):
            q = query[..., i0 : i0 + block_q, :]
            rows = np.arange(i0, i0 + q.shape[-2])[:, None]
            m = np.full(q.shape[:-1] + (1,), -np.inf, dtype=query.dtype)
            ell = np.zeros_like(m)
            o = np.zeros(q.shape[:-1] + (value.shape[-1],), dtype=query.dtype)
            for j0 in range(0, k_stop, block_k):
                k, v = key[..., j0 : j0 + block_k, :], value[..., j0 : j0 + block_k, :]
                s = tau * (q @ (np.swapaxes(k, -1, -2) if transpose else k))
                if is_causal:
                    cols = np.arange(j0, j0 + k.shape[-2])[None, :]
                    s = np.where(cols <= rows + offset, s, -np.inf)
                m_new = np.maximum(m, s.max(axis=-1, keepdims=True)) if use_max else np.zeros_like(m)
                safe = np.where(np.isfinite(m_new), m_new, 0)
                p = np.exp(s - safe)
                alpha = np.exp(m - safe)
                ell = (alpha * ell if rescale_l else ell) + p.sum(axis=-1, keepdims=True)
                if typo:
                    o = o / alpha + p @ v
                else:
                    o = (alpha * o if rescale_o else o) + p @ v
                m = m_new
            out[..., i0 : i0 + block_q, :] = np.where(ell > 0, o / np.where(ell > 0, ell, 1), 0)
        return out

    if takes_blocks:
        def flash_attention(query, key, value, is_causal=False, *, block_q=64, block_k=64,
                            causal_alignment="top_left"):
            return tiled(query, key, value, is_causal, block_q, block_k, causal_alignment)
    else:
        def flash_attention(query, key, value):
            return tiled(query, key, value, False, *default_blocks, "top_left")
    return flash_attention


def test_a_student_flash_attention_passes():
    result = check(make_flash(), "flash_attention")
    assert result.passed, result.report()
    assert all(r.status == "pass" for r in result.results if r.call and "attn_mask" not in r.call.kwargs
               and "scale" not in r.call.kwargs and "return_lse" not in r.call.kwargs), result.report()


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(rescale_l=False), "online-softmax running sum ℓ not rescaled"),
        (dict(rescale_o=False), "output accumulator O not rescaled"),
        (dict(rescale_l=False, rescale_o=False), "neither ℓ nor O rescaled"),
        (dict(typo=True), "O divided by the rescale factor"),
        (dict(drop_k=True), "the last, shorter key block is skipped"),
        (dict(drop_q=True), "the last, shorter query block is never written"),
        (dict(use_max=False), "no max-subtraction"),
        (dict(tau_mode="none"), "no scale"),
        (dict(transpose=False), "K not transposed"),
    ],
)
def test_flash_attention_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_flash(**knobs), "flash_attention", title)


def test_flash_mistakes_are_found_without_knowing_the_block_size():
    student = make_flash(rescale_l=False, takes_blocks=False, default_blocks=(2, 3))
    assert_diagnosed(student, "flash_attention", "online-softmax running sum ℓ not rescaled")


def test_flash_causal_alignment_mistake_is_diagnosed():
    assert_diagnosed(make_flash(alignment_ok=False), "flash_attention",
                     "causal mask aligned top-left where bottom-right was asked",
                     options=("is_causal", "causal_alignment"))


def make_backward(*, tau_in_grads=True, with_D=True, use_lse=True, alignment_ok=True):
    def flash_attention_backward(query, key, value, out, lse, grad_out, is_causal=False,
                                 causal_alignment="top_left"):
        L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
        tau = 1 / math.sqrt(E)
        z = tau * (query @ np.swapaxes(key, -1, -2))
        if is_causal:
            offset = S - L if (causal_alignment == "bottom_right" and alignment_ok) else 0
            z = np.where(np.tril(np.ones((L, S), bool), offset), z, -np.inf)
        P = np.exp(z - lse[..., None]) if use_lse else np.exp(z)
        dv = np.swapaxes(P, -1, -2) @ grad_out
        dp = grad_out @ np.swapaxes(value, -1, -2)
        D = np.sum(grad_out * out, axis=-1, keepdims=True) if with_D else 0
        ds = P * (dp - D)
        g = tau if tau_in_grads else 1.0
        return g * (ds @ key), g * (np.swapaxes(ds, -1, -2) @ query), dv

    return flash_attention_backward


def test_a_student_flash_attention_backward_passes():
    result = check(make_backward(), "flash_attention_backward")
    assert result.passed, result.report()


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(tau_in_grads=False), "wrong scale: τ missing from dQ and dK"),
        (dict(with_D=False), "D left out"),
        (dict(use_lse=False), "P recomputed without the logsumexp"),
        (dict(alignment_ok=False), "causal mask aligned top-left where bottom-right was asked"),
    ],
)
def test_flash_attention_backward_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_backward(**knobs), "flash_attention_backward", title,
                     options=("is_causal", "causal_alignment"))


def make_merge(*, mode="ok", guard=True):
    def merge_attention_partials(outs, lses):
        o, lam = np.stack(outs), np.stack(lses)
        if mode == "average":
            return o.mean(axis=0), lam.max(axis=0)
        if mode == "naive":
            w = np.exp(lam)
            return (w[..., None] * o).sum(axis=0) / w.sum(axis=0)[..., None], np.log(w.sum(axis=0))
        m = lam.max(axis=0)
        safe = np.where(np.isfinite(m), m, 0) if guard else m
        total = np.exp(lam - safe).sum(axis=0)
        lse = np.where(total > 0, safe + np.log(np.where(total > 0, total, 1)), -np.inf) if guard \
            else safe + np.log(total)
        if mode == "unnormalised":
            return (np.exp(lam - safe)[..., None] * o).sum(axis=0), lse
        w = np.exp(lam - (np.where(np.isfinite(lse), lse, 0) if guard else lse))
        out = (w[..., None] * o).sum(axis=0)
        return out, (m if mode == "lse_max" else lse)

    return merge_attention_partials


def test_a_student_merge_passes():
    assert check(make_merge(), "merge_attention_partials").passed


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(mode="average"), "plain average of the chunks' outputs"),
        (dict(mode="naive"), "no max-subtraction"),
        (dict(mode="unnormalised"), "weights e^{λ_s − max λ} not normalised"),
        (dict(mode="lse_max"), "λ taken as the largest λ_s"),
        (dict(guard=False), "a query masked in every chunk gives NaN"),
    ],
)
def test_merge_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_merge(**knobs), "merge_attention_partials", title)


# ---------------------------------------------------------------------------------------------
# decode_step
# ---------------------------------------------------------------------------------------------


def make_decode(*, append="after", mask="bottom_right", tau_mode="sqrt", stable=True, in_place=False):
    def decode_step(q_new, k_new, v_new, cache):
        if append == "after":
            K, V = np.concatenate([cache.keys, k_new], -2), np.concatenate([cache.values, v_new], -2)
        elif append == "before":
            K, V = np.concatenate([k_new, cache.keys], -2), np.concatenate([v_new, cache.values], -2)
        else:
            K, V = cache.keys, cache.values
        t, S, E = q_new.shape[-2], K.shape[-2], q_new.shape[-1]
        tau = 1 / math.sqrt(E) if tau_mode == "sqrt" else 1.0
        if in_place:
            q_new *= tau
            tau = 1.0
        keep = {"bottom_right": np.tril(np.ones((t, S), bool), S - t), "top_left": np.tril(np.ones((t, S), bool)),
                "none": np.ones((t, S), bool)}[mask]
        out = _attend(q_new, K, V, tau, keep, stable=stable).astype(q_new.dtype)
        return out, ar.KVCache(K, V)

    return decode_step


def test_a_student_decode_step_passes():
    assert check(make_decode(), "decode_step").passed


@pytest.mark.parametrize(
    "knobs, title",
    [
        (dict(mask="top_left"), "causal mask aligned top-left where bottom-right was asked"),
        (dict(mask="none"), "no causal mask"),
        (dict(append="never"), "the new keys and values are not appended"),
        (dict(append="before"), "the new keys and values are put before the cache"),
        (dict(tau_mode="none"), "no scale"),
        (dict(stable=False), "no max-subtraction"),
        (dict(in_place=True), "the input mutated in place"),
    ],
)
def test_decode_step_mistakes_are_diagnosed(knobs, title):
    assert_diagnosed(make_decode(**knobs), "decode_step", title)


def test_decode_step_must_return_a_cache():
    def decode_step(q_new, k_new, v_new, cache):
        out, new_cache = ar.decode_step(q_new, k_new, v_new, cache)
        return out, (new_cache.keys, new_cache.values)

    first = check(decode_step, "decode_step").first_failure
    assert first.problem.kind == "type" and "KVCache" in first.problem.message


# ---------------------------------------------------------------------------------------------
# The result object
# ---------------------------------------------------------------------------------------------


def test_raise_on_failure_raises_an_assertion_with_the_report():
    with pytest.raises(AssertionError, match="no max-subtraction"):
        check(softmax_naive, "softmax", raise_on_failure=True)
    assert check(stable_softmax, "softmax", raise_on_failure=True).passed


def test_the_result_shows_itself_in_a_notebook():
    result = check(softmax_naive, "softmax")
    assert repr(result) == result.report()
    html = result._repr_html_()
    assert html.startswith("<pre") and "FAIL" in html and "#cf222e" in html
    assert result.diagnosis.startswith("no max-subtraction")


def test_reports_are_deterministic():
    assert check(softmax_naive, "softmax").report() == check(softmax_naive, "softmax").report()


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        check(stable_softmax, "my_softmax")


def test_a_finite_answer_is_never_close_to_an_infinite_one():
    from attention_ref.check_core import close

    expected = np.array([-np.inf, np.inf, 1.0, np.nan])
    assert close(np.array([-np.inf, np.inf, 1.0, np.nan]), expected, (1e-8, 1e-6)).all()
    assert not close(np.array([0.0, 1e300, np.inf, 0.0]), expected, (1e-8, 1e-6)).any()
