"""The checker's battery for stage 10's per-rank step, ``ring_attention_step``: the library passes
every case; students' steps — one attending the whole block with a mask from global positions, one
working chunk pair by chunk pair as the library does — pass; and each classic mistake written into
them fails with its diagnosis (the checker reproduces the mistake, it does not guess)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_check_batteries import assert_diagnosed, first_failure

import attention_ref as ar
from attention_ref.check import check, main
from attention_ref.check_core import get_battery

NAME = "ring_attention_step"


def _positions(spans, slip="spans"):
    if slip == "reversed":  # the late chunk taken first
        spans = list(spans)[::-1]
    if slip == "run":  # one run of positions from the first chunk's start
        return np.arange(spans[0][0], spans[0][0] + sum(b - a for a, b in spans))
    return np.concatenate([np.arange(a, b) for a, b in spans])


def _merge(out, lse, o_b, lse_b, how):
    """(O, λ) merged with (O_b, λ_b), or one of the classic slips."""
    if how == "naive":
        w, w_b = np.exp(lse)[..., None], np.exp(lse_b)[..., None]
        return (w * out + w_b * o_b) / (w + w_b), np.log(w + w_b)[..., 0]
    m = np.maximum(lse, lse_b)
    m = np.where(np.isfinite(m), m, 0)
    total = np.exp(lse - m) + np.exp(lse_b - m)
    new_lse = np.where(total > 0, m + np.log(np.where(total > 0, total, 1)), -np.inf)
    safe = np.where(np.isfinite(new_lse), new_lse, 0)
    merged = np.exp(lse - safe)[..., None] * out + np.exp(lse_b - safe)[..., None] * o_b
    return {"logsumexp": (merged, new_lse), "sum": (out + o_b, new_lse), "average": ((out + o_b) / 2, new_lse),
            "overwrite": (o_b, lse_b), "stale_lse": (merged, lse)}[how]


def make_block_student(*, merge="logsumexp", mask="global", positions="spans", tau_mode="sqrt", in_place=False,
                       promote=False):
    """A step that attends the whole block at once, masking by the tokens' global positions."""

    def ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False):
        tau = 1 / math.sqrt(q.shape[-1]) if tau_mode == "sqrt" else 1.0
        if promote:
            tau = np.float64(tau)
        z = tau * (q @ np.swapaxes(k_blk, -1, -2))
        L, S = z.shape[-2:]
        if is_causal:
            q_pos, k_pos = _positions(q_spans, positions), _positions(kv_spans, positions)
            visible = {"global": k_pos[None, :] <= q_pos[:, None], "none": np.ones((L, S), bool),
                       "tril": np.tril(np.ones((L, S), bool))}[mask]
            z = np.where(visible, z, -np.inf)
        m = z.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = np.exp(z - m)
        total = e.sum(axis=-1, keepdims=True)
        o_b = (e @ v_blk) / np.where(total > 0, total, 1)
        with np.errstate(divide="ignore"):
            lse_b = np.where(total[..., 0] > 0, m[..., 0] + np.log(total[..., 0]), -np.inf)
        new_out, new_lse = _merge(out, lse, o_b, lse_b, merge)
        if in_place:
            out[...] = new_out
            return out, new_lse
        return new_out, new_lse

    return ring_attention_step


def make_pairs_student(*, pair_mask="visible"):
    """A step that works chunk pair by chunk pair with flash_attention and merge_attention_partials.
    pair_mask: "visible" (full / diagonal / skipped, by global positions), "every_pair_causal"
    (is_causal passed on to every pair), "no_skip" (the diagonal masked, every other pair full)."""

    def ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False):
        new_out, new_lse, q0 = [], [], 0
        for qa, qb in q_spans:
            rows = slice(q0, q0 + qb - qa)
            o, lam = out[..., rows, :], lse[..., rows]
            k0 = 0
            for ka, kb in kv_spans:
                cols = slice(k0, k0 + kb - ka)
                k0 += kb - ka
                if is_causal and pair_mask == "visible" and ka > qb - 1:
                    continue  # every key after every query: hidden
                causal = is_causal and (pair_mask == "every_pair_causal" or (ka, kb) == (qa, qb))
                o_b, lse_b = ar.flash_attention(q[..., rows, :], k_blk[..., cols, :], v_blk[..., cols, :],
                                                is_causal=causal, return_lse=True)
                o, lam = ar.merge_attention_partials([o, o_b], [lam, lse_b])
            new_out.append(o)
            new_lse.append(lam)
            q0 += qb - qa
        return np.concatenate(new_out, axis=-2), np.concatenate(new_lse, axis=-1)

    return ring_attention_step


def test_the_library_passes_every_case_bonus_included():
    result = check(ar.ring_attention_step, NAME)
    assert all(r.status == "pass" for r in result.results), result.report()
    assert [r.bonus for r in result.results].count(True) == 2  # scale, GQA


@pytest.mark.parametrize("student", [make_block_student(), make_pairs_student()], ids=["block", "pairs"])
def test_a_students_step_passes_and_skips_the_options_it_does_not_take(student):
    result = check(student, NAME)
    assert result.passed, result.report()
    assert all(r.status == "skipped" for r in result.bonus), result.report()
    assert "scale" in result.report() and "enable_gqa" in result.report()


def test_the_cases_go_from_one_step_to_zigzag_and_overflow():
    titles = [c.title for c in get_battery(NAME).cases]
    assert titles[0].startswith("tiny hand-checkable example")
    assert any("hidden" in t for t in titles) and any(t.startswith("zigzag") for t in titles)
    assert "float32, large logits (overflow)" in titles


@pytest.mark.parametrize(
    "student, title, at",
    [
        (make_block_student(merge="sum"), "partial outputs added without the logsumexp weights", "a later step"),
        (make_block_student(merge="average"), "partial outputs averaged", "tiny"),
        (make_block_student(merge="overwrite"), "the block's result replaces the running (O, λ)", "a later step"),
        (make_block_student(merge="stale_lse"), "λ not updated", "tiny"),
        (make_block_student(merge="naive"), "merge without max-subtraction", "float32, large logits"),
        (make_block_student(mask="none"), "no causal mask", "causal: the own block"),
        (make_block_student(mask="tril"), "causal mask aligned by local, not global, positions",
         "causal: an earlier rank's block"),
        (make_pairs_student(pair_mask="every_pair_causal"), "causal mask aligned by local, not global, positions",
         "causal: an earlier rank's block"),
        (make_pairs_student(pair_mask="no_skip"), "hidden chunk pairs not skipped", "causal: a later rank's block"),
        (make_block_student(positions="reversed"), "the shard's chunks taken in the wrong order",
         "zigzag, causal: the own block"),
        (make_block_student(positions="run"), "the shard treated as one contiguous run of positions",
         "zigzag, causal: an earlier rank's block"),
        (make_block_student(tau_mode="none"), "no scale", "tiny"),
        (make_block_student(in_place=True), "the input mutated in place", "tiny"),
        (make_block_student(promote=True), "float32 silently promoted to float64", "float32 stays float32"),
    ],
)
def test_ring_step_mistakes_are_diagnosed(student, title, at):
    result = assert_diagnosed(student, NAME, title)
    assert first_failure(result).case.title.startswith(at), result.report()


def test_the_report_shows_a_small_failing_step():
    result = check(make_block_student(merge="sum"), NAME)
    report = result.report()
    assert "smallest input that shows it" in report
    assert "q_spans" in report and "kv_spans" in report
    call, _, _, sizes = result.first_failure.smallest
    assert sizes["R"] == 2 and call.args[0].size <= 12


def test_the_checker_lists_the_ring_step(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "stage 10  ring_attention_step(q, k_blk, v_blk, out, lse, q_spans, kv_spans, *, is_causal=False)" in listed
