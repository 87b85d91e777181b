"""The tidy results store: one directory per cell, named by the cell's content hash, written atomically.

    results/cells/<hash>/rows.parquet         one row per (cell, task, metric)
    results/cells/<hash>/_cell.json           the cell's identity and provenance ("_" = ignored by readers)
    results/cells/<hash>/_samples.jsonl.gz    per-item scores of accuracy cells (paired statistics)

`pandas.read_parquet("results/cells")` reads the whole store in one call (pyarrow skips "_"/"." files);
`load_rows()` does the same with a clear error on a corrupt entry."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError

# Column -> pandas dtype. Fixed so every cell's parquet file has the same schema.
SCHEMA: dict[str, str] = {
    "cell": "string", "model": "string", "method": "string", "method_params": "string",
    "target_sparsity": "float64", "measured_sparsity": "float64",
    "task": "string", "metric": "string", "value": "float64", "stderr": "float64", "n": "Int64",
    "limit": "Int64", "batch": "Int64", "seq_len": "Int64",
    "batch_size": "Int64", "seed": "Int64", "device": "string", "dtype": "string", "threads": "Int64",
    "torch": "string", "transformers": "string", "lm_eval": "string", "bench": "string", "git_commit": "string",
    "artifact": "string", "calibration": "string", "timestamp": "string",
    # the matching protocol (bench.matching): |measured − target| <= 0.02, the knob solved or fitted, and why not
    "matched": "boolean", "knob": "string", "knob_value": "float64", "unmatched_reason": "string",
}


def cell_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells = self.root / "cells"

    def cell_dir(self, cell: str) -> Path:
        return self.cells / cell

    def is_complete(self, cell: str) -> bool:
        """A cell is complete when its directory exists: it only ever appears whole (atomic rename)."""
        d = self.cell_dir(cell)
        return (d / "_cell.json").is_file() and (d / "rows.parquet").is_file()

    def write(self, cell: str, identity: dict[str, Any], rows: list[dict[str, Any]],
              samples: list[dict[str, Any]] | None = None) -> Path:
        """Write the cell into a temporary directory, then rename it into place (replacing an old one)."""
        frame = to_frame(rows)
        self.cells.mkdir(parents=True, exist_ok=True)
        tmp = self.cells / f".tmp-{cell}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        frame.to_parquet(tmp / "rows.parquet", index=False)
        if samples is not None:
            with gzip.open(tmp / "_samples.jsonl.gz", "wt") as fh:
                for item in samples:
                    fh.write(json.dumps(item) + "\n")
        (tmp / "_cell.json").write_text(json.dumps({"cell": cell, "identity": identity}, indent=1, default=str))
        final = self.cell_dir(cell)
        if final.exists():
            old = self.cells / f".old-{cell}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        return final

    def load_rows(self) -> pd.DataFrame:
        if not self.cells.is_dir() or not any(self.cells.glob("*/rows.parquet")):
            raise BenchError(f"no results in {self.root}; run `python -m bench run` first (or pass --results DIR)")
        frames = []
        for path in sorted(self.cells.glob("*/rows.parquet")):
            try:
                frames.append(pd.read_parquet(path))
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise BenchError(f"results entry {path.parent} is corrupt ({exc}); delete that directory and "
                                 "rerun `python -m bench run` to recompute it") from exc
        return to_frame(pd.concat(frames, ignore_index=True))

    def load_samples(self, cell: str) -> list[dict[str, Any]]:
        path = self.cell_dir(cell) / "_samples.jsonl.gz"
        if not path.is_file():
            return []
        try:
            with gzip.open(path, "rt") as fh:
                return [json.loads(line) for line in fh]
        except (OSError, ValueError) as exc:
            raise BenchError(f"samples of cell {cell} are corrupt ({exc}); delete {path.parent} and rerun") from exc


def to_frame(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    for column in SCHEMA:
        if column not in frame:
            frame[column] = None
    return frame[list(SCHEMA)].astype(SCHEMA)
