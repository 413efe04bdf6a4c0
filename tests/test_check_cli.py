"""``python -m attention_ref.check FILE.py``: every way a student's file can go wrong gets a clear
one-line verdict and the right exit code (0 pass, 1 fail, 2 cannot import / nothing to check),
never a traceback wall."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from attention_ref.check import check, check_file, main

GOOD_SOFTMAX = """
import numpy as np

def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0))
    total = e.sum(axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1)
"""


def write(tmp_path, source, name="student.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr().out
    assert "Traceback" not in out, out
    return code, out


def test_a_correct_file_passes_with_exit_code_0(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, GOOD_SOFTMAX))
    assert code == 0
    assert out.splitlines()[0].startswith("softmax: PASS 8/8 cases")
    assert out.splitlines()[-1] == "student.py: 1 of 1 function pass"


def test_syntax_error(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, "import numpy as np\n\ndef softmax(x)\n    return x\n"))
    assert code == 2
    assert out.strip() == "student.py: cannot be imported — SyntaxError at line 3: expected ':': def softmax(x)"


def test_a_file_that_fails_on_import(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, "import numpy as np\nx = np.zeros(3) + undefined_name\n"))
    assert code == 2
    assert len(out.strip().splitlines()) == 1
    assert "cannot be imported — NameError: name 'undefined_name' is not defined (student.py, line 2" in out


def test_a_file_that_hangs_on_import(tmp_path):
    from attention_ref.check import load_student_file

    module, error = load_student_file(write(tmp_path, "while True:\n    pass\n"), timeout=0.3)
    assert module is None and "took more than 0.3 s" in error


def test_none_of_the_course_functions(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, "def my_softmax(x):\n    return x\n"))
    assert code == 2
    assert len(out.strip().splitlines()) == 1
    assert "none of the course's functions found; looked for: additive_attention, softmax" in out
    assert "decode_step" in out


def test_functions_imported_from_the_course_are_not_checked(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, "from attention_ref import softmax\n"))
    assert code == 2
    assert "softmax: imported from attention_ref.softmax, not written in this file" in out


def test_a_function_that_raises(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, """
        def softmax(x, axis=-1):
            return x / 0 if False else 1 / 0
    """))
    assert code == 1
    assert out.splitlines()[0] == (
        'softmax: FAIL at case 1/8 "tiny hand-checkable example": raised ZeroDivisionError: division by '
        "zero (student.py, line 3: return x / 0 if False else 1 / 0)"
    )


def test_the_exercise_stub(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, """
        def softmax(x, axis=-1):
            # YOUR CODE HERE
            raise NotImplementedError()
    """))
    assert code == 1
    assert "raised NotImplementedError: the function is still the exercise's stub" in out.splitlines()[0]


def test_a_wrong_shape(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, GOOD_SOFTMAX + "\n_good = softmax\n\n"
                                      "def softmax(x, axis=-1):\n    return _good(x, axis)[..., 0]\n"))
    assert code == 1
    assert out.splitlines()[0] == (
        'softmax: FAIL at case 1/8 "tiny hand-checkable example": returned `out` of shape (2,), expected '
        "(2, 3) = x.shape"
    )


def test_a_list_instead_of_an_array(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, GOOD_SOFTMAX + "\n_good = softmax\n\n"
                                      "def softmax(x, axis=-1):\n    return _good(x, axis).tolist()\n"))
    assert code == 1
    assert out.splitlines()[0].endswith("returned a list of 2 items, expected a NumPy array")
    assert "return the result itself as a NumPy array" in out


def test_a_function_that_hangs(tmp_path, capsys):
    path = write(tmp_path, """
        def softmax(x, axis=-1):
            while True:
                try:
                    pass
                except:  # a bare except cannot swallow the time limit
                    pass
    """)
    start = time.perf_counter()
    code, out = run_cli(capsys, path, "--timeout", "0.3")
    assert time.perf_counter() - start < 10
    assert code == 1
    assert out.splitlines()[0] == (
        'softmax: FAIL at case 1/8 "tiny hand-checkable example": no answer within 0.3 s (an endless '
        "loop?); the remaining cases were not run"
    )
    assert "not run after the time-out" in out


def test_a_function_that_prints_a_lot(tmp_path, capsys):
    path = write(tmp_path, GOOD_SOFTMAX + "\n_good = softmax\n\n"
                 "def softmax(x, axis=-1):\n    for i in range(2000):\n        print('debug', i)\n"
                 "    return _good(x, axis)\n")
    code, out = run_cli(capsys, path)
    assert code == 0
    assert out.splitlines()[0] == (
        "softmax: PASS 8/8 cases, bonus 1/1 (it printed 18,000 lines during the checks; not shown)"
    )
    assert "debug" not in out and len(out.splitlines()) < 5


def test_a_function_that_calls_exit(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, "import sys\n\ndef softmax(x, axis=-1):\n    sys.exit(3)\n"))
    assert code == 1
    assert "called exit(3) (student.py, line 4: sys.exit(3))" in out.splitlines()[0]


def test_a_missing_parameter_is_named(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, GOOD_SOFTMAX.replace("axis=-1", "axis=-1, *, extra")))
    assert code == 1
    assert "requires 2 positional arguments" not in out
    source = GOOD_SOFTMAX.replace("def softmax(x, axis=-1)", "def softmax(x)").replace("axis=axis", "axis=-1")
    code, out = run_cli(capsys, write(tmp_path, source, "no_axis.py"))
    assert code == 1
    assert ": has no parameter `axis`, which the exercise asks for" in out.splitlines()[0]


def test_only_the_requested_functions(tmp_path, capsys):
    source = GOOD_SOFTMAX + "\ndef masked_softmax(x, mask, axis=-1):\n    raise ValueError('later')\n"
    path = write(tmp_path, source)
    code, out = run_cli(capsys, path, "--function", "softmax")
    assert code == 0 and "masked_softmax" not in out
    code, out = run_cli(capsys, path)
    assert code == 1 and "masked_softmax: FAIL" in out
    code, out = run_cli(capsys, path, "--function", "decode_step")
    assert code == 2 and "none of the course's functions found; looked for: decode_step" in out
    code, out = run_cli(capsys, path, "--function", "softmax", "--function", "decode_step")
    assert code == 1 and "decode_step: FAIL — not found in student.py" in out
    assert out.count("not found") == 1 and out.splitlines()[-1] == "student.py: 1 of 2 functions pass"


def test_an_unknown_function_name(tmp_path, capsys):
    code, out = run_cli(capsys, write(tmp_path, GOOD_SOFTMAX), "--function", "softmaks")
    assert code == 2 and "no battery for 'softmaks'" in out


def test_list_and_usage(capsys):
    code, out = run_cli(capsys, "--list")
    assert code == 0
    assert "stage 02  scaled_dot_product_attention(query, key, value, attn_mask=None" in out
    code, out = run_cli(capsys)
    assert code == 2


def test_the_module_runs_as_a_script(tmp_path):
    for source, expected in ((GOOD_SOFTMAX, 0), (GOOD_SOFTMAX.replace("e = np.exp(x - ", "e = np.exp(x + "), 1)):
        path = write(tmp_path, source)
        result = subprocess.run([sys.executable, "-m", "attention_ref.check", str(path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == expected, result.stdout + result.stderr
        assert result.stderr == ""
    result = subprocess.run([sys.executable, "-m", "attention_ref.check", str(tmp_path / "missing.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such file" in result.stdout


def test_check_file_for_an_instructors_pytest(tmp_path):
    good = write(tmp_path, GOOD_SOFTMAX)
    assert check_file(good, raise_on_failure=True).passed
    bad = write(tmp_path, GOOD_SOFTMAX.replace("keepdims=True)\n    e", "keepdims=True)\n    e = 1 / 0 * e\n    e"),
                "bad.py")
    with pytest.raises(AssertionError, match="softmax: FAIL"):
        check_file(bad, raise_on_failure=True)


def test_outside_the_main_thread_the_check_runs_without_a_time_limit():
    def softmax(x, axis=-1):
        return x

    results = []
    thread = threading.Thread(target=lambda: results.append(check(softmax, "softmax")))
    thread.start()
    thread.join(60)
    assert not results[0].passed
    assert "no time limit: the checker was not run in the main thread" in results[0].report()
