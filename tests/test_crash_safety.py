"""Fault injection on the tiny random LLaMA: SIGKILL a sweep at random moments, run sweeps concurrently on one
store, and damage every file the product reads back. Whatever happens, the store stays readable, a rerun
restores exactly what an uninterrupted run writes, and nothing is computed twice or left behind.

The sweep runs in its own process (tests/sweep.py, about 6 s of imports + 3 s of work on 2 cores).
BENCH_FAULT_KILLS raises the number of random kills (default 5; the issue's full drill is 20)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.store import Store

SWEEP = Path(__file__).resolve().parent / "sweep.py"
sys.path.insert(0, str(SWEEP.parent))
from sweep import TIMING_METRICS, UNITS_PER_METHOD  # noqa: E402

KILLS = int(os.environ.get("BENCH_FAULT_KILLS", "5"))
SEED = int(os.environ.get("BENCH_FAULT_SEED", "17"))
WRITERS = [int(n) for n in os.environ.get("BENCH_FAULT_WRITERS", "3").split(",")]  # 3 contend pairwise too
N_CELLS = 2 * UNITS_PER_METHOD  # dense + shortgpt
REFERENCE: dict[str, float] = {}  # the uninterrupted sweep's seconds of work
pytestmark = pytest.mark.faults


def _start(results: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SWEEP), str(results), *extra], stdout=subprocess.PIPE,
                            stderr=open(log, "ab"), text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _finish(proc: subprocess.Popen, log: Path) -> dict:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    return json.loads(out.strip().splitlines()[-1])


def _values(results: Path) -> pd.Series:
    """Every stored value except timings, by (cell, task, metric): what two runs must agree on exactly."""
    rows = Store(results).load_rows()
    rows = rows[~rows["metric"].isin(TIMING_METRICS)]
    return rows.set_index(["cell", "task", "metric"])["value"].sort_index()


def _leftovers(results: Path) -> list[str]:
    store = Store(results)
    stray = [p.name for p in store.staging.iterdir()] if store.staging.is_dir() else []
    stray += [p.name for p in store.cells.iterdir() if p.name.startswith((".", "_")) or not p.is_dir()]
    stray += [c for c in store.cell_names() if not store.is_complete(c, report=False)]
    return stray


def _table_reads(results: Path, capsys) -> None:
    """`python -m bench table` (its code, in this process) right after a kill: no traceback, no damaged cell."""
    code = main(["table", "--results", str(results)])
    err = capsys.readouterr().err
    if Store(results).cell_names():
        assert code == 0 and err == "", err
    else:
        assert code == 2 and err.startswith("error: no results")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted sweep (it also calibrates shortgpt on the tiny model into this session's cache)."""
    base = tmp_path_factory.getbasetemp()
    cache = base / "bench-cache"
    cache.mkdir(exist_ok=True)
    models = os.environ.get("BENCH_CACHE") or os.path.expanduser("~/.cache/bench")
    if not (cache / "models").exists():
        (cache / "models").symlink_to(os.path.join(models, "models"), target_is_directory=True)
    results = base / "reference-results"
    os.environ["BENCH_CACHE"] = str(cache)  # same cache as the autouse fixture gives every test
    try:
        report = _finish(_start(results, base / "reference.log"), base / "reference.log")
        REFERENCE["work_seconds"] = report["work_seconds"]  # the kill test draws its moments from this
    finally:
        os.environ.pop("BENCH_CACHE")
        if models != os.path.expanduser("~/.cache/bench"):
            os.environ["BENCH_CACHE"] = models
    assert len(report["written"]) == N_CELLS
    return results


def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(reference, tmp_path, capsys):
    results, log = tmp_path / "results", tmp_path / "sweep.log"
    rng = random.Random(SEED)
    interrupted = 0
    for _ in range(KILLS):
        proc = _start(results, log)
        assert proc.stdout.readline().strip() == "[sweep] started", log.read_text()[-3000:]
        left = 1 - len(Store(results).cell_names()) / N_CELLS  # a moment of the work this rerun has left
        time.sleep(rng.uniform(0.0, REFERENCE["work_seconds"] * left))
        interrupted += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _table_reads(results, capsys)
    print(f"{interrupted}/{KILLS} kills landed while the sweep worked ({REFERENCE['work_seconds']:.1f} s of work)")
    assert interrupted >= 1, "no kill landed while the sweep worked"
    report = _finish(_start(results, log), log)
    assert not _leftovers(results)
    assert len(report["written"]) + len(report["skipped"]) == N_CELLS
    pd.testing.assert_series_equal(_values(results), _values(reference))


def test_sigkill_between_staging_and_rename_then_during_force(reference, tmp_path, capsys):
    """The worst moments: a cell fully staged in results/.staging, not yet renamed into cells/; and, under
    --force, an old cell moved aside with its replacement staged."""
    results, log = tmp_path / "results", tmp_path / "sweep.log"
    proc = _start(results, log, "--die-at-rename", "3")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    store = Store(results)
    assert len(store.cell_names()) == 2 and len(list(store.staging.iterdir())) == 1  # the staged third cell
    assert pd.read_parquet(store.cells)["cell"].nunique() == 2  # pandas on cells/ never sees the temporary
    _table_reads(results, capsys)
    proc = _start(results, log, "--force", "--die-at-rename", "2")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    _table_reads(results, capsys)  # the cell being replaced is absent, never counted twice
    assert pd.read_parquet(store.cells)["cell"].nunique() == store.load_rows()["cell"].nunique()
    report = _finish(_start(results, log), log)
    assert len(report["written"]) >= 1 and not _leftovers(results)
    pd.testing.assert_series_equal(_values(results), _values(reference))


@pytest.mark.parametrize("writers", WRITERS)
def test_concurrent_runs_compute_each_cell_once(reference, tmp_path, writers):
    results = tmp_path / "results"
    procs = [(_start(results, tmp_path / f"w{i}.log"), tmp_path / f"w{i}.log") for i in range(writers)]
    reports = [_finish(proc, log) for proc, log in procs]
    written = [cell for report in reports for cell in report["written"]]
    assert sorted(written) == sorted(set(written)) and len(written) == N_CELLS  # each cell computed once
    for report in reports:
        assert len(report["written"]) + len(report["skipped"]) == N_CELLS
    assert not _leftovers(results)
    pd.testing.assert_series_equal(_values(results), _values(reference))


# -- damaged cells -------------------------------------------------------------------------------------------
def _cells_by_unit(results: Path) -> dict[tuple[str, str], str]:
    rows = Store(results).load_rows()
    return {(m, t): c for m, t, c in rows[["method", "task", "cell"]].drop_duplicates().itertuples(index=False)}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_samples_make_the_cell_incomplete_and_readers_skip_it(reference, tmp_path, capsys, damage):
    results = tmp_path / "results"
    shutil.copytree(reference, results)
    cell = _cells_by_unit(results)[("shortgpt", "piqa")]
    samples = Store(results).cell_dir(cell) / "_samples.jsonl.gz"
    if damage == "truncate":
        samples.write_bytes(samples.read_bytes()[:20])
    else:
        samples.unlink()
    assert not Store(results).is_complete(cell, report=False)
    for argv in (["table", "--summary"], ["report", "--out", str(tmp_path / "reports")]):
        code = main([*argv, "--results", str(results)])
        err = capsys.readouterr().err
        assert code == 0 and "Traceback" not in err
        assert err.count("\n") == 1 and f"{cell}: _samples.jsonl.gz" in err and err.startswith("warning: ")


def test_corrupt_cell_among_healthy_ones_is_recomputed_by_run(reference, tmp_path, capsys, tiny_with_real_vocab,
                                                              real_tokenizer):
    from sweep import config

    from bench.runner import Runner

    results = tmp_path / "results"
    shutil.copytree(reference, results)
    cell = _cells_by_unit(results)[("dense", "wikitext2")]
    (Store(results).cell_dir(cell) / "rows.parquet").write_bytes(b"PAR1 garbage")
    assert main(["report", "--results", str(results), "--out", str(tmp_path / "reports")]) == 0
    assert capsys.readouterr().err.count("\n") == 1
    import torch

    threads = torch.get_num_threads()
    runner = Runner(config(str(results)), model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    try:
        runner.run()
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert runner.cells_written == [cell] and err.count(f"{cell} failed verification") == 1
    assert Store(results).is_complete(cell, report=False)


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    store = Store(tmp_path / "results")
    store.write("abc", {"x": 1}, [{"cell": "abc", "value": 1.0}])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    from bench.store import _this_host

    here = _this_host()
    stale = [store.staging / f"abc-{dead}", store.staging / f"old-abc-{dead}", store.cells / f".tmp-abc-{dead}",
             store.staging / f"ghi@{here}-{dead}"]
    live = store.staging / f"def-{os.getppid()}"
    elsewhere = store.staging / f"jkl@another-node-{dead}"  # a shared store: that node's pids are not ours to judge
    for path in [*stale, live, elsewhere]:
        path.mkdir(parents=True)
    assert sorted(store.remove_stale()) == sorted(stale)
    assert live.is_dir() and elsewhere.is_dir() and store.cell_names() == ["abc"]
