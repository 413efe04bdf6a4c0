"""Packaging: every advertised name imports; the core needs neither Numba nor matplotlib."""

import subprocess
import sys

import attention_ref


def test_every_export_resolves():
    for name in attention_ref.__all__:
        assert getattr(attention_ref, name) is not None, name


def test_core_names_are_functions_not_modules():
    assert callable(attention_ref.softmax) and callable(attention_ref.self_attention)


def test_import_does_not_pull_optional_dependencies():
    code = (
        "import sys, attention_ref; "
        "attention_ref.scaled_dot_product_attention; attention_ref.multi_head_attention; "
        "bad = [m for m in ('numba', 'matplotlib', 'torch', 'tokenizers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
