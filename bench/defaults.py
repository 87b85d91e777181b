"""Defaults the CLI shows in its help, importable without torch (`python -m bench --help` loads nothing heavy)."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHODS = ["dense", "random", "shortgpt", "blockpruner", "sdtp", "ftp"]
# The default study's tasks: the four on which the default model's dense accuracy is above chance (`bench power`,
# docs/report.md); the other four stay available through --tasks and the study files.
DEFAULT_TASKS = ["piqa", "hellaswag", "arc_easy", "lambada_openai"]
DEFAULT_LIMIT = 50  # items per task, sized with DEFAULT_TASKS for ~15 minutes on a 2-core CPU
DEFAULT_PPL_WINDOWS = 10
MATCH_TOLERANCE = 0.02  # |c − target| for a cell to count as matched (bench.matching)
