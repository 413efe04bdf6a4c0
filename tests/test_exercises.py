"""``make exercises``: student versions of the notebooks. Solutions become stubs, outputs go, the
student version runs up to its first stub, and every check cell fails on the stubs (a check that
passes on an empty answer checks nothing). Tested on a small fixture notebook and on every course
notebook that has solution cells."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from attention_ref.exercises import (
    CODE_STUB,
    TEXT_STUB,
    ExerciseFormatError,
    has_solutions,
    is_check_cell,
    is_solution_cell,
    main,
    student_notebook,
    student_source,
    validate,
    write_exercises,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FIXTURE = ROOT / "tests" / "data" / "exercises_fixture.ipynb"


def test_a_region_becomes_nbgraders_stub_at_its_indentation():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nprint(f)"
    assert student_source(source) == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n\nprint(f)"
    )


def test_stated_stub_lines_replace_the_region():
    source = ("def f(x):\n    ### BEGIN SOLUTION\n    ### STUB y = ...  # twice x\n    ### STUB\n"
              "    ### STUB return y\n    y = 2 * x\n    return y\n    ### END SOLUTION")
    assert student_source(source) == "def f(x):\n    y = ...  # twice x\n\n    return y"


def test_hidden_tests_disappear_and_whole_cells_are_replaced():
    source = "### BEGIN HIDDEN TESTS\nassert secret()\n### END HIDDEN TESTS\ncheck(f, 'softmax')"
    assert student_source(source) == "check(f, 'softmax')"
    assert student_source("x = 1", solution=True) == "\n".join(CODE_STUB)
    assert student_source("Because …", "markdown", solution=True) == TEXT_STUB
    assert student_source("Q?\n### BEGIN SOLUTION\nA.\n### END SOLUTION", "markdown") == f"Q?\n{TEXT_STUB}"


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx\n", "without"),
        ("### END SOLUTION\n", "without"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside another region"),
    ],
)
def test_broken_regions_are_errors(source, message):
    with pytest.raises(ExerciseFormatError, match=message):
        student_source(source)


def _cell(source, **nbgrader):
    cell = nbformat.v4.new_code_cell(source)
    if nbgrader:
        cell.metadata["nbgrader"] = nbgrader
    return cell


def test_validate_names_each_broken_convention():
    good = dict(grade=False, grade_id="a", locked=False, schema_version=3, solution=True, task=False)
    nb = nbformat.v4.new_notebook(cells=[
        _cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION"),  # region without metadata
        _cell("### STUB x = ...\nx = 1"),  # stub outside a region
        _cell("x", **{**good, "schema_version": 2}),
        _cell("x", **{**good, "grade_id": "b", "grade": True}),  # graded without points
        _cell("x", **{**good, "grade_id": "a"}),  # grade_id used twice
        _cell("check(f)", **{**good, "grade_id": "c", "solution": False, "grade": True, "points": 1}),  # unlocked
        _cell("x", grade=False, solution=True),  # keys missing
    ])
    problems = validate(nb)
    expected = ["cell 0: has a 'BEGIN SOLUTION' region but no", "cell 1: '### STUB' lines outside",
                "cell 2: nbgrader schema_version must be 3", "cell 3: a graded cell needs points",
                "cell 4: grade_id 'a' already used by cell 2", "cell 5: a check cell must be locked",
                "cell 6: nbgrader metadata lacks grade_id, locked, schema_version, task"]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    with pytest.raises(ExerciseFormatError):
        student_notebook(nb)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")) + [FIXTURE], ids=lambda p: p.name)
def test_every_notebook_keeps_the_exercise_conventions(path):
    assert validate(nbformat.read(path, as_version=4)) == []


# ---------------------------------------------------------------------------------------------
# The student versions
# ---------------------------------------------------------------------------------------------


def test_the_fixture_student_version(tmp_path):
    source = nbformat.read(FIXTURE, as_version=4)
    assert has_solutions(source)
    assert main([str(FIXTURE.parent), "--output", str(tmp_path)]) == 0
    written = sorted(tmp_path.iterdir())
    assert [p.name for p in written] == [FIXTURE.name]  # the reference notebook has no solutions
    student = nbformat.read(written[0], as_version=4)
    assert len(student.cells) == len(source.cells)
    for before, after in zip(source.cells, student.cells, strict=True):
        assert after.metadata.get("nbgrader") == before.metadata.get("nbgrader")
        assert "BEGIN SOLUTION" not in after.source and "HIDDEN TESTS" not in after.source
        assert "### STUB" not in after.source
        if after.cell_type == "code":
            assert after.outputs == [] and after.execution_count is None
    softmax_cell, sdpa_cell, answer_cell = (c for c in student.cells if is_solution_cell(c))
    assert softmax_cell.source == "def softmax(x, axis=-1):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    assert sdpa_cell.source.splitlines()[1:] == [
        "    tau = ...  # 1/√E unless scale is given",
        "    logits = ...  # Z = τ Q Kᵀ, then the masks",
        "    return softmax(logits) @ value",
    ]
    assert answer_cell.source == TEXT_STUB


def test_the_fixture_is_executed_with_outputs_to_clear():
    code = [c for c in nbformat.read(FIXTURE, as_version=4).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert all(c.outputs for c in code if is_check_cell(c))


def test_make_exercises_with_no_solutions_anywhere(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), plain / "a.ipynb")
    assert main([str(plain), "--output", str(tmp_path / "out")]) == 0
    assert "has solution cells yet" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def run_cells(nb, cwd: Path):
    """Execute ``nb`` cell by cell in a fresh kernel; (cell, error name or None) for each cell."""
    import nbclient
    from nbclient.exceptions import CellExecutionError

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": str(cwd)}})
    results = []
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
                results.append((cell, None))
            except CellExecutionError as exc:
                results.append((cell, exc.ename))
    return results


def assert_runs_to_first_stub_and_checks_fail(student, cwd: Path):
    """Every cell before the first solution cell runs; each solution cell that raises raises
    NotImplementedError (the stub); every check cell fails."""
    results = run_cells(student, cwd)
    first_solution = next(i for i, (cell, _) in enumerate(results) if is_solution_cell(cell))
    for cell, error in results[:first_solution]:
        assert error is None, f"{error} before the first exercise in:\n{cell.source}"
    checks = [(cell, error) for cell, error in results if is_check_cell(cell)]
    assert checks, "no check cell"
    for cell, error in checks:
        assert error is not None, f"this check passes on the stub:\n{cell.source}"
    for cell, error in results:
        if is_solution_cell(cell) and error is not None:
            assert error == "NotImplementedError", (error, cell.source)
    return results


def test_the_fixture_student_version_runs_to_its_stub_and_its_checks_fail():
    student = student_notebook(nbformat.read(FIXTURE, as_version=4))
    results = assert_runs_to_first_stub_and_checks_fail(student, FIXTURE.parent)
    errors = [error for cell, error in results if is_check_cell(cell)]
    assert errors == ["AssertionError", "AssertionError"]
    softmax_check = next(cell for cell, _ in results if is_check_cell(cell))
    assert "still the exercise's stub" in softmax_check.outputs[-1]["evalue"]


def test_the_fixture_solutions_pass_their_checks():
    results = run_cells(nbformat.read(FIXTURE, as_version=4), FIXTURE.parent)
    assert [error for _, error in results] == [None] * len(results)


def notebooks_with_solutions() -> list[Path]:
    return [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if has_solutions(nbformat.read(p, as_version=4))]


@pytest.mark.slow
@pytest.mark.parametrize("path", notebooks_with_solutions(), ids=lambda p: p.name)
def test_each_course_notebooks_student_version(path, tmp_path):
    (written,) = write_exercises([path], tmp_path)
    # Run it where the notebook lives, so its relative paths (figures, data) resolve as in the course.
    assert_runs_to_first_stub_and_checks_fail(nbformat.read(written, as_version=4), NOTEBOOKS)
