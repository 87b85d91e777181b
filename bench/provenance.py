"""Which code, libraries, model setup and machine made a row: built once per process, stamped on every row."""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version

import torch

from bench.paths import REPO_ROOT

BENCH_VERSION = "0.1.0"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class Provenance:
    model: str
    seed: int
    device: str
    dtype: str
    threads: int
    batch_size: int
    torch: str
    transformers: str
    lm_eval: str
    bench: str
    git_commit: str

    @classmethod
    def current(cls, model_name: str, model, seed: int, batch_size: int) -> Provenance:
        return cls(model=model_name, seed=seed, device=str(next(model.parameters()).device),
                   dtype=str(model.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                   batch_size=batch_size, torch=torch.__version__, transformers=version("transformers"),
                   lm_eval=version("lm_eval"), bench=BENCH_VERSION, git_commit=git_commit())

    def columns(self) -> dict:
        """The row columns, with the time the row was made."""
        return {**asdict(self), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
