"""Stage 01: the date translator — data, hand-written gradients, training, the committed model."""

import datetime as dt

import numpy as np
import pytest

from attention_ref import (
    DATE_FORMATS,
    additive_attention,
    exact_match_accuracy,
    format_date,
    init_date_translator,
    load_date_translator,
    make_date_dataset,
    save_date_translator,
    train_date_translator,
    translate,
)
from attention_ref.date_translator import (
    PARAM_NAMES,
    _attend,
    _encode,
    clip_gradients,
    encode_sources,
    encode_targets,
    greedy_decode,
    translator_loss,
    translator_loss_and_gradients,
)


@pytest.fixture(scope="module")
def committed():
    return load_date_translator()


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
def test_format_date_examples():
    d = dt.date(2026, 11, 27)  # a Friday
    assert format_date(d, "weekday_day_month_year") == "Friday, 27 November 2026"
    assert format_date(d, "dd/mm/yy") == "27/11/26"
    assert format_date(d, "mon_day_year", "lower") == "nov 27 2026"
    assert format_date(d, "year_month_ordinal") == "2026 November 27th"
    assert format_date(d, "dd-mon-yyyy", "upper") == "27-NOV-2026"
    assert format_date(dt.date(2001, 3, 2), "ordinal_of_month_year") == "2nd of March 2001"
    assert format_date(dt.date(2001, 3, 11), "ordinal_of_month_year") == "11th of March 2001"
    assert format_date(dt.date(2001, 3, 23), "year_month_ordinal") == "2001 March 23rd"
    with pytest.raises(ValueError, match="fmt"):
        format_date(d, "mm/dd/yyyy")


def test_dataset_is_seeded_and_consistent():
    pairs = make_date_dataset(400, seed=3)
    assert pairs == make_date_dataset(400, seed=3)
    assert pairs != make_date_dataset(400, seed=4)
    for src, tgt in pairs:
        date = dt.date.fromisoformat(tgt)
        assert dt.date(1950, 1, 1) <= date <= dt.date(2049, 12, 31)
        # the input is one of the formats of this very date
        assert any(
            src == format_date(date, f, c) for f in DATE_FORMATS for c in ("as_is", "lower", "upper")
        ), (src, tgt)
    texts = [s for s, _ in pairs]
    assert any(t.isupper() for t in texts) and any(t.islower() for t in texts)
    # day-before-month and month-before-day both occur
    assert any(t[0].isdigit() and "/" in t for t in texts)
    assert any(t[:3].lower() in ("jan", "feb", "mar", "apr", "may", "jun") for t in texts)


def test_two_digit_years_follow_the_pivot():
    assert format_date(dt.date(1950, 1, 2), "dd/mm/yy") == "02/01/50"
    assert format_date(dt.date(2049, 12, 31), "dd/mm/yy") == "31/12/49"


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def _tiny_model(rng):
    model = init_date_translator(
        rng, embed=3, encoder=4, decoder=5, attention=3, target_embed=2,
        source_chars="ab1c", target_chars="xy-", output_length=4, dtype=np.float64,
    )  # fmt: skip
    for v in model.params.values():  # move away from the zero biases of the initialisation
        v += 0.3 * rng.standard_normal(v.shape)
    return model


def test_gradients_match_finite_differences_for_every_parameter(rng):
    model = _tiny_model(rng)
    src, mask = encode_sources(model, ["ab1", "c", "1ab1c"])  # padding in two of three rows
    tgt = rng.integers(1, 4, size=(3, 4))
    _, grads = translator_loss_and_gradients(model, src, mask, tgt)
    assert set(grads) == set(PARAM_NAMES)
    eps = 1e-6
    for name in PARAM_NAMES:
        value = model.params[name]
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):  # every entry: the tiny model has ~600 of them
            old = value[idx]
            value[idx] = old + eps
            up = translator_loss(model, src, mask, tgt)
            value[idx] = old - eps
            down = translator_loss(model, src, mask, tgt)
            value[idx] = old
            numeric[idx] = (up - down) / (2 * eps)
        analytic = grads[name]
        assert np.linalg.norm(numeric) > 0, name
        rel = np.linalg.norm(numeric - analytic) / (np.linalg.norm(numeric) + np.linalg.norm(analytic))
        assert rel < 1e-6, (name, rel)


def test_padding_does_not_change_a_translation(rng):
    model = _tiny_model(rng)
    alone_src, alone_mask = encode_sources(model, ["ab"])
    batch_src, batch_mask = encode_sources(model, ["ab", "ab1cc1ab"])
    ids1, al1 = greedy_decode(model, alone_src, alone_mask)
    ids2, al2 = greedy_decode(model, batch_src, batch_mask)
    np.testing.assert_array_equal(ids1[0], ids2[0])
    np.testing.assert_allclose(al1[0], al2[0, :, :2], rtol=1e-12)
    assert np.all(al2[0, :, 2:] == 0.0)


def test_model_attention_is_additive_attention(rng):
    model = _tiny_model(rng)
    src, mask = encode_sources(model, ["ab1", "c"])
    p = model.params
    enc = _encode(p, src, mask)
    s = rng.standard_normal((2, 5))
    context, alpha, _ = _attend(p, s, enc["H"], enc["keys"], mask)
    ref_c, ref_a = additive_attention(s, enc["H"], p["att_W"], p["att_U"], p["att_v"], mask=mask)
    np.testing.assert_allclose(alpha, ref_a, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(context, ref_c, rtol=1e-12, atol=1e-15)


def test_clip_gradients():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_gradients(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0])
    np.testing.assert_allclose(grads["b"], [[0.8]])


# ---------------------------------------------------------------------------------------------
# training and the committed model
# ---------------------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss():
    model = init_date_translator(
        np.random.default_rng(1), embed=8, encoder=12, decoder=16, attention=8, target_embed=8
    )
    pairs = make_date_dataset(32, seed=99)
    src, mask = encode_sources(model, [s for s, _ in pairs])
    tgt = encode_targets(model, [t for _, t in pairs])
    before = translator_loss(model, src, mask, tgt)
    model, losses = train_date_translator(
        25, seed=1, batch_size=32, lr=1e-2, model=model, progress=False
    )
    assert len(losses) == 25
    assert translator_loss(model, src, mask, tgt) < before
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_committed_model_is_accurate_on_fresh_dates(committed):
    held_out = make_date_dataset(1000, seed=20_251_127)
    assert exact_match_accuracy(committed, held_out) >= 0.95


def test_committed_model_examples_and_alignments(committed):
    texts = ["Friday, 27 November 2026", "27/11/26", "nov 27 2026", "2026 November 27th"]
    isos, aligns = translate(committed, texts)
    assert isos == ["2026-11-27"] * 4
    for text, a in zip(texts, aligns, strict=True):
        assert a.shape == (10, len(text))
        np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-5)
    iso, a = translate(committed, "27/11/26")
    assert iso == "2026-11-27" and a.shape == (10, 8)
    # the day digits of "27/11/26" are written while looking at the day
    assert a[8].argmax() == 0 and a[9].argmax() == 1


def test_save_and_load_round_trip(tmp_path, rng):
    model = init_date_translator(rng, embed=4, encoder=5, decoder=6, attention=3, target_embed=2)
    path = tmp_path / "m.npz"
    save_date_translator(model, path)
    loaded = load_date_translator(path)
    assert loaded.source_chars == model.source_chars and loaded.output_length == 10
    for k in PARAM_NAMES:
        np.testing.assert_array_equal(loaded.params[k], model.params[k])
    assert translate(loaded, "1 May 2000")[0] == translate(model, "1 May 2000")[0]


def test_training_command_writes_weights(tmp_path, capsys):
    from attention_ref.train_bahdanau import main

    out = tmp_path / "w.npz"
    main(["--steps", "2", "--seed", "5", "--batch-size", "8", "--output", str(out), "--no-progress"])
    assert out.exists() and "exact match" in capsys.readouterr().out
    load_date_translator(out)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(committed):
    with pytest.raises(ValueError, match=r"\['@', 'é'\]"):
        translate(committed, "27 Novémber 2026 @")
    with pytest.raises(ValueError, match="empty"):
        translate(committed, "")
    with pytest.raises(ValueError, match="empty"):
        translate(committed, [])
    with pytest.raises(ValueError, match="empty"):
        translate(committed, ["1 May 2000", "   "])
    with pytest.raises(TypeError, match="string"):
        translate(committed, [20261127])
    with pytest.raises(TypeError, match="string"):
        translate(committed, 20261127)
    with pytest.raises(ValueError, match="ISO"):
        encode_targets(committed, ["2026/11/27"])
    with pytest.raises(ValueError, match="shapes"):
        translator_loss(committed, np.ones((2, 3), int), np.ones((2, 3), bool), np.ones((3, 10), int))
    with pytest.raises(ValueError, match="non-negative"):
        make_date_dataset(-1)
