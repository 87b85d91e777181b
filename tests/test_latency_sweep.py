"""The latency sweep: speedups with bootstrap CIs over interleaved rounds, rounds that grow until the CIs are
tight, a dense-vs-dense control, and `unstable` where the control strays from 1.00."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

import bench.timing as efficiency
from bench.timing import HALF_WIDTH, SweepPoint, speedup_ci, sweep_point


def test_speedup_ci_covers_the_ratio_of_medians():
    rng = np.random.default_rng(0)
    dense, pruned = 2.0 + 0.05 * rng.standard_normal(40), 1.0 + 0.03 * rng.standard_normal(40)
    value, lo, hi = speedup_ci(dense, pruned)
    assert value == pytest.approx(np.median(dense) / np.median(pruned))
    assert lo < value < hi and 1.9 < lo and hi < 2.1


def _point(control_scale: float, noise: float, rounds: int = 20, seed: int = 0) -> SweepPoint:
    rng = np.random.default_rng(seed)
    times = {k: list(base * (1 + noise * rng.standard_normal(rounds)))
             for k, base in (("dense", 1.0), ("pruned", 0.8), ("control", control_scale))}
    return SweepPoint(prefill=times, decode={k: list(v) for k, v in times.items()})


def test_a_control_that_strays_from_one_marks_the_point_unstable():
    assert not _point(1.0, 0.01).unstable()
    assert _point(1.10, 0.01).unstable()  # dense read 10% faster than itself: the machine drifted
    assert _point(1.0, 0.2, rounds=6).unstable()  # CIs wider than ±3% at the cap


class _FakeTimer:
    """Preset seconds per call in the order sweep_point times (prefill, decode) for dense / pruned / control."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, fn):
        return next(self.seconds)


@pytest.mark.parametrize("noisy", [False, True])
def test_rounds_grow_until_the_cis_are_tight_or_the_cap(monkeypatch, noisy):
    rng = np.random.default_rng(1)
    calls = itertools.count()

    def seconds():
        while True:
            i = next(calls)
            yield float(1.0 + (0.3 if noisy else 0.002) * rng.standard_normal()) * (1 + (i % 2))

    monkeypatch.setattr(efficiency, "Timer", lambda device: _FakeTimer(seconds()))
    monkeypatch.setattr(efficiency, "prefill", lambda model, ids: None)
    monkeypatch.setattr(efficiency, "decode", lambda model, ids, n, prefilled=None: (lambda: None))

    class _Apply:
        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False

    point = sweep_point(None, _Apply, torch.zeros(1, 4, dtype=torch.long), 2, min_rounds=5, max_rounds=25)
    if noisy:
        assert point.rounds == 25 and point.unstable()
    else:
        assert point.rounds == 5 and not point.unstable()
        assert max(efficiency.relative_half_width(ci) for ci in (point.prefill_speedup(), point.control())) <= HALF_WIDTH


def test_sweep_rows_per_point_in_the_store_summary_and_report(tmp_path, tiny_with_real_vocab, real_tokenizer):
    from bench.cli import main
    from bench.runner import RunConfig, Runner
    from bench.summary import format_latency_sweep, latency_sweep_table

    config = RunConfig(model="tiny", methods=["shortgpt"], sparsities=[0.25], tasks=["piqa"], limit=2,
                       results=str(tmp_path / "results"), ppl_seq_len=32, ppl_windows=1, latency_seq_len=16,
                       latency_repeats=1, decode_tokens=2, progress=False, batch_size=4, threads=1,
                       latency_sweep=True, latency_grid=[(1, 16), (2, 32)], sweep_max_rounds=6)
    runner = Runner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    runner.run()
    table = latency_sweep_table(runner.store.load_rows())
    assert table[["batch", "seq_len"]].values.tolist() == [[1, 16], [2, 32]]  # pruned only: no dense sweep
    assert (table["method"] == "shortgpt").all() and (table["compute_sparsity"] == 0.25).all()
    for name in ("prefill_speedup", "decode_speedup", "control_speedup"):
        assert (table[f"{name}_lo"] <= table[name]).all() and (table[name] <= table[f"{name}_hi"]).all()
    assert table["rounds"].between(5, 6).all()
    text = format_latency_sweep(table)
    header, *lines, footnote = text.splitlines()
    assert "dense vs dense control" in header and footnote.startswith("(unstable:")
    # each point prints `unstable` in place of its speedups exactly when its control strayed: whichever way the
    # timing on this machine went, the table says so point by point
    assert [line.count("unstable") for line in lines] == [2 if u else 0 for u in table["unstable"]]
    assert main(["report", "--results", config.results, "--out", str(tmp_path / "reports")]) == 0
    assert (tmp_path / "reports" / "latency_sweep.png").is_file()
    assert "## Latency sweep" in (tmp_path / "reports" / "report.md").read_text()


def test_the_sweep_table_prints_unstable_only_for_unstable_points():
    from bench.summary import format_latency_sweep

    def row(batch: int, unstable: bool) -> dict:
        values = {f"{name}{end}": v for name in ("prefill_speedup", "decode_speedup", "control_speedup")
                  for end, v in (("", 1.2), ("_lo", 1.1), ("_hi", 1.3))}
        return {"model": "m", "device": "cpu", "method": "shortgpt", "target_sparsity": 0.25, "batch": batch,
                "seq_len": 16, "compute_sparsity": 0.25, "rounds": 5, "unstable": unstable, **values}

    header, stable_line, unstable_line, footnote = format_latency_sweep(
        pd.DataFrame([row(1, False), row(2, True)])).splitlines()
    assert "unstable" not in stable_line and "1.20 [1.10, 1.30]" in stable_line
    assert unstable_line.count("unstable") == 2 and footnote.startswith("(unstable:")
