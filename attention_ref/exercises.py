"""Student versions of the course notebooks, without nbgrader: ``make exercises``, or
``python -m attention_ref.exercises [NOTEBOOK_OR_FOLDER ...] [--output exercises]``.

Every notebook that holds solution cells gets a student version in ``exercises/`` (ignored by
git): solution regions replaced by stubs, outputs and execution counts cleared. The committed
notebooks keep their solutions, so nbval runs them in CI and an instructor who uses nbgrader can
release them as they are (``nbgrader generate_assignment`` produces the same student version, except
for the stated stubs below, which nbgrader replaces by its default stub).

How to write an exercise (nbgrader's source format)
---------------------------------------------------
1. **Solution cell** (a code cell the student completes). Put the answer between the two markers;
   the lines around them are given to the student as they are::

       def softmax(x, axis=-1):
           ### BEGIN SOLUTION
           m = np.max(x, axis=axis, keepdims=True)
           ...
           ### END SOLUTION

   The student sees ``# YOUR CODE HERE`` and ``raise NotImplementedError()`` at the markers'
   indentation. To give a stated stub instead, write its lines inside the region as
   ``### STUB <code>`` (each at the indentation it should have); they replace the region::

           ### BEGIN SOLUTION
           ### STUB m = ...  # the maximum of each row (keepdims=True)
           ### STUB return ...
           m = np.max(x, axis=axis, keepdims=True)
           ...
           ### END SOLUTION

   Cell metadata (Edit → Cell metadata, or the nbgrader toolbar's "Autograded answer")::

       "nbgrader": {"grade": false, "grade_id": "softmax-solution", "locked": false,
                    "schema_version": 3, "solution": true, "task": false}

2. **Check cell** (an autograded test, read-only for the student), right after the solution::

       check(softmax, "softmax", raise_on_failure=True)

   (``from attention_ref.check import check`` in an earlier cell.) It prints the checker's report
   and fails with the report when the function is wrong. Metadata::

       "nbgrader": {"grade": true, "grade_id": "softmax-check", "locked": true, "points": 2,
                    "schema_version": 3, "solution": false, "task": false}

   Lines between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS`` in a check cell are removed
   from the student version (nbgrader's hidden tests).

3. **Question cell** (a written answer): a Markdown cell holding the model answer, replaced as a
   whole by "YOUR ANSWER HERE" (or only its ``### BEGIN SOLUTION`` … ``### END SOLUTION`` region).
   Metadata::

       "nbgrader": {"grade": true, "grade_id": "scale-answer", "locked": false, "points": 1,
                    "schema_version": 3, "solution": true, "task": false}

   Experiments ("change the mask and watch the weights") are ordinary cells: no metadata.

Rules checked by :func:`validate` (and by the tests, for every notebook in ``notebooks/``): every
region is closed and not nested, lies in a cell marked ``"solution": true``, and ``### STUB`` lines
lie inside regions; every nbgrader cell has the keys above with schema_version 3 and a
``grade_id`` unique in its notebook; graded cells have ``points``; check cells are locked. The
student version must run (nbclient) up to its first stub, and every check cell must *fail* on
the stubs: a check that passes on an empty answer checks nothing.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import nbformat

BEGIN_SOLUTION, END_SOLUTION = "BEGIN SOLUTION", "END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
STUB = "### STUB"
CODE_STUB = ("# YOUR CODE HERE", "raise NotImplementedError()")
TEXT_STUB = "YOUR ANSWER HERE"
NBGRADER_KEYS = ("grade", "grade_id", "locked", "schema_version", "solution", "task")


class ExerciseFormatError(ValueError):
    """A notebook breaks the exercise conventions."""


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_solution_cell(cell) -> bool:
    return bool(_nbgrader(cell).get("solution"))


def is_check_cell(cell) -> bool:
    """An autograded test cell: graded, not a solution."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade")) and not meta.get("solution") and cell.get("cell_type") == "code"


def _has_region(source: str, begin: str = BEGIN_SOLUTION) -> bool:
    return any(begin in line for line in source.splitlines())


def has_solutions(nb) -> bool:
    """Whether the notebook has anything to take out for students."""
    return any(is_solution_cell(c) or _has_region(c.source) for c in nb.cells)


def _replace_regions(source: str, begin: str, end: str, stub_of) -> tuple[str, bool]:
    """Replace every begin…end region (marker lines included) by ``stub_of(indent, region_lines)``.
    The markers are found anywhere in a line, as nbgrader does."""
    out: list[str] = []
    region: list[str] | None = None
    indent = ""
    replaced = False
    for number, line in enumerate(source.split("\n"), 1):
        if begin in line:
            if region is not None:
                raise ExerciseFormatError(f"line {number}: {begin!r} inside another region")
            region, indent = [], re.match(r"\s*", line).group(0)
        elif end in line:
            if region is None:
                raise ExerciseFormatError(f"line {number}: {end!r} without {begin!r}")
            out.extend(stub_of(indent, region))
            region, replaced = None, True
        elif region is not None:
            region.append(line)
        else:
            out.append(line)
    if region is not None:
        raise ExerciseFormatError(f"{begin!r} without {end!r}")
    return "\n".join(out), replaced


def _code_stub(indent: str, region: list[str]) -> list[str]:
    """The stated ``### STUB`` lines of a region, or nbgrader's default stub."""
    stated = []
    for line in region:
        stripped = line.lstrip()
        if stripped.startswith(STUB):
            code = stripped[len(STUB):]
            code = code[1:] if code.startswith(" ") else code
            stated.append(line[: len(line) - len(stripped)] + code if code else "")
    return stated or [indent + line for line in CODE_STUB]


def student_source(source: str, cell_type: str = "code", solution: bool = False) -> str:
    """The student's version of one cell's source.

    Solution regions become their stubs; hidden-test regions disappear; a solution cell without
    a region is replaced as a whole (code: the default stub, Markdown: "YOUR ANSWER HERE").
    """
    if cell_type == "code":
        source, replaced = _replace_regions(source, BEGIN_SOLUTION, END_SOLUTION, _code_stub)
        source, _ = _replace_regions(source, BEGIN_HIDDEN, END_HIDDEN, lambda indent, region: [])
        if solution and not replaced:
            source = "\n".join(CODE_STUB)
        return source
    source, replaced = _replace_regions(source, BEGIN_SOLUTION, END_SOLUTION, lambda indent, region: [TEXT_STUB])
    return TEXT_STUB if solution and not replaced else source


def student_notebook(nb):
    """A copy of ``nb`` as students get it: solutions replaced, outputs and counts cleared.
    The nbgrader metadata stays (nbgrader's autograder needs it)."""
    problems = validate(nb)
    if problems:
        raise ExerciseFormatError("; ".join(problems))
    student = copy.deepcopy(nb)
    for cell in student.cells:
        cell.source = student_source(cell.source, cell.cell_type, is_solution_cell(cell))
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    return student


def validate(nb) -> list[str]:
    """Every way ``nb`` breaks the exercise conventions (an empty list when it keeps them)."""
    problems: list[str] = []
    ids: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        where = f"cell {index}"
        meta = _nbgrader(cell)
        try:
            student_source(cell.source, cell.cell_type, is_solution_cell(cell))
        except ExerciseFormatError as exc:
            problems.append(f"{where}: {exc}")
        regions = _has_region(cell.source)
        if regions and not meta.get("solution"):
            problems.append(f"{where}: has a {BEGIN_SOLUTION!r} region but no nbgrader metadata "
                            '"solution": true')
        if cell.cell_type == "code" and not regions and any(
                line.lstrip().startswith(STUB) for line in cell.source.splitlines()):
            problems.append(f"{where}: {STUB!r} lines outside a solution region")
        if not meta:
            continue
        missing = [k for k in NBGRADER_KEYS if k not in meta]
        if missing:
            problems.append(f"{where}: nbgrader metadata lacks {', '.join(missing)}")
        if meta.get("schema_version") != 3:
            problems.append(f"{where}: nbgrader schema_version must be 3, got {meta.get('schema_version')!r}")
        grade_id = meta.get("grade_id")
        if grade_id in ids:
            problems.append(f"{where}: grade_id {grade_id!r} already used by cell {ids[grade_id]}")
        elif grade_id:
            ids[grade_id] = index
        if meta.get("grade") and not isinstance(meta.get("points"), int | float):
            problems.append(f"{where}: a graded cell needs points")
        if is_check_cell(cell) and not meta.get("locked"):
            problems.append(f"{where}: a check cell must be locked")
    return problems


def _notebooks(sources: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for source in sources:
        found += sorted(source.glob("*.ipynb")) if source.is_dir() else [source]
    return found


def write_exercises(sources: Sequence[str | Path] = ("notebooks",), output: str | Path = "exercises") -> list[Path]:
    """Write the student version of every notebook in ``sources`` (notebooks or folders) that has
    solution cells to ``output``. Returns the files written."""
    output = Path(output)
    written: list[Path] = []
    for path in _notebooks(Path(s) for s in sources):
        nb = nbformat.read(path, as_version=4)
        if not has_solutions(nb):
            continue
        try:
            student = student_notebook(nb)
        except ExerciseFormatError as exc:
            raise ExerciseFormatError(f"{path}: {exc}") from None
        output.mkdir(parents=True, exist_ok=True)
        target = output / path.name
        nbformat.write(student, target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.exercises",
        description="Write student versions (solutions replaced by stubs, outputs cleared) of every "
        "notebook with solution cells.",
    )
    parser.add_argument("sources", nargs="*", default=["notebooks"], help="notebooks or folders (default: notebooks)")
    parser.add_argument("--output", "-o", default="exercises", help="folder to write to (default: exercises)")
    args = parser.parse_args(argv)
    try:
        written = write_exercises(args.sources, args.output)
    except ExerciseFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no notebook in {', '.join(args.sources)} has solution cells yet: nothing to write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
