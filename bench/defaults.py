"""Defaults the CLI shows in its help, importable without torch (`python -m bench --help` loads nothing heavy)."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHODS = ["dense", "random", "shortgpt", "blockpruner", "sdtp", "ftp"]
DEFAULT_LIMIT = 50  # items per task, sized for a 2-core CPU
DEFAULT_PPL_WINDOWS = 10
MATCH_TOLERANCE = 0.02  # |c − target| for a cell to count as matched (bench.matching)
