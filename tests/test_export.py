"""python -m attention_ref.export: every public function of stages 01–05 and 07 as a standalone file.

Each exported file runs in a fresh interpreter (``python -I -S``) whose path holds the standard
library and NumPy only — neither attention_ref nor array-api-compat can be imported there — and
must give the package's results (or raise the package's error) on several inputs.
"""

from __future__ import annotations

import ast
import inspect
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import attention_ref
from attention_ref.export import ExportError, export, main

# The stage modules whose public functions a student may take home (stage 01's date translator
# is a trained model with a data file, not a function to copy; 06 and 08 need Numba / a model).
STAGE_MODULES = {"bahdanau", "softmax", "masks", "dot_product", "self_attention", "multi_head", "flash",
                 "io_model", "kv_cache"}
PUBLIC = sorted(name for name, module in attention_ref._EXPORTS.items()
                if module in STAGE_MODULES and inspect.isfunction(getattr(attention_ref, name)))
BUDGETS = {"scaled_dot_product_attention": 120, "multi_head_attention": 200, "additive_attention": 120,
           "flash_attention": 200, "flash_attention_backward": 200}

rng = np.random.default_rng(7)


def r(*shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def mask(*shape, p=0.7):
    return rng.random(shape) < p


# Inputs are plain data (arrays, numbers, strings) so that they unpickle where only NumPy exists;
# three markers stand for objects both sides build themselves: a Generator, an AttentionParams
# and a KVCache.
def RNG(seed):
    return ("__rng__", seed)


def PARAMS(d_in, d_qk, d_v, d_out, kdim=None):
    kdim = d_in if kdim is None else kdim
    return ("__params__", {"W_q": r(d_in, d_qk), "W_k": r(kdim, d_qk), "W_v": r(kdim, d_v), "W_o": r(d_v, d_out),
                           "b_q": r(d_qk), "b_k": r(d_qk), "b_v": r(d_v), "b_o": r(d_out)})


def CACHE(*shape):
    return ("__cache__", r(*shape), r(*shape))


def _flash_case(L, S, dtype=np.float64, **kw):
    q, k, v = r(2, 4, L, 8, dtype=dtype), r(2, 2, S, 8, dtype=dtype), r(2, 2, S, 5, dtype=dtype)
    return (q, k, v), dict(enable_gqa=True, **kw)


def _backward_case(L, S, **kw):
    from attention_ref import flash_attention

    (q, k, v), options = _flash_case(L, S, **kw)
    out, lse = flash_attention(q, k, v, return_lse=True, block_q=4, block_k=8, **options)
    return (q, k, v, out, lse, r(*out.shape)), dict(block_q=4, block_k=8, **options)


def _merge_case(L):
    return ([r(3, L, 4), r(3, L, 4)], [r(3, L), np.full((3, L), -np.inf)]), {}


CASES = {
    "additive_score": [((r(3, 4), r(3, 5, 6), r(4, 7), r(6, 7), r(7)), {}),
                       ((r(2, 1, 4), r(2, 1, 5, 6), r(4, 7), r(6, 7), r(7)), {})],
    "additive_attention": [((r(3, 4), r(3, 5, 6), r(4, 7), r(6, 7), r(7), mask(3, 5)), {}),
                           ((r(4), r(0, 6), r(4, 7), r(6, 7), r(7)), {}),
                           ((r(3, 4), r(3, 5, 6), r(4, 7), r(6, 7), r(7)), dict(projected_keys=r(3, 5, 7)))],
    "luong_dot_score": [((r(3, 4), r(3, 5, 4)), {})],
    "luong_general_score": [((r(3, 4), r(3, 5, 6), r(4, 6)), {})],
    "luong_concat_score": [((r(3, 4), r(3, 5, 6), r(10, 7), r(7)), {})],
    "luong_score": [((r(3, 4), r(3, 5, 4)), {}), ((r(3, 4), r(3, 5, 6), "general", r(4, 6)), {})],
    "luong_attention": [((r(3, 4), r(3, 5, 4)), dict(mask=mask(3, 5))),
                        ((r(3, 4), r(3, 5, 6), "concat", r(10, 7), r(7)), {})],
    "luong_attentional_state": [((r(3, 6), r(3, 4), r(10, 5)), {})],
    "softmax": [((r(3, 7) * 30,), {}), ((r(4, 5, dtype=np.float32),), dict(axis=0)),
                ((np.array([[-np.inf, -np.inf], [1.0, np.nan]]),), {})],
    "logsumexp": [((r(3, 7) * 30,), {}), ((np.full((2, 3), -np.inf),), dict(keepdims=True))],
    "masked_softmax": [((r(3, 6), mask(3, 6)), {}), ((r(2, 0), mask(2, 0)), {})],
    "softmax_stats": [((r(3, 7),), {})],
    "merge_softmax_stats": [((r(3, 1), np.abs(r(3, 1)), np.full((3, 1), -np.inf), np.zeros((3, 1))), {})],
    "online_softmax": [((r(3, 10) * 4, 3), {}), ((r(5, 4), 2), dict(axis=0))],
    "causal_mask": [((5, 7), {}), ((7, 5, "bottom_right"), {})],
    "sliding_window_mask": [((6, 9, 2, 1), {}), ((6, 9, None, 0, "bottom_right"), {})],
    "padding_mask": [((np.array([0, 3, 5]), 5), {})],
    "scaled_dot_product_attention": [
        ((r(2, 3, 5, 8), r(2, 3, 7, 8), r(2, 3, 7, 4)), dict(attn_mask=mask(5, 7), return_weights=True)),
        ((r(2, 4, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 4)), dict(is_causal=True, enable_gqa=True, scale=0.3)),
        ((r(5, 8, dtype=np.float16), r(7, 8, dtype=np.float16), r(7, 4, dtype=np.float16)), dict(attn_mask=r(5, 7))),
        ((r(3, 8), r(4, 8), r(4, 2)), dict(dropout_p=0.3, rng=RNG(1), fully_masked="nan", attn_mask=mask(3, 4, p=0.3))),
        ((r(3, 0), r(0, 0), r(0, 2)), {}),
        ((r(3, 8), r(4, 8), r(4, 2)), dict(is_causal="yes")),  # the contract's TypeError
    ],
    "sinusoidal_positional_encoding": [((10, 8), {}), ((3, 7), dict(base=100.0))],
    "init_attention_params": [((RNG(3), 6), dict(d_k=4, d_v=5, d_out=3))],
    "self_attention": [((r(2, 5, 6), PARAMS(6, 4, 5, 3)), dict(is_causal=True, return_weights=True))],
    "cross_attention": [((r(2, 5, 6), r(2, 7, 4), PARAMS(6, 4, 5, 3, kdim=4)), dict(attn_mask=mask(5, 7)))],
    "split_heads": [((r(2, 5, 12), 3), {})],
    "merge_heads": [((r(2, 3, 5, 4),), {})],
    "init_multi_head_params": [((RNG(4), 12, 4), dict(num_kv_heads=2))],
    "multi_head_attention": [
        ((r(2, 5, 12), r(2, 7, 6), r(2, 7, 6), PARAMS(12, 12, 12, 12, kdim=6), 3), dict(return_weights=True)),
        ((r(5, 12), r(7, 12), r(7, 12), ("__params__", {"W_q": r(12, 12), "W_k": r(12, 6), "W_v": r(12, 6),
                                                         "W_o": r(12, 12), "b_q": None, "b_k": None, "b_v": None,
                                                         "b_o": None}), 4),
         dict(num_kv_heads=2, attn_mask=mask(5, 7))),
    ],
    "multi_head_params_from_torch": [(({"in_proj_weight": r(24, 8), "in_proj_bias": r(24), "out_proj.weight": r(8, 8),
                                        "out_proj.bias": r(8)}, 2), {})],
    "flash_attention": [_flash_case(13, 29, is_causal=True, block_q=4, block_k=8, return_lse=True),
                        _flash_case(13, 29, window=(3, 2), causal_alignment="bottom_right", block_q=5, block_k=6),
                        _flash_case(9, 11, np.float32, attn_mask=r(9, 11), block_q=4, block_k=4),
                        _flash_case(4, 0, return_lse=True)],
    "flash_attention_backward": [_backward_case(13, 29, is_causal=True),
                                 _backward_case(9, 20, window=(2, None), causal_alignment="bottom_right")],
    "attention_backward": [((r(2, 5, 4), r(2, 7, 4), r(2, 7, 3), r(2, 5, 3)), dict(attn_mask=mask(5, 7)))],
    "merge_attention_partials": [_merge_case(5)],
    "attention_weights_from_lse": [((r(2, 5, 4), r(2, 7, 4), r(2, 5)), dict(is_causal=True))],
    "expand_block_mask": [((mask(3, 2), 10, 7, 4, 4), {})],
    "forward_fa2": [((r(2, 9, 4), r(2, 11, 4), r(2, 11, 3), None, 0.5, (0, 20, 0), 4, 5), {})],
    "forward_fa1": [((r(2, 9, 4), r(2, 11, 4), r(2, 11, 3), mask(2, 9, 11), 0.5, (2, 20, 20), 4, 5), {})],
    "backward_fa2": [((r(9, 4), r(11, 4), r(11, 3), r(9, 3), r(9), r(9, 3), None, 0.5, (0, 20, 0), 4, 5), {})],
    "sram_block_sizes": [((1024, 16), {}), ((1024, 16, "q"), {})],
    "io_standard_forward": [((r(9, 4), r(11, 4), r(11, 3)), {})],
    "io_standard_backward": [((r(9, 4), r(11, 4), r(11, 3), r(9, 3)), {})],
    "io_flash_forward": [((r(9, 4), r(11, 4), r(11, 3), 64), {}), ((r(9, 4), r(11, 4), r(11, 3), 64), dict(algorithm="fa2"))],
    "io_flash_backward": [((r(9, 4), r(11, 4), r(11, 3), r(9, 3), r(9), r(9, 3), 64), dict(algorithm="fa2"))],
    "io_closed_form": [(("fa1_forward", 64, 64, 16), dict(sram_size=1024))],
    "empty_kv_cache": [(((2,), 3, 4), dict(dtype=np.float32))],
    "append_kv": [((CACHE(1, 2, 3, 4), r(1, 2, 1, 4), r(1, 2, 1, 4)), {})],
    "truncate_kv": [((CACHE(1, 2, 5, 4), 3), {})],
    "decode_step": [((r(1, 4, 1, 8), r(1, 2, 1, 8), r(1, 2, 1, 8), CACHE(1, 2, 5, 8)), dict(enable_gqa=True)),
                    ((r(1, 2, 3, 8), r(1, 2, 3, 8), r(1, 2, 3, 8), CACHE(1, 2, 5, 8)), dict(window=2))],
    "split_kv_attention": [((r(2, 1, 8), r(2, 9, 8), r(2, 9, 8), 3), dict(return_lse=True)),
                           ((r(2, 2, 8), r(2, 9, 8), r(2, 9, 8), 2), dict(attn_mask=mask(2, 9)))],
}

# Run on both sides: by the child on the exported file's classes, by the test on the package's.
SHARED = r'''
import types

import numpy as np


def build(x, namespace):
    """An input: the markers become a Generator, an AttentionParams (or a namespace) or a KVCache."""
    if isinstance(x, tuple) and x and x[0] == "__rng__":
        return np.random.default_rng(x[1])
    if isinstance(x, tuple) and x and x[0] == "__params__":
        return namespace.get("AttentionParams", types.SimpleNamespace)(**x[1])
    if isinstance(x, tuple) and x and x[0] == "__cache__":
        return namespace["KVCache"](x[1], x[2])
    return x


def plain(x):
    """A result as plain data: arrays, lists, and the fields of the package's containers."""
    if isinstance(x, (list, tuple)):
        return [plain(y) for y in x]
    fields = getattr(x, "__dataclass_fields__", None) or getattr(type(x), "__slots__", None)
    if fields:
        return {f: plain(getattr(x, f)) for f in fields}
    return np.asarray(x) if hasattr(x, "dtype") else x


def run(function, cases, namespace):
    """("ok", result) or ("error", type, message) for every case."""
    results = []
    for args, kwargs in cases:
        try:
            out = function(*(build(a, namespace) for a in args), **{k: build(v, namespace) for k, v in kwargs.items()})
            results.append(("ok", plain(out)))
        except Exception as exc:
            results.append(("error", type(exc).__name__, str(exc)))
    return results
'''
exec(SHARED)

CHILD = r'''
import importlib.util
import pickle
import sys

sys.path.append(sys.argv[1])  # the folder that holds NumPy (and nothing else)
for name in ("attention_ref", "array_api_compat", "numba"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the test's interpreter is not NumPy-only")
''' + SHARED + r'''
name, cases = pickle.loads(open(sys.argv[2], "rb").read())
spec = importlib.util.spec_from_file_location("exported", sys.argv[3])
module = sys.modules["exported"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.stdout.buffer.write(pickle.dumps(run(getattr(module, name), cases, vars(module))))
'''


def _same(got, want):
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        return all(_same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, np.ndarray):
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        return True
    assert got == want, (got, want)
    return True


@pytest.fixture(scope="module")
def numpy_only_path(tmp_path_factory):
    """A folder holding only NumPy (links to it and to its bundled libraries)."""
    folder = tmp_path_factory.mktemp("numpy_only")
    site = Path(np.__file__).resolve().parent.parent
    for entry in site.iterdir():
        if entry.name == "numpy" or entry.name.startswith("numpy.libs") or entry.name.startswith("numpy-"):
            (folder / entry.name).symlink_to(entry)
    return folder


def test_every_public_function_has_cases():
    assert set(CASES) == set(PUBLIC), set(PUBLIC) ^ set(CASES)


@pytest.mark.parametrize("name", PUBLIC)
def test_exported_file_runs_with_numpy_only_and_matches(name, numpy_only_path, tmp_path):
    source = export(name)
    tree = ast.parse(source)
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports[0] == "import numpy as np" and set(imports[1:]) <= {"from dataclasses import dataclass"}
    assert all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body[: len(imports)])
    assert f"python -m attention_ref.export {name}" in source.splitlines()[0]
    job, child, exported = tmp_path / "job.pickle", tmp_path / "child.py", tmp_path / f"{name}.py"
    job.write_bytes(pickle.dumps((name, CASES[name])))
    child.write_text(CHILD)
    exported.write_text(source)
    child_run = subprocess.run([sys.executable, "-I", "-S", str(child), str(numpy_only_path), str(job), str(exported)],
                               capture_output=True, timeout=120)
    assert child_run.returncode == 0, child_run.stderr.decode()[-3000:]
    package = {"AttentionParams": attention_ref.AttentionParams, "KVCache": attention_ref.KVCache}
    wants = run(getattr(attention_ref, name), CASES[name], package)  # noqa: F821 (defined by SHARED)
    for got, want in zip(pickle.loads(child_run.stdout), wants, strict=True):
        assert got[0] == want[0], (got, want)
        if want[0] == "error":
            assert got == want
        else:
            _same(got[1], want[1])


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_line_budgets(name):
    """The course's limits on the exported files, blank lines, docstrings and input checks included."""
    lines = export(name).count("\n")
    assert lines <= BUDGETS[name], f"{name}: {lines} lines, budget {BUDGETS[name]}"


def test_exported_file_reads_top_to_bottom():
    """The function first, then what it uses, the contract's checks last under one comment; NumPy
    by name (no ``xp = np``); the export command said once, on the first line."""
    from attention_ref.export import CHECKS_COMMENT

    source = export("scaled_dot_product_attention")
    tree = ast.parse(source)
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert names[0] == "scaled_dot_product_attention" and "stable_softmax" in names
    checks = [i for i, n in enumerate(names) if n.startswith("check_")]
    assert checks == list(range(checks[0], len(names))), names
    assert source.count(CHECKS_COMMENT) == 1 and source.index(CHECKS_COMMENT) < source.index("def check_attention")
    assert "xp = np" not in source and "xp." not in source.split("def band_mask")[0]
    assert source.count("python -m attention_ref.export scaled_dot_product_attention") == 1
    assert ast.get_docstring(tree.body[-1]) is None  # a check: its messages say what it checks


def test_every_public_docstring_says_how_to_export_it():
    for name in PUBLIC:
        doc = inspect.getdoc(getattr(attention_ref, name)) or ""
        assert f"python -m attention_ref.export {name}" in " ".join(doc.split()), name


def test_omitted_statements_and_numba_are_left_out():
    source = export("flash_attention")
    body = source.split("\n", 2)[2]
    assert 'if backend == "numba"' not in body and "flash_numba import" not in body
    assert "def forward_fa1" not in body and "class TileStats" not in body and "to_numpy" not in body
    assert "# left out here" in source.splitlines()[1] and 'if backend == "numba"' in source.splitlines()[1]


def test_command_line(tmp_path, capsys):
    out = tmp_path / "sdpa.py"
    assert main(["scaled_dot_product_attention", "-o", str(out)]) == 0
    assert out.read_text() == export("scaled_dot_product_attention")
    assert main(["scaled_dot_product_attention"]) == 0
    assert capsys.readouterr().out == export("scaled_dot_product_attention")
    assert main(["no_such_function"]) == 2
    assert "not a public name" in capsys.readouterr().err


def test_a_function_that_needs_another_library_is_refused():
    with pytest.raises(ExportError, match="NumPy"):
        export("load_date_translator")


def test_module_runs_as_a_script(tmp_path):
    out = tmp_path / "softmax.py"
    run = subprocess.run([sys.executable, "-m", "attention_ref.export", "softmax", "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    namespace = types.ModuleType("exported").__dict__
    exec(out.read_text(), namespace)
    np.testing.assert_allclose(namespace["softmax"](np.zeros(4)), 0.25)
