"""The machinery behind :mod:`attention_ref.check`: batteries of cases, the registry, running a
student's function safely, judging its answer, shrinking the failing input and testing the
classic mistakes.

A **battery** checks one course function. It holds

* ``reference(*args, **kwargs)``: the right answer, computed in float64 with the full L × S matrix;
* ``cases``: :class:`Case` objects, easy to hard (the first failure is the most instructive). A case
  builds its inputs with ``build(rng, dtype, **sizes)`` → :class:`Call`, so the checker can rebuild
  it smaller (to show the smallest failing input) or with other sizes (to test a mistake that
  crashes on the original shapes);
* ``mistakes``: :class:`Mistake` objects. ``wrong(call)`` computes what a function with that mistake
  returns (or raises) for a call; a mistake is diagnosed only when its answer reproduces the
  student's — a tested hypothesis, never a guess.

The positional ``inputs`` are always passed. Keyword options come in three kinds: the ones the
exercise asks for (``required_options``; a function without one of them fails the cases that use
it), ``passthrough`` options such as block sizes (given only to functions that take them), and all
others, which make a case a *bonus* case: reported separately, skipped when the function does not
take the option, never making the check fail.

See :mod:`attention_ref.check` for the user's guide and for how to add a battery.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import io
import itertools
import math
import os
import pkgutil
import signal
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Battery",
    "Call",
    "Candidates",
    "Case",
    "CaseResult",
    "CheckResult",
    "Mistake",
    "battery_names",
    "get_battery",
    "randn",
    "register",
    "run_battery",
    "small_ints",
]


# ---------------------------------------------------------------------------------------------
# What a battery is made of
# ---------------------------------------------------------------------------------------------


@dataclass
class Call:
    """One call of the function under test: positional ``args`` and keyword options ``kwargs``."""

    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One check: ``build(rng, dtype, **sizes) -> Call`` makes its inputs.

    ``sizes`` are named with the course's notation (L, S, E, Ev, H, B, n, …); ``minimum`` bounds
    them when the checker looks for a smaller failing input (``shrink=False`` keeps the case as it
    is). ``bonus=True`` marks behaviour beyond the exercise even when no option is involved (a
    course convention). ``tol=(atol, rtol)`` overrides the dtype's tolerance.
    """

    title: str
    build: Callable[..., Call]
    sizes: Mapping[str, int] = field(default_factory=dict)
    dtype: str = "float64"
    bonus: bool = False
    tol: tuple[float, float] | None = None
    minimum: Mapping[str, int] = field(default_factory=dict)
    shrink: bool = True

    def make(self, seed: int, sizes: Mapping[str, int] | None = None) -> Call:
        sizes = dict(self.sizes if sizes is None else sizes)
        rng = np.random.default_rng([seed, *_stable_ints(self.title), *sizes.values()])
        return self.build(rng, np.dtype(self.dtype), **sizes)


@dataclass(frozen=True)
class Mistake:
    """A classic mistake, as a function: ``wrong(call)`` returns what a function with this mistake
    returns for ``call`` (None when the mistake cannot show on that call).

    ``probe(sizes) -> sizes`` gives sizes on which the mistake runs without an error (for instance
    E = S for "K not transposed", which crashes otherwise); when the student's function raised, it
    is run again on the probe and compared there. ``match_errors``: the mistake shows as an error
    (say ``.T`` on a 4-D array); it is diagnosed when the student's error has the same type and
    message as the one ``wrong(call)`` raises.
    """

    title: str
    advice: str
    wrong: Callable[[Call], Any]
    probe: Callable[[dict], dict] | None = None
    match_errors: bool = False


class Candidates(list):
    """Several possible answers of one mistake (say, for each block size the student might use);
    the mistake is diagnosed when any of them reproduces the student's answer."""


@dataclass
class Battery:
    """Everything the checker knows about one course function (see the module docstring)."""

    name: str
    stage: str
    inputs: tuple[str, ...]
    reference: Callable[..., Any]
    cases: Sequence[Case]
    mistakes: Sequence[Mistake] = ()
    outputs: tuple[str, ...] = ("out",)
    shapes: tuple[str, ...] = ()
    required_options: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    unpack: Callable[[Any, tuple[str, ...]], tuple] | None = None
    signature: str = ""

    def split(self, value: Any) -> tuple:
        """The battery's outputs as a tuple of arrays (raises :class:`Unexpected` otherwise)."""
        return (self.unpack or unpack_arrays)(value, self.outputs)


_REGISTRY: dict[str, Battery] = {}
_DISCOVERED = False


def register(battery: Battery) -> Battery:
    """Add (or replace) the battery for ``battery.name``. Returns it, so it can decorate."""
    if not battery.cases:
        raise ValueError(f"battery {battery.name!r} has no cases")
    _REGISTRY[battery.name] = battery
    return battery


def _discover() -> None:
    """Import every ``attention_ref.check_*`` module once: each registers its batteries."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("attention_ref")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("check_") and info.name != "check_core":
            importlib.import_module(f"attention_ref.{info.name}")


def get_battery(name: str) -> Battery:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no battery for {name!r}; the checker knows: {', '.join(battery_names())}"
        ) from None


def battery_names() -> list[str]:
    """Names of every registered battery, in course order (stage, then registration)."""
    _discover()
    order = {name: i for i, name in enumerate(_REGISTRY)}
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].stage, order[n]))


# ---------------------------------------------------------------------------------------------
# Helpers for battery authors
# ---------------------------------------------------------------------------------------------


def randn(rng: np.random.Generator, shape: Sequence[int], dtype: Any, scale: float = 1.0) -> np.ndarray:
    """Standard normal numbers of ``shape`` in ``dtype`` (times ``scale``)."""
    return (scale * rng.standard_normal(tuple(shape))).astype(dtype)


def small_ints(rng: np.random.Generator, shape: Sequence[int], dtype: Any, low: int = -2, high: int = 2) -> np.ndarray:
    """Integers in [low, high] stored as ``dtype``: inputs a student can follow by hand."""
    return rng.integers(low, high + 1, size=tuple(shape)).astype(dtype)


class Unexpected(Exception):
    """The student's return value does not have the expected structure."""


def unpack_arrays(value: Any, outputs: tuple[str, ...]) -> tuple:
    """One NumPy array, or a tuple of ``len(outputs)`` arrays."""
    if len(outputs) == 1:
        if isinstance(value, np.ndarray):
            return (value,)
        raise Unexpected(f"returned {_kind(value)}, expected a NumPy array")
    if not isinstance(value, tuple | list) or len(value) != len(outputs):
        raise Unexpected(
            f"returned {_kind(value)}, expected a tuple of {len(outputs)} arrays "
            f"({', '.join(outputs)})"
        )
    for name, part in zip(outputs, value, strict=True):
        if not isinstance(part, np.ndarray):
            raise Unexpected(f"returned {_kind(part)} as `{name}`, expected a NumPy array")
    return tuple(value)


def _kind(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)} item{'s' * (len(value) != 1)}"
    if value is None:
        return "None (a missing `return`?)"
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _stable_ints(text: str) -> list[int]:
    return list(text.encode())[:16]


# ---------------------------------------------------------------------------------------------
# Running the student's function: time limit, captured output and warnings
# ---------------------------------------------------------------------------------------------


class _TimeUp(BaseException):
    """Raised by the alarm; a BaseException so that a student's ``except Exception`` lets it pass."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[bool]:
    """Interrupt the block after ``seconds`` with SIGALRM (main thread only: the CLI, pytest and a
    Jupyter kernel all run code there). Yields whether a limit is in force."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield False
        return

    def _alarm(signum: int, frame: Any) -> None:
        raise _TimeUp()

    previous = signal.signal(signal.SIGALRM, _alarm)
    # Re-fire every 0.2 s after the limit, in case a bare `except:` in the student's code swallows it.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.2)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Printed(io.TextIOBase):
    """A stdout stand-in that counts what is printed and keeps only its beginning."""

    def __init__(self, keep: int = 400) -> None:
        self.keep, self.kept, self.chars, self.lines = keep, "", 0, 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.chars += len(text)
        self.lines += text.count("\n")
        if len(self.kept) < self.keep:
            self.kept += text[: self.keep - len(self.kept)]
        return len(text)


@dataclass
class Outcome:
    """What one call did: its value or error, where it raised, what it printed and warned."""

    value: Any = None
    error: BaseException | None = None
    where: str = ""
    timed_out: bool = False
    limited: bool = True
    printed: _Printed = field(default_factory=_Printed)
    warned: list[str] = field(default_factory=list)


def run_limited(fn: Callable, args: tuple, kwargs: dict, timeout: float | None,
                code_file: str | None = None) -> Outcome:
    """Call ``fn(*args, **kwargs)`` with a time limit, stdout/stderr captured and warnings recorded.
    An error is located at the last line of ``code_file`` (default: the file ``fn`` is written in)
    in its traceback.

    Never raises, except KeyboardInterrupt (the user's own Ctrl-C)."""
    outcome = Outcome()
    if code_file is None:
        code_file = getattr(getattr(fn, "__code__", None), "co_filename", None)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(outcome.printed))
            stack.enter_context(contextlib.redirect_stderr(outcome.printed))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            outcome.limited = stack.enter_context(time_limit(timeout))
            try:
                outcome.value = fn(*args, **kwargs)
            finally:
                outcome.warned = _unique(f"{w.category.__name__}: {w.message}" for w in caught)
    except _TimeUp:
        outcome.timed_out = True
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a student's exit() must not end the checker
        outcome.error = exc
        outcome.where = where_raised(exc, code_file)
    return outcome


def _unique(items: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(items))


def where_raised(exc: BaseException, code_file: str | None) -> str:
    """'student.py, line 7: scores = q @ k' — the last line of the student's own code in the
    traceback (or the last frame, when their file is not in it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if code_file is not None and f.filename == code_file]
    frame = own[-1] if own else (frames[-1] if frames else None)
    if frame is None:
        return ""
    name = os.path.basename(frame.filename)
    if "ipykernel_" in frame.filename or frame.filename.startswith("<ipython-input"):
        name = "your cell"
    line = f": {frame.line.strip()}" if frame.line else ""
    return f"{name}, line {frame.lineno}{line}"


# ---------------------------------------------------------------------------------------------
# The student's signature
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Accepts:
    """Which calls a function's signature accepts."""

    max_positional: float
    min_positional: int
    keywords: frozenset[str]
    any_keyword: bool

    @classmethod
    def of(cls, fn: Callable) -> _Accepts:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature: assume the best
            return cls(math.inf, 0, frozenset(), True)
        kinds = inspect.Parameter
        positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        return cls(
            max_positional=math.inf if any(p.kind is kinds.VAR_POSITIONAL for p in params) else len(positional),
            min_positional=sum(p.default is kinds.empty for p in positional),
            keywords=frozenset(
                p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
            ),
            any_keyword=any(p.kind is kinds.VAR_KEYWORD for p in params),
        )

    def takes(self, option: str) -> bool:
        return self.any_keyword or option in self.keywords


# ---------------------------------------------------------------------------------------------
# Judging one answer
# ---------------------------------------------------------------------------------------------

TOLERANCE = {"float64": (1e-8, 1e-6), "float32": (1e-5, 1e-4), "float16": (2e-3, 2e-3)}


@dataclass
class Problem:
    """What is wrong with one answer. ``kind``: timeout, error, stub, signature, type, shape,
    values, mutated, dtype."""

    kind: str
    message: str
    detail: str = ""


@dataclass
class CaseResult:
    """The verdict on one case."""

    case: Case
    call: Call | None
    bonus: bool
    status: str  # "pass", "fail", "skipped", "not run"
    problems: list[Problem] = field(default_factory=list)
    outcome: Outcome | None = None
    expected: tuple | None = None
    got: tuple | None = None
    diagnoses: list[str] = field(default_factory=list)
    smallest: tuple[Call, tuple, tuple | None, Mapping[str, int]] | None = None

    @property
    def problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def _arrays_in(obj: Any, path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every array inside an argument (lists, tuples and dataclasses opened), with its path."""
    if isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, tuple | list):
        for i, item in enumerate(obj):
            yield from _arrays_in(item, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _arrays_in(getattr(obj, f.name), f"{path}.{f.name}")


def _call_arrays(battery: Battery, call: Call) -> Iterator[tuple[str, np.ndarray]]:
    for name, arg in zip(battery.inputs, call.args, strict=True):
        yield from _arrays_in(arg, name)
    for name, arg in call.kwargs.items():
        yield from _arrays_in(arg, name)


def close(got: np.ndarray, expected: np.ndarray, tol: tuple[float, float]) -> np.ndarray:
    """Entry-wise |got − expected| ≤ atol + rtol·|expected|, NaN matching NaN and ±∞ matching itself."""
    atol, rtol = tol
    with np.errstate(all="ignore"):
        g, e = np.asarray(got, np.float64), np.asarray(expected, np.float64)
        # only a finite expected value has a tolerance (rtol·∞ would make anything close to ±∞)
        ok = np.isfinite(e) & (np.abs(g - e) <= atol + rtol * np.abs(e))
        ok |= (np.isnan(g) & np.isnan(e)) | (np.isinf(e) & (g == e))
    return ok


def same_answer(got: tuple, other: tuple, tol: tuple[float, float]) -> bool:
    """Two answers (tuples of arrays) agree in shape and, within ``tol``, in value."""
    if len(got) != len(other):
        return False
    for g, o in zip(got, other, strict=True):
        g, o = np.asarray(g), np.asarray(o)
        if g.shape != o.shape or not bool(np.all(close(g, o, tol))):
            return False
    return True


def _judge(
    battery: Battery,
    case: Case,
    call: Call,
    outcome: Outcome,
    expected: tuple,
    given: Call,
    tol: tuple[float, float],
    timeout: float | None,
) -> tuple[list[Problem], tuple | None]:
    """Every problem with one answer, most fundamental first, and the answer as a tuple."""
    if outcome.timed_out:
        return [Problem("timeout", f"no answer within {timeout:g} s (an endless loop?)")], None
    if outcome.error is not None:
        exc = outcome.error
        if isinstance(exc, NotImplementedError):
            return [Problem("stub", "raised NotImplementedError: the function is still the exercise's stub")], None
        if isinstance(exc, SystemExit):
            return [Problem("error", f"called exit({exc.code!r}) ({outcome.where})")], None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        where = f" ({outcome.where})" if outcome.where else ""
        return [Problem("error", f"raised {type(exc).__name__}{': ' + text if text else ''}{where}")], None
    try:
        got = battery.split(outcome.value)
    except Unexpected as exc:
        return [Problem("type", str(exc))], None
    if len(got) != len(expected):
        want = ", ".join(battery.outputs[: len(expected)])
        return [Problem("type", f"returned {len(got)} arrays, expected {len(expected)} ({want})")], None
    problems: list[Problem] = []
    shapes = battery.shapes or ("",) * len(expected)
    for name, g, e, sym in zip(battery.outputs, got, expected, shapes, strict=False):
        if g.shape != e.shape:
            problems.append(Problem("shape", f"returned `{name}` of shape {g.shape}, expected {e.shape}"
                                    + (f" = {sym}" if sym else "")))
    if not problems:
        for name, g, e in zip(battery.outputs, got, expected, strict=False):
            problem = _value_problem(name, g, e, tol, call)
            if problem:
                problems.append(problem)
                break
    after_call = dict(_call_arrays(battery, given))
    for path, before in _call_arrays(battery, call):
        after = after_call.get(path)
        if after is not None and not (after.shape == before.shape and np.array_equal(after, before, equal_nan=True)):
            problems.append(Problem("mutated", f"modified its input `{path}` in place"))
            break
    want = np.dtype(case.dtype)
    for name, g in zip(battery.outputs, got, strict=False):
        if g.dtype != want:
            problems.append(Problem("dtype", f"returned `{name}` as {g.dtype} for {want} inputs "
                                    f"({want} in → {want} out)"))
            break
    return problems, got


def _value_problem(name: str, got: np.ndarray, expected: np.ndarray, tol: tuple[float, float], call: Call) -> Problem | None:
    if not np.issubdtype(got.dtype, np.number) and got.dtype != np.bool_:
        return Problem("type", f"returned `{name}` with dtype {got.dtype}, expected numbers")
    ok = close(got, expected, tol)
    if bool(np.all(ok)):
        return None
    g64 = np.asarray(got, np.float64)
    bad = np.argwhere(~ok)
    first = tuple(int(i) for i in bad[0])
    nonfinite = ~np.isfinite(g64) & np.isfinite(expected)
    if nonfinite.any():
        where = tuple(int(i) for i in np.argwhere(nonfinite)[0])
        kinds = "/".join(sorted({"NaN" if np.isnan(x) else "inf" for x in g64[nonfinite].ravel()[:50]}))
        return Problem("values", f"`{name}` has {kinds} in {int(nonfinite.sum())} of {got.size} entries "
                       f"(first at {name}{list(where)}), where the answer is finite")
    with np.errstate(all="ignore"):
        err = np.where(np.isfinite(expected), np.abs(g64 - expected), np.inf)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape)) if err.size else first
    atol, rtol = tol
    return Problem(
        "values",
        f"wrong values: max abs error {float(err[worst]):.3g} in `{name}` at {list(worst)} "
        f"(tolerance {atol:g} + {rtol:g}·|expected|; {len(bad)} of {got.size} entries off)",
    )


# ---------------------------------------------------------------------------------------------
# Running a battery
# ---------------------------------------------------------------------------------------------


def _sizes_text(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} = {v}" for k, v in sizes.items())


def _is_bonus(battery: Battery, case: Case, call: Call, required: tuple[str, ...]) -> bool:
    extra = [k for k in call.kwargs if k not in required and k not in battery.passthrough]
    return case.bonus or bool(extra)


def _prepare_call(battery: Battery, call: Call, accepts: _Accepts) -> Call:
    """Drop the passthrough options the function does not take."""
    kwargs = {k: v for k, v in call.kwargs.items() if k not in battery.passthrough or accepts.takes(k)}
    return Call(call.args, kwargs)


def _attempt(battery, fn, case, call, timeout, tol):
    """Run the function on a copy of ``call`` and judge it: (problems, outcome, expected, got)."""
    expected = battery.split(battery.reference(*call.args, **call.kwargs))
    given = copy.deepcopy(call)
    outcome = run_limited(fn, given.args, given.kwargs, timeout)
    problems, got = _judge(battery, case, call, outcome, expected, given, tol, timeout)
    return problems, outcome, expected, got


def _tolerance(case: Case) -> tuple[float, float]:
    return case.tol or TOLERANCE.get(case.dtype, TOLERANCE["float64"])


def run_battery(
    battery: Battery,
    fn: Callable,
    *,
    options: Sequence[str] | None = None,
    timeout: float | None = 5.0,
    seed: int = 0,
    bonus: bool = True,
) -> list[CaseResult]:
    """Run every case of ``battery`` on ``fn`` (required cases first, then bonus ones)."""
    required = tuple(battery.required_options if options is None else options)
    accepts = _Accepts.of(fn)
    results: list[CaseResult] = []
    timed_out = False
    n_inputs = len(battery.inputs)
    cases = [(c, c.make(seed)) for c in battery.cases]
    ordered = [x for x in cases if not _is_bonus(battery, x[0], x[1], required)]
    ordered += [x for x in cases if _is_bonus(battery, x[0], x[1], required)]
    for case, full_call in ordered:
        is_bonus = _is_bonus(battery, case, full_call, required)
        if is_bonus and not bonus:
            continue
        call = _prepare_call(battery, full_call, accepts)
        if timed_out:
            results.append(CaseResult(case, call, is_bonus, "not run"))
            continue
        missing = [k for k in call.kwargs if not accepts.takes(k)]
        if not (accepts.min_positional <= n_inputs <= accepts.max_positional):
            problem = Problem("signature", _positional_message(battery, accepts))
            results.append(CaseResult(case, call, is_bonus, "fail", [problem]))
            continue
        if missing:
            if is_bonus:
                problem = Problem("signature", f"your function does not take `{missing[0]}`")
            else:
                problem = Problem("signature", f"has no parameter `{missing[0]}`, which the exercise asks for")
            results.append(CaseResult(case, call, is_bonus, "skipped" if is_bonus else "fail", [problem]))
            continue
        tol = _tolerance(case)
        problems, outcome, expected, got = _attempt(battery, fn, case, call, timeout, tol)
        result = CaseResult(case, call, is_bonus, "fail" if problems else "pass", problems, outcome, expected, got)
        results.append(result)
        timed_out = timed_out or (bool(problems) and problems[0].kind == "timeout")
    passed = [r for r in results if r.status == "pass"]
    for result in results:
        if result.status == "fail" and result.outcome is not None:
            result.diagnoses = _diagnose(battery, fn, result.case, result.call, result, timeout, seed, accepts, passed)
    first = next((r for r in results if r.status == "fail" and not r.bonus), None)
    if first is not None and first.problem.kind not in ("timeout", "signature", "stub"):
        first.smallest = _shrink(battery, fn, first, timeout, seed, accepts)
    return results


def _positional_message(battery: Battery, accepts: _Accepts) -> str:
    n = len(battery.inputs)
    names = ", ".join(battery.inputs)
    if accepts.max_positional < n:
        return f"takes {accepts.max_positional} positional argument(s), the exercise passes {n} ({names})"
    return f"requires {accepts.min_positional} positional arguments, the exercise passes {n} ({names})"


# ---------------------------------------------------------------------------------------------
# The smallest input that shows the failure
# ---------------------------------------------------------------------------------------------


def _candidate_sizes(case: Case) -> list[dict[str, int]]:
    keys = list(case.sizes)
    choices = []
    for k in keys:
        top, low = case.sizes[k], case.minimum.get(k, 1)
        choices.append(sorted({v for v in (low, 1, 2, 3, 4, top) if low <= v <= top}))
    candidates = [dict(zip(keys, values, strict=True)) for values in itertools.product(*choices)]
    candidates = [c for c in candidates if c != dict(case.sizes)]
    return sorted(candidates, key=lambda c: (math.prod(max(v, 1) for v in c.values()), sum(c.values())))


def _fingerprint(battery: Battery, call: Call) -> tuple:
    """What distinguishes one call from another for the function: its shapes and plain options."""
    shapes = tuple((path, a.shape) for path, a in _call_arrays(battery, call))
    plain = tuple((k, repr(v)) for k, v in call.kwargs.items() if not isinstance(v, np.ndarray))
    return shapes + plain


def _shrink(battery, fn, result: CaseResult, timeout, seed, accepts, budget: float = 3.0, tries: int = 40):
    """The smallest version of the failing case that fails the same way, or the case itself."""
    case = result.case
    kind = result.problem.kind
    start = time.perf_counter()
    seen = {_fingerprint(battery, result.call)}
    if case.shrink and case.sizes:
        for sizes in _candidate_sizes(case):
            if time.perf_counter() - start > budget or len(seen) > tries:
                break
            call = _prepare_call(battery, case.make(seed, sizes), accepts)
            fingerprint = _fingerprint(battery, call)
            if fingerprint in seen:  # say, other block sizes for a function that takes none
                continue
            seen.add(fingerprint)
            try:
                problems, _outcome, expected, got = _attempt(battery, fn, case, call, timeout, _tolerance(case))
            except Exception:  # a size the reference does not support
                continue
            if problems and problems[0].kind == kind:
                return call, expected, got, sizes
    return result.call, result.expected, result.got, dict(case.sizes)


# ---------------------------------------------------------------------------------------------
# Diagnosis: test each classic mistake
# ---------------------------------------------------------------------------------------------

_GENERAL_ADVICE = {
    "mutated": "the input mutated in place: the caller's array changed. Write `x = x - m` rather "
    "than `x -= m` (or work on a copy): inputs are never modified.",
    "dtype": "float32 silently promoted to float64: NumPy 2 computes in float64 when a float64 "
    "NumPy scalar or array joins a float32 one — `x / np.sqrt(E)`, `np.zeros(shape)` without "
    "`dtype=`. Use `math.sqrt(E)` and `dtype=x.dtype` (float32 in → float32 out).",
    "stub": "replace `raise NotImplementedError()` with your implementation.",
    "timeout": "it did not finish: look for a loop whose condition never changes.",
    "type": "return the result itself as a NumPy array (`np.asarray(...)` if you built a list).",
}


def _as_answer(battery: Battery, value: Any) -> tuple | None:
    """A mistake's answer as a tuple of arrays. A bare array where the function returns several
    outputs predicts the first one only (say `out` without `lse`)."""
    try:
        return battery.split(value)
    except Unexpected:
        return (value,) if isinstance(value, np.ndarray) else None


def _wrong_answers(battery: Battery, mistake: Mistake, call: Call):
    """(kind, value): ("answers", list of tuples of arrays), ("error", exc) or ("none", None)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            value = mistake.wrong(copy.deepcopy(call))
    except Exception as exc:
        return "error", exc
    if value is None:
        return "none", None
    values = list(value) if isinstance(value, Candidates) else [value]
    answers = [a for a in (_as_answer(battery, v) for v in values) if a is not None]
    return ("answers", answers) if answers else ("none", None)


def _mistake_matches(battery, mistake, call, got, outcome, expected, tol) -> bool:
    kind, value = _wrong_answers(battery, mistake, call)
    if kind == "answers" and got is not None:
        for answer in value:
            n = len(answer)
            if same_answer(got[:n], answer, tol) and not same_answer(expected[:n], answer, tol):
                return True
        return False
    if kind == "error" and mistake.match_errors and outcome is not None and outcome.error is not None:
        theirs, ours = outcome.error, value
        return type(theirs) is type(ours) and str(theirs) == str(ours)
    return False


def _refuted(battery: Battery, mistake: Mistake, passed: Sequence[CaseResult]) -> bool:
    """True when the mistake would have failed a case the student passed: not their mistake."""
    for r in passed:
        kind, answers = _wrong_answers(battery, mistake, r.call)
        if kind != "answers":
            continue
        tol = _tolerance(r.case)
        if not any(same_answer(r.expected[: len(a)], a, tol) for a in answers):
            return True
    return False


def _diagnose(battery, fn, case, call, result: CaseResult, timeout, seed, accepts,
             passed: Sequence[CaseResult] = ()) -> list[str]:
    """The mistakes whose answers reproduce the student's (and that do not contradict the cases
    the student passed), each with its advice."""
    problem = result.problem
    found: list[str] = []
    if problem.kind in _GENERAL_ADVICE:
        return [_GENERAL_ADVICE[problem.kind]]
    if problem.kind == "signature":
        return []
    tol = _tolerance(case)
    for mistake in battery.mistakes:
        if result.got is None and mistake.probe is not None and case.sizes:
            # The function raised: run it where this mistake would not crash and compare there
            # (an error message alone cannot tell two mistakes apart).
            sizes = mistake.probe(dict(case.sizes))
            probe_call = _prepare_call(battery, case.make(seed, sizes), accepts)
            try:
                problems, outcome, expected, got = _attempt(battery, fn, case, probe_call, timeout, tol)
            except Exception:
                continue
            if got is not None:
                if (problems and _mistake_matches(battery, mistake, probe_call, got, outcome, expected, tol)
                        and not _refuted(battery, mistake, passed)):
                    found.append(f"{mistake.title} (seen with {_sizes_text(sizes)}, where your function "
                                 f"runs): {mistake.advice}")
                continue
        if (_mistake_matches(battery, mistake, call, result.got, result.outcome, result.expected, tol)
                and not _refuted(battery, mistake, passed)):
            found.append(f"{mistake.title}: {mistake.advice}")
    for other in result.problems[1:]:
        if other.kind in _GENERAL_ADVICE:
            found.append(f"also {other.message} — {_GENERAL_ADVICE[other.kind]}")
    return found


# ---------------------------------------------------------------------------------------------
# The result and its report
# ---------------------------------------------------------------------------------------------


def _wrap(text: str, indent: str, width: int = 100) -> str:
    return textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False)


def _fmt_array(a: np.ndarray, indent: int) -> str:
    text = np.array2string(np.asarray(a), precision=3, suppress_small=True, threshold=120,
                           max_line_width=96 - indent, separator=" ")
    return text.replace("\n", "\n" + " " * indent)


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"{obj.shape}" + (" bool" if obj.dtype == np.bool_ else "")
    if isinstance(obj, tuple | list):
        return "[" + ", ".join(_describe(x) for x in obj) + "]"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        parts = [f"{f.name} {_describe(getattr(obj, f.name))}" for f in dataclasses.fields(obj)
                 if isinstance(getattr(obj, f.name), np.ndarray)]
        return f"{type(obj).__name__}({', '.join(parts)})"
    return repr(obj)


def describe_call(battery: Battery, call: Call, dtype: str) -> str:
    parts = [f"{n} {_describe(a)}" for n, a in zip(battery.inputs, call.args, strict=True)]
    parts += [f"{k}={_describe(v)}" for k, v in call.kwargs.items()]
    return f"{battery.name}({', '.join(parts)})  {dtype}"


def _print_values(battery: Battery, call: Call, indent: str) -> list[str]:
    entries = [(n, a) for n, a in zip(battery.inputs, call.args, strict=True)] + list(call.kwargs.items())
    rows: list[tuple[str, Any]] = []
    for name, arg in entries:
        arrays = list(_arrays_in(arg, name))
        rows += arrays if arrays else [(name, arg)]
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label:<{width}} = "
            + (_fmt_array(value, len(indent) + width + 3) if isinstance(value, np.ndarray) else repr(value))
            for label, value in rows]


@dataclass
class CheckResult:
    """The verdict on one function: ``passed`` (every required case), the per-case ``results`` and a
    readable ``report()`` (also its repr, so a notebook shows it)."""

    name: str
    battery: Battery
    results: list[CaseResult]

    @property
    def required(self) -> list[CaseResult]:
        return [r for r in self.results if not r.bonus]

    @property
    def bonus(self) -> list[CaseResult]:
        return [r for r in self.results if r.bonus]

    @property
    def passed(self) -> bool:
        return all(r.status == "pass" for r in self.required)

    @property
    def first_failure(self) -> CaseResult | None:
        return next((r for r in self.required if r.status == "fail"), None)

    @property
    def diagnosis(self) -> str | None:
        first = self.first_failure
        return first.diagnoses[0] if first is not None and first.diagnoses else None

    def _printed_note(self) -> str:
        lines = sum(r.outcome.printed.lines for r in self.results if r.outcome is not None)
        chars = sum(r.outcome.printed.chars for r in self.results if r.outcome is not None)
        if not chars:
            return ""
        return f" (it printed {lines:,} line{'s' * (lines != 1)} during the checks; not shown)"

    def headline(self) -> str:
        """The one-line verdict."""
        required = self.required
        passed = sum(r.status == "pass" for r in required)
        run = [r for r in self.bonus if r.status in ("pass", "fail")]
        skipped = len(self.bonus) - len(run)
        bonus_text = f", bonus {sum(r.status == 'pass' for r in run)}/{len(run)}" if run else ""
        if skipped:
            bonus_text += f", {skipped} bonus case{'s' * (skipped != 1)} skipped"
        first = self.first_failure
        if first is None:
            return f"{self.name}: PASS {passed}/{len(required)} cases{bonus_text}{self._printed_note()}"
        index = required.index(first) + 1
        text = f"{self.name}: FAIL at case {index}/{len(required)} \"{first.case.title}\": {first.problem.message}"
        if first.problem.kind == "timeout":
            text += "; the remaining cases were not run"
        return text + self._printed_note()

    def report(self) -> str:
        lines = [self.headline()]
        first = self.first_failure
        if first is not None:
            lines += self._failure_lines(first)
        passed = [r.case.title for r in self.required if r.status == "pass"]
        if first is not None and passed:
            lines.append(_wrap(f"  passed: {'; '.join(passed)}", "    "))
        failed_bonus = [r for r in self.bonus if r.status == "fail"]
        if first is not None and failed_bonus:  # the required cases come first
            n, m = len(failed_bonus), len(self.bonus)
            lines.append(f"  bonus: {n} of {m} case{'s' * (m != 1)} fail{'s' * (n == 1)} too "
                         "(shown once the required cases pass)")
        for r in failed_bonus if first is None else []:
            lines.append(f"  bonus \"{r.case.title}\": FAIL — {r.problem.message}")
            for d in r.diagnoses[:1]:
                lines.append(_wrap(f"    diagnosis: {d}", "      "))
        untaken = _unique(k for r in self.bonus if r.status == "skipped" for k in r.call.kwargs
                          if r.problem and f"`{k}`" in r.problem.message)
        if untaken:
            lines.append(_wrap("  bonus cases skipped, for options your function does not take: "
                               + ", ".join(untaken), "    "))
        not_run = [r.case.title for r in self.results if r.status == "not run"]
        if not_run:
            lines.append(_wrap(f"  not run after the time-out: {'; '.join(not_run)}", "    "))
        return "\n".join(lines)

    def _failure_lines(self, r: CaseResult) -> list[str]:
        battery = self.battery
        lines = [f"  call: {describe_call(battery, r.call, r.case.dtype)}"]
        for p in r.problems[1:]:
            lines.append(f"  also: {p.message}")
        for d in r.diagnoses:
            lines.append(_wrap(f"  diagnosis: {d}", "    "))
        if r.problem.kind in ("values", "shape") and not r.diagnoses:
            lines.append(_wrap("  diagnosis: none of the classic mistakes the checker knows reproduces "
                               "your answer; compare your numbers with the expected ones below.", "    "))
        if r.outcome is not None and r.outcome.warned:
            lines.append(f"  NumPy warned: {'; '.join(r.outcome.warned[:3])}")
        if r.outcome is not None and not r.outcome.limited:
            lines.append("  (no time limit: the checker was not run in the main thread)")
        if r.smallest is not None:
            call, expected, got, sizes = r.smallest
            shown = sum(a.size for _, a in _call_arrays(battery, call))
            if shown <= 64:
                lines.append(f"  smallest input that shows it ({_sizes_text(sizes) or 'as built'}):")
                lines += _print_values(battery, call, "    ")
                labelled = [(f"expected {n}", e) for n, e in zip(battery.outputs, expected, strict=False)]
                if got is not None:
                    labelled += [(f"yours    {n}", g) for n, g in zip(battery.outputs, got, strict=False)]
                width = max(len(label) for label, _ in labelled)
                for label, a in labelled:
                    lines.append(f"    {label:<{width}} = {_fmt_array(a, width + 7)}")
            else:
                lines.append(f"  (no smaller input the checker tried shows it; this case's inputs hold {shown} numbers)")
        return lines

    def __repr__(self) -> str:
        return self.report()

    def _repr_html_(self) -> str:
        import html

        colour = "#1a7f37" if self.passed else "#cf222e"
        head, _, rest = self.report().partition("\n")
        body = f"<b style='color:{colour}'>{html.escape(head)}</b>"
        if rest:
            body += "\n" + html.escape(rest)
        return f"<pre style='white-space:pre-wrap'>{body}</pre>"
