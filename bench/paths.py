"""Where bench keeps its caches (dequantized models, calibration artifacts, prepared task data)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """$BENCH_CACHE, else ~/.cache/bench."""
    root = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "bench")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
