"""Check a student's implementation of a course function against the float64 reference.

From a shell (exit code 0: every function found passes, 1: some fail, 2: the file cannot be
imported or holds none of the course's functions)::

    python -m attention_ref.check my_attention.py
    python -m attention_ref.check my_attention.py --function scaled_dot_product_attention
    python -m attention_ref.check --list            # the functions it knows, with their signatures

From Python or a notebook::

    from attention_ref.check import check
    result = check(my_sdpa, "scaled_dot_product_attention")
    result.passed          # True when every required case passes
    result                 # the report (a notebook shows it, coloured)
    check(my_sdpa, "scaled_dot_product_attention", raise_on_failure=True)   # AssertionError on failure

In pytest (an instructor's CI over students' files)::

    from attention_ref.check import check_file
    def test_homework():
        check_file("homework/attention.py", raise_on_failure=True)

What is checked
---------------
Each function has a *battery* of cases, from a tiny hand-checkable example through random shapes,
L ≠ S, odd sizes, leading batch dimensions, each mask kind, causal masks, fully masked rows and
float32 with large logits (overflow). Every call also checks that the output's dtype follows the
input's (float32 in → float32 out) and that no input was modified. The report names the first
failing case, the shapes, the max abs error, the smallest input that shows the failure (printed in
full) and a **diagnosis**: each classic mistake the checker knows (no max-subtraction, wrong
scale, mask convention inverted, softmax over the wrong axis, K not transposed, causal mask
aligned the wrong way, padding applied to queries, online softmax not rescaled, …) is *computed*
and diagnosed only when it reproduces the student's answer.

Only the signature the exercise asks for is required: ``options=`` names the keyword options it
requires (default: the battery's ``required_options``, see ``--list``). Cases that use any other
option are *bonus* cases, reported separately (and skipped when the function does not take the
option); they never make ``passed`` false. Each call runs with a time limit (``timeout``, in
seconds, per call; SIGALRM, so in the main thread — the CLI, pytest and Jupyter all run there),
with its printing captured (and counted, not shown) and its warnings recorded.

Checked functions: ``softmax``, ``masked_softmax``, ``online_softmax``, ``additive_attention``,
``scaled_dot_product_attention``, ``self_attention``, ``multi_head_attention``, ``flash_attention``,
``flash_attention_backward``, ``merge_attention_partials``, ``decode_step`` (stages 01–07), and
``ring_attention_step`` (stage 10); ``python -m attention_ref.check --list`` shows every registered one.

Adding a battery (a later stage)
--------------------------------
Write ``attention_ref/check_<topic>.py``; every module named ``check_*`` is imported when the
checker first needs its registry, and registers its batteries when imported::

    import numpy as np
    from .check_core import Battery, Call, Case, Mistake, randn, register

    def _reference(x, positions, theta=10000.0):          # float64, written independently
        ...

    def _build(rng, dtype, L, E):                          # sizes use the Notation table's names
        return Call((randn(rng, (L, E), dtype), np.arange(L)))

    register(Battery(
        name="rope", stage="09", signature="rope(x, positions, theta=10000.0)",
        inputs=("x", "positions"), reference=_reference, shapes=("(..., L, E)",),
        cases=[Case("tiny hand-checkable example", _build, dict(L=2, E=2)),
               Case("float32 stays float32", _build, dict(L=5, E=8), dtype="float32")],
        mistakes=[Mistake("pairs (x0, x1) rotated instead of halves",
                          "rotate x[..., :E/2] with x[..., E/2:] (Llama's layout)",
                          wrong=lambda call: ...)],      # what that mistake returns for `call`
    ))

* ``Case(title, build, sizes, dtype=..., tol=(atol, rtol), minimum=..., bonus=...)``: ``build(rng,
  dtype, **sizes) -> Call(args, kwargs)``. Order the cases easy to hard.
* ``Mistake(title, advice, wrong, probe=None, match_errors=False)``: ``wrong(call)`` returns the
  mistaken answer (``None`` where it cannot show; a ``Candidates([...])`` list when it depends on
  something unknown such as the student's block size). ``probe(sizes)`` gives sizes on which a
  mistake that crashes on the case's shapes runs, so it can be tested there.
* ``Battery(..., outputs=("out", "lse"), unpack=...)`` for functions returning several values;
  ``required_options`` / ``passthrough`` for keyword options (see :mod:`attention_ref.check_core`).
* Registering an existing name replaces that battery (say, when ``decode_step`` gains an option in a
  later stage, its new battery keeps the old cases and adds the new ones as bonus cases).
* Name a battery after the library function it checks: ``tests/test_check_batteries.py`` then
  checks that the library's own function passes every case, bonus cases included. Add there one
  broken implementation per mistake, written as a student would, asserting its diagnosis.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from .check_core import (
    Battery,
    Call,
    Candidates,
    Case,
    CheckResult,
    Mistake,
    battery_names,
    get_battery,
    register,
    run_battery,
    run_limited,
)

__all__ = [
    "Battery",
    "Call",
    "Candidates",
    "Case",
    "CheckResult",
    "FileResult",
    "Mistake",
    "battery_names",
    "check",
    "check_file",
    "main",
    "register",
]


def check(
    fn: Callable,
    name: str | None = None,
    *,
    options: Sequence[str] | None = None,
    timeout: float | None = 5.0,
    raise_on_failure: bool = False,
    bonus: bool = True,
    seed: int = 0,
) -> CheckResult:
    """Check ``fn`` against the battery ``name`` (default: ``fn.__name__``).

    ``options``: the keyword options the exercise requires (default: the battery's); cases using
    others are bonus cases. ``timeout``: seconds per call (None: no limit). ``bonus=False`` skips
    the bonus cases. With ``raise_on_failure`` a failure raises ``AssertionError`` carrying the
    report (for pytest and exercise cells). Returns a :class:`CheckResult`: ``.passed``,
    ``.report()``, ``.first_failure``, ``.diagnosis``.
    """
    __tracebackhide__ = True  # pytest and IPython show the assertion, not the checker's frames
    if not callable(fn):
        raise TypeError(f"check() needs the function itself, got {type(fn).__name__}")
    name = name or getattr(fn, "__name__", "")
    if name not in battery_names():
        raise ValueError(
            f"the checker has no battery named {name!r}; pass the course's name, e.g. "
            f"check(fn, 'scaled_dot_product_attention'). Known: {', '.join(battery_names())}"
        )
    battery = get_battery(name)
    result = CheckResult(name, battery, run_battery(battery, fn, options=options, timeout=timeout,
                                                    seed=seed, bonus=bonus))
    if raise_on_failure and not result.passed:
        raise AssertionError(result.report())
    return result


# ---------------------------------------------------------------------------------------------
# Student files
# ---------------------------------------------------------------------------------------------


@dataclass
class FileResult:
    """The verdict on a student's file: one :class:`CheckResult` per function found."""

    path: str
    results: list[CheckResult] = field(default_factory=list)
    error: str = ""  # the file could not be imported, or has none of the course's functions
    notes: list[str] = field(default_factory=list)  # functions found but not checked, and why
    missing: list[str] = field(default_factory=list)  # functions asked for but not in the file

    @property
    def exit_code(self) -> int:
        if self.error:
            return 2
        return 0 if all(r.passed for r in self.results) and not self.missing else 1

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def report(self) -> str:
        name = os.path.basename(self.path)
        if self.error:
            return f"{name}: {self.error}"
        lines = [r.report() for r in self.results]
        lines += self.notes + [f"{n}: FAIL — not found in {name}" for n in self.missing]
        passed = sum(r.passed for r in self.results)
        total = len(self.results) + len(self.missing)
        lines.append(f"{name}: {passed} of {total} function{'s' * (total != 1)} pass")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.report()


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def load_student_file(path: str | os.PathLike, timeout: float | None = 10.0) -> tuple[ModuleType | None, str]:
    """Import a student's file as a fresh module. Returns (module, "") or (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, f"no such file: {path}"
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_student_{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        return None, "cannot be imported: not a Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses in the file need their module registered
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        outcome = run_limited(spec.loader.exec_module, (module,), {}, timeout, code_file=str(path))
    finally:
        sys.path.remove(str(path.parent.resolve()))
    if outcome.timed_out:
        sys.modules.pop(module_name, None)
        return None, f"cannot be imported: importing it took more than {timeout:g} s (a loop at top level?)"
    exc = outcome.error
    if exc is not None:
        sys.modules.pop(module_name, None)
        if isinstance(exc, SyntaxError):
            where = f" at line {exc.lineno}" if exc.lineno else ""
            text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
            return None, f"cannot be imported — SyntaxError{where}: {exc.msg}{text}"
        where = f" ({outcome.where})" if outcome.where else ""
        message = _one_line(exc)
        return None, f"cannot be imported — {type(exc).__name__}{': ' + message if message else ''}{where}"
    return module, ""


def check_file(
    path: str | os.PathLike,
    functions: Sequence[str] | None = None,
    *,
    timeout: float | None = 5.0,
    options: dict[str, Sequence[str]] | None = None,
    raise_on_failure: bool = False,
) -> FileResult:
    """Import the file at ``path`` and check every course function defined in it (or only
    ``functions``). ``options`` maps a function name to its required options. With
    ``raise_on_failure`` anything but a full pass raises ``AssertionError`` with the report."""
    __tracebackhide__ = True
    known = battery_names()
    wanted = list(functions) if functions else known
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"the checker has no battery for {', '.join(unknown)}; it knows: {', '.join(known)}")
    result = FileResult(str(path))
    module, error = load_student_file(path)
    if module is None:
        result.error = error
    else:
        found = []
        for name in wanted:
            fn = getattr(module, name, None)
            if fn is None:
                if functions:
                    result.missing.append(name)
            elif not callable(fn):
                result.notes.append(f"{name}: is a {type(fn).__name__}, not a function — not checked")
            elif getattr(fn, "__module__", module.__name__) != module.__name__:
                result.notes.append(f"{name}: imported from {fn.__module__}, not written in this file — not checked")
            else:
                found.append((name, fn))
        if not found:
            result.error = ("none of the course's functions found; looked for: " + ", ".join(wanted)
                            + ("" if not result.notes else f" ({'; '.join(result.notes)})"))
            result.missing = []
        for name, fn in found:
            result.results.append(check(fn, name, options=(options or {}).get(name), timeout=timeout))
    if raise_on_failure and not result.passed:
        raise AssertionError(result.report())
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _list_batteries() -> str:
    """Each battery: the signature asked for, its cases and mistakes, and its kinds of options."""
    lines = []
    for name in battery_names():
        battery: Battery = get_battery(name)
        used = dict.fromkeys(k for case in battery.cases for k in case.make(0).kwargs)
        bonus = [k for k in used if k not in battery.required_options and k not in battery.passthrough]
        lines.append(f"stage {battery.stage}  {battery.signature or name}")
        details = [f"{len(battery.cases)} cases", f"{len(battery.mistakes)} diagnosed mistakes"]
        if battery.passthrough:
            details.append(f"passed when your function takes them: {', '.join(battery.passthrough)}")
        if bonus:
            details.append(f"bonus options: {', '.join(bonus)}")
        lines.append(textwrap.fill("; ".join(details), 100, initial_indent=" " * 10, subsequent_indent=" " * 12))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.check",
        description="Check your implementations of the course's functions against float64 references. "
        "Exit code 0: all found functions pass; 1: some fail; 2: the file cannot be imported or "
        "has none of the course's functions.",
    )
    parser.add_argument("file", nargs="?", help="your Python file")
    parser.add_argument("--function", "-f", action="append", metavar="NAME",
                        help="check only this function (repeat for several)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default 5)")
    parser.add_argument("--list", action="store_true", help="list the functions the checker knows")
    args = parser.parse_args(argv)
    if args.list:
        print(_list_batteries())
        return 0
    if args.file is None:
        parser.print_usage()
        print("error: give a file to check (or --list)")
        return 2
    known = battery_names()
    for name in args.function or []:
        if name not in known:
            print(f"error: the checker has no battery for {name!r}; it knows: {', '.join(known)}")
            return 2
    result = check_file(args.file, args.function, timeout=args.timeout)
    print(result.report())
    return result.exit_code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the report piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
