"""The tidy results store: one directory per cell, named by the cell's content hash, written atomically.

    results/cells/<hash>/rows.parquet         one row per (cell, task, metric)
    results/cells/<hash>/_cell.json           the cell's identity, provenance and the sha256 of every file it owns
    results/cells/<hash>/_samples.jsonl.gz    per-item scores of accuracy cells (paired statistics)
    results/.staging/                         cells being written (readers never look here)
    results/.locks/                           one lock file per cell: two writers never compute the same cell

A cell is written into `.staging/<hash>@<host>-<pid>/` and renamed into `cells/` whole, so readers of `cells/`
(`load_rows()`, and `pandas.read_parquet("results/cells")`) never see a partial one. A cell counts only when
every file listed in its `_cell.json` manifest is present with the recorded sha256; a cell that fails
verification is reported in one line, skipped by readers and recomputed by `run`."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock, Timeout

from bench.console import terminal
from bench.errors import BenchError
from bench.fileutil import file_sha256, move_into_place, pid_alive

# Column -> pandas dtype. Fixed so every cell's parquet file has the same schema.
SCHEMA: dict[str, str] = {
    "cell": "string", "model": "string", "method": "string", "method_params": "string",
    "target_sparsity": "float64", "measured_sparsity": "float64",
    "task": "string", "metric": "string", "value": "float64", "stderr": "float64", "n": "Int64",
    "limit": "Int64", "batch": "Int64", "seq_len": "Int64",
    "batch_size": "Int64", "seed": "Int64", "calibration_seed": "Int64", "device": "string", "dtype": "string", "threads": "Int64",
    "torch": "string", "transformers": "string", "lm_eval": "string", "bench": "string", "git_commit": "string",
    "artifact": "string", "calibration": "string", "timestamp": "string",
    # the matching protocol (bench.matching): |measured − target| <= 0.02, the knob solved or fitted, and why not
    "matched": "boolean", "knob": "string", "knob_value": "float64", "unmatched_reason": "string",
    "solve_s": "float64",  # seconds the knob solve took before the unit was scored (None: nothing to solve)
}
ROWS, IDENTITY, SAMPLES = "rows.parquet", "_cell.json", "_samples.jsonl.gz"
# metrics that vary from run to run (wall-clock timings, and what is derived from them); every other value of a
# cell must be reproduced exactly
TIMING_METRICS = frozenset(
    {"prefill_ms", "dense_prefill_ms", "decode_tokens_per_s", "peak_memory_mb", "unstable"}
    | {f"{name}{end}" for name in ("prefill_speedup", "decode_speedup", "control_speedup")
       for end in ("", "_lo", "_hi")})
NON_TASK_UNITS = ("wikitext2", "efficiency", "determinism", "latency_sweep")  # units without per-item samples


def _owner_pid(name: str) -> int | None:
    """The pid at the end of a temporary's name (`<hash>@<host>-<pid>`, `<hash>-<pid>`, `.tmp-<hash>-<pid>`)."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _owner_host(name: str) -> str | None:
    """The host in a temporary's name, None for names written before hosts were recorded (this host's)."""
    head = name.rsplit("-", 1)[0]
    return head.rsplit("@", 1)[1] if "@" in head else None


def _this_host() -> str:
    return platform.node().replace("@", "_").replace("/", "_") or "host"


def warn(message: str) -> None:
    print(f"warning: {message}", file=terminal(), flush=True)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.staging = self.root / ".staging"
        self.locks = self.root / ".locks"
        self.opened = time.time()  # --force recomputes cells written before this moment, once
        self._verified: dict[str, tuple[float, str | None]] = {}

    def cell_dir(self, cell: str) -> Path:
        return self.cells / cell

    # -- verification -----------------------------------------------------------------------------------------
    def problem(self, cell: str) -> str | None:
        """None when the cell is present and verified, else why not ('missing' when it was never written)."""
        d = self.cell_dir(cell)
        try:
            stamp = (d / IDENTITY).stat().st_mtime_ns
        except OSError:
            return "missing" if not d.exists() else f"{IDENTITY} is missing"
        cached = self._verified.get(cell)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        reason = _verify(d)
        self._verified[cell] = (stamp, reason)
        return reason

    def is_complete(self, cell: str, report: bool = True) -> bool:
        """Complete = every file the cell owns is present with the checksum recorded at write time. A cell
        present but damaged is reported in one line (and so recomputed by `run`)."""
        reason = self.problem(cell)
        if reason not in (None, "missing") and report:
            warn(f"results cell {self.cell_dir(cell)} failed verification ({reason}); it will be recomputed")
        return reason is None

    def written_at(self, cell: str) -> float:
        try:
            return float(json.loads((self.cell_dir(cell) / IDENTITY).read_text()).get("written", 0.0))
        except (OSError, ValueError, AttributeError):
            return 0.0

    # -- writers ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, cell: str, force: bool = False) -> Iterator[bool]:
        """Hold the cell's lock; yields True when this process should compute the cell, False when it is
        complete already (another process may have finished it while we waited for the lock). With `force`, a
        cell is recomputed once per Store: unless it was written after this Store was opened."""
        self.locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.locks / f"{cell}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"[bench] cell {cell} is being computed by another process; waiting for it", file=terminal(),
                  flush=True)
            lock.acquire()
        try:
            done = self.is_complete(cell, report=False)
            yield not done or (force and self.written_at(cell) < self.opened)
        finally:
            lock.release()

    def remove_stale(self) -> list[Path]:
        """Delete temporaries left by processes that no longer run (a SIGKILL mid-write); returns them."""
        removed = []
        candidates = list(self.staging.iterdir()) if self.staging.is_dir() else []
        # temporaries of earlier versions lived inside cells/ as .tmp-<hash>-<pid> / .old-<hash>-<pid>
        if self.cells.is_dir():
            candidates += [p for p in self.cells.iterdir() if p.name.startswith((".tmp-", ".old-"))]
        for path in candidates:
            pid, host = _owner_pid(path.name), _owner_host(path.name)
            if host not in (None, _this_host()):
                continue  # another node's process (a shared store): whether it still runs cannot be seen from here
            if pid is None or not pid_alive(pid) or pid == os.getpid():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def write(self, cell: str, identity: dict[str, Any], rows: list[dict[str, Any]],
              samples: list[dict[str, Any]] | None = None) -> Path:
        """Write the cell into .staging/, then rename it into cells/ (replacing an old one). Hold `claim(cell)`
        around the computation and the write when other processes may write the same store."""
        frame = to_frame(rows)
        self.cells.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        tmp = self.staging / f"{cell}@{_this_host()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        frame.to_parquet(tmp / ROWS, index=False)
        if samples is not None:
            with gzip.open(tmp / SAMPLES, "wt") as fh:
                for item in samples:
                    fh.write(json.dumps(item) + "\n")
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        meta = {"cell": cell, "identity": identity, "files": files, "written": time.time()}
        (tmp / IDENTITY).write_text(json.dumps(meta, indent=1, default=str))
        final = self.cell_dir(cell)
        move_into_place(tmp, final, self.staging / f"old-{cell}@{_this_host()}-{os.getpid()}")
        return final

    # -- readers ----------------------------------------------------------------------------------------------
    def cell_names(self) -> list[str]:
        if not self.cells.is_dir():
            return []
        return sorted(p.name for p in self.cells.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))

    def verified_cells(self) -> list[str]:
        """Every cell that passes verification; the others are named in one warning line."""
        good, bad = [], []
        for cell in self.cell_names():
            reason = self.problem(cell)
            (good if reason is None else bad).append((cell, reason))
        if bad:
            listed = "; ".join(f"{cell}: {reason}" for cell, reason in bad)
            warn(f"skipped {len(bad)} damaged results cell(s) in {self.cells} ({listed}); rerun the same "
                 "`python -m bench run` to recompute them")
        return [cell for cell, _ in good]

    def load_rows(self) -> pd.DataFrame:
        cells = self.verified_cells()
        if not cells:
            raise BenchError(f"no results in {self.root}; run `python -m bench run` first (or pass --results DIR)")
        frames = []
        for cell in cells:
            try:
                frames.append(pd.read_parquet(self.cell_dir(cell) / ROWS))
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise BenchError(f"results entry {self.cell_dir(cell)} is corrupt ({exc}); rerun the same "
                                 "`python -m bench run` to recompute it") from exc
        return to_frame(pd.concat(frames, ignore_index=True))

    def load_identity(self, cell: str) -> dict[str, Any]:
        """What made the cell (method, params, unit, settings) and what the method reported doing (`stats`)."""
        try:
            return json.loads((self.cell_dir(cell) / IDENTITY).read_text())["identity"]
        except (OSError, ValueError, KeyError) as exc:
            raise BenchError(f"results entry {self.cell_dir(cell)} is corrupt ({exc}); rerun the same "
                             "`python -m bench run` to recompute it") from exc

    def load_samples(self, cell: str) -> list[dict[str, Any]]:
        path = self.cell_dir(cell) / SAMPLES
        if not path.is_file():
            return []
        try:
            with gzip.open(path, "rt") as fh:
                return [json.loads(line) for line in fh]
        except (OSError, ValueError, EOFError) as exc:
            raise BenchError(f"samples of cell {cell} are corrupt ({exc}); rerun the same `python -m bench run` "
                             "to recompute it") from exc


def _verify(d: Path) -> str | None:
    try:
        meta = json.loads((d / IDENTITY).read_text())
    except (OSError, ValueError) as exc:
        return f"{IDENTITY} unreadable: {type(exc).__name__}"
    if not isinstance(meta, dict) or meta.get("cell") != d.name:
        return f"{IDENTITY} does not describe this cell"
    files = meta.get("files")
    if files is None:
        return _verify_legacy(d, meta)
    if not isinstance(files, dict) or ROWS not in files:
        return f"{IDENTITY} has no file manifest"
    for name, digest in files.items():
        path = d / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def _verify_legacy(d: Path, meta: dict[str, Any]) -> str | None:
    """Cells written before the manifest existed: verified by a full parse of every file they own."""
    try:
        pd.read_parquet(d / ROWS)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        return f"{ROWS} unreadable: {type(exc).__name__}"
    unit = (meta.get("identity") or {}).get("unit")
    if unit is not None and unit not in NON_TASK_UNITS or (d / SAMPLES).exists():
        try:
            with gzip.open(d / SAMPLES, "rt") as fh:
                for line in fh:
                    json.loads(line)
        except (OSError, ValueError, EOFError) as exc:
            return f"{SAMPLES} missing or unreadable: {type(exc).__name__}"
    return None


def to_frame(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    for column in SCHEMA:
        if column not in frame:
            frame[column] = None
    return frame[list(SCHEMA)].astype(SCHEMA)
