"""environment.yml mirrors pyproject.toml: the same packages, by name."""

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# conda-forge names for PyPI packages whose names differ there
CONDA_NAME = {"cupy-cuda12x": "cupy", "cupy-cuda13x": "cupy"}
# the GPU extra and the benchmarks' are documented in the file's header instead
NOT_IN_CONDA_FILE = {"cupy", "torch", "transformers", "accelerate", "blis"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        names |= {_name(r) for r in extra if not r.startswith("attention_ref")}
    return {CONDA_NAME.get(n, n) for n in names} - NOT_IN_CONDA_FILE


def environment_packages() -> set[str]:
    names = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("\ndependencies:", 1)[1].splitlines():
        match = re.match(r"^\s{2}-\s+([A-Za-z0-9_.\-]+)", line)
        if match and not line.strip().startswith("- pip:"):
            names.add(_name(match.group(1)))
    return names - {"python", "pip"}


def test_environment_yml_names_the_same_packages_as_pyproject():
    assert environment_packages() == pyproject_packages()


def test_python_versions_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10,<3.14"
    assert "python>=3.10,<3.14" in (ROOT / "environment.yml").read_text()
