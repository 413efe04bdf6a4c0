"""Test runs never rewrite the committed figures (some show measured times or memory): notebooks
executed by nbval or by the exercise tests see ATTENTION_REF_SAVE_FIGURES=0, however pytest is
started. `make course` is what writes figures."""

import os

os.environ.setdefault("ATTENTION_REF_SAVE_FIGURES", "0")
