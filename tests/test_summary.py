"""Retention and method-vs-method differences: paired bootstrap over items, on planted per-item scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.summary import paired_retention, retention_difference


class _Samples:
    """Stands for the store: per-item primary scores (piqa's acc_norm, winogrande's acc) per cell name."""

    def __init__(self, scores: dict[str, list[float]]) -> None:
        self.scores = scores

    def load_samples(self, cell: str) -> list[dict]:
        metric = "acc" if cell.startswith("winogrande") else "acc_norm"
        return [{"doc_id": i, metric: v} for i, v in enumerate(self.scores[cell])]


def _store(rng: np.random.Generator, n: int = 200, flips_a: float = 0.0, flips_b: float = 0.0) -> _Samples:
    """Dense right on 60% of items; A and B each lose a fraction of dense's right answers."""
    scores = {}
    for task in ("piqa", "winogrande"):
        dense = (rng.random(n) < 0.6).astype(float)
        scores[f"{task}/dense"] = list(dense)
        scores[f"{task}/a"] = list(np.where(rng.random(n) < flips_a, 0.0, dense))
        scores[f"{task}/b"] = list(np.where(rng.random(n) < flips_b, 0.0, dense))
    return _Samples(scores)


CELLS = {name: {task: f"{task}/{name}" for task in ("piqa", "winogrande")} for name in ("dense", "a", "b")}


def test_retention_is_the_ratio_of_task_means_and_its_ci_covers_it():
    store = _store(np.random.default_rng(0), flips_a=0.2)
    retention, lo, hi = paired_retention(store, CELLS["dense"], CELLS["a"])
    dense = np.mean([np.mean(store.scores[f"{t}/dense"]) for t in ("piqa", "winogrande")])
    pruned = np.mean([np.mean(store.scores[f"{t}/a"]) for t in ("piqa", "winogrande")])
    assert retention == pytest.approx(pruned / dense)
    assert lo < retention < hi < 1.0  # losing 20% of right answers is clearly below dense


def test_identical_methods_differ_by_exactly_zero():
    store = _store(np.random.default_rng(1), flips_a=0.3)
    diff, lo, hi = retention_difference(store, CELLS["dense"], CELLS["a"], CELLS["a"])
    assert (diff, lo, hi) == (0.0, 0.0, 0.0)


def test_a_clear_gap_is_significant_and_a_small_one_is_not():
    store = _store(np.random.default_rng(2), flips_a=0.05, flips_b=0.4)
    diff, lo, hi = retention_difference(store, CELLS["dense"], CELLS["a"], CELLS["b"])
    ra, rb = (paired_retention(store, CELLS["dense"], CELLS[m])[0] for m in ("a", "b"))
    assert diff == pytest.approx(ra - rb)
    assert 0.0 < lo < diff < hi
    store = _store(np.random.default_rng(3), flips_a=0.10, flips_b=0.11)
    _, lo, hi = retention_difference(store, CELLS["dense"], CELLS["a"], CELLS["b"])
    assert lo < 0.0 < hi


def _rows(store: _Samples, methods, matched_piqa: dict[str, bool] | None = None):
    """Tidy rows for dense and methods (name, target, c on tasks, c wiki mean, sd) on piqa and winogrande."""
    import pandas as pd

    common = {"model": "m", "seed": 0, "device": "cpu", "dtype": "torch.float32", "limit": 200}
    rows = []
    for name, target, c_tasks, mean, sd in methods:
        for task in ("piqa", "winogrande"):
            metric = "acc" if task == "winogrande" else "acc_norm"
            matched = (matched_piqa or {}).get(name, True) if task == "piqa" else True
            rows.append({**common, "method": name, "target_sparsity": target, "task": task, "metric": metric,
                         "value": float(np.mean(store.scores[f"{task}/{name}"])), "cell": f"{task}/{name}",
                         "measured_sparsity": c_tasks if matched else c_tasks - 0.1, "matched": matched,
                         "unmatched_reason": None if matched else "out of reach"})
        for metric, value in (("ppl", 30.0), ("ppl_ratio", 1.5), ("compute_sparsity", mean),
                              ("compute_sparsity_sd", sd)):
            rows.append({**common, "method": name, "target_sparsity": target, "task": "wikitext2", "metric": metric,
                         "value": value, "cell": f"wiki/{name}", "measured_sparsity": mean, "matched": True})
    return pd.DataFrame(rows)


def test_summary_shows_the_every_window_sparsity_and_its_spread():
    from bench.summary import format_summary, summarize

    store = _store(np.random.default_rng(4), flips_a=0.1)
    rows = _rows(store, (("dense", 0.0, 0.0, 0.0, 0.0), ("a", 0.25, 0.254, 0.265, 0.018)))
    frame = summarize(rows, store)
    line = frame.set_index("method").loc["a"]
    assert (line["c(wiki)"], line["c_sd(wiki)"], line["ppl"], line["ppl_ratio"]) == (0.265, 0.018, 30.0, 1.5)
    assert line["matched"] == "2/2" and line["c(tasks)"] == pytest.approx(0.254)
    assert "0.265±0.018" in format_summary(frame) and "0.000±0.000" in format_summary(frame)


def test_unmatched_cells_are_listed_and_left_out_of_retention_and_differences():
    from bench.summary import pairwise_differences, summarize, unmatched_cells

    store = _store(np.random.default_rng(5), flips_a=0.1, flips_b=0.3)
    methods = (("dense", 0.0, 0.0, 0.0, 0.0), ("a", 0.25, 0.25, 0.25, 0.0), ("b", 0.25, 0.25, 0.25, 0.0))
    rows = _rows(store, methods, matched_piqa={"b": False})
    line = summarize(rows, store).set_index("method").loc["b"]
    assert line["matched"] == "1/2" and line["tasks"] == 1
    # retention over winogrande only: exactly the single-task ratio
    only = {"winogrande": "winogrande/b"}
    assert line["retention"] == pytest.approx(paired_retention(store, {"winogrande": "winogrande/dense"}, only)[0])
    off = unmatched_cells(rows[rows["method"] != "dense"])
    assert off[["method", "task"]].values.tolist() == [["b", "piqa"]]
    assert off["unmatched_reason"].iloc[0] == "out of reach"
    pairs = pairwise_differences(rows, store)
    (diff,) = pairs["retention_a_minus_b"]  # a − b on winogrande alone, the one task matched for both
    ra = paired_retention(store, {"winogrande": "winogrande/dense"}, {"winogrande": "winogrande/a"})[0]
    assert diff == pytest.approx(ra - line["retention"])


def test_current_rows_keep_the_newest_cell_of_each_setup():
    import pandas as pd

    from bench.summary import current_rows

    base = {"model": "m", "method": "ftp", "target_sparsity": 0.25, "seed": 0, "device": "cpu",
            "dtype": "torch.float32", "metric": "acc"}
    rows = pd.DataFrame([
        {**base, "task": "piqa", "limit": 50, "cell": "old", "timestamp": "2026-11-20T10:00:00", "value": 0.1},
        {**base, "task": "piqa", "limit": 50, "cell": "new", "timestamp": "2026-11-24T10:00:00", "value": 0.2},
        {**base, "task": "piqa", "limit": 100, "cell": "other-limit", "timestamp": "2026-11-19T10:00:00",
         "value": 0.3},
        {**base, "task": "wikitext2", "limit": None, "cell": "wiki-old", "timestamp": "2026-11-20T10:00:00",
         "value": 9.0},
        {**base, "task": "wikitext2", "limit": None, "cell": "wiki-new", "timestamp": "2026-11-24T09:00:00",
         "value": 8.0},
        {**base, "method": "dense", "target_sparsity": 0.0, "task": "piqa", "limit": 50, "cell": "dense",
         "timestamp": "2026-11-01T10:00:00", "value": 0.5},
    ])
    assert sorted(current_rows(rows)["cell"]) == ["dense", "new", "other-limit", "wiki-new"]


def test_degenerate_resamples_give_no_interval_instead_of_a_huge_one():
    """Two items, dense right on one: a quarter of the resamples have dense at 0, so no CI can be estimated; dense
    against itself is exactly 1 on every resample."""
    store = _Samples({"piqa/dense": [1.0, 0.0], "piqa/a": [1.0, 1.0]})
    retention, lo, hi = paired_retention(store, {"piqa": "piqa/dense"}, {"piqa": "piqa/a"})
    assert retention == 2.0 and np.isnan(lo) and np.isnan(hi)
    store.scores["piqa/many"] = [1.0, 0.0, 1.0, 1.0] * 10  # enough items: dense is never 0 on a resample
    assert paired_retention(store, {"piqa": "piqa/many"}, {"piqa": "piqa/many"}) == (1.0, 1.0, 1.0)
    store = _Samples({"piqa/dense": [0.0, 0.0], "piqa/a": [1.0, 0.0]})
    assert np.isnan(paired_retention(store, {"piqa": "piqa/dense"}, {"piqa": "piqa/a"})[0])


def test_seed_variance_widens_the_ci_and_the_spread_is_reported():
    """Three calibration seeds that lose 5%, 20% and 35% of dense's right answers: the two-level bootstrap's CI
    (items and seeds resampled) is wider than any one seed's item-only CI, and centred on the seeds' mean."""
    from bench.summary import seeded_bootstrap

    rng = np.random.default_rng(4)
    scores, seeds = {}, {}
    for task in ("piqa", "winogrande"):
        dense = (rng.random(300) < 0.6).astype(float)
        scores[f"{task}/dense"] = list(dense)
        for s, loss in enumerate((0.05, 0.20, 0.35)):
            scores[f"{task}/s{s}"] = list(np.where(rng.random(300) < loss, 0.0, dense))
            seeds.setdefault(s, {})[task] = f"{task}/s{s}"
    store = _Samples(scores)
    dense_cells = {t: f"{t}/dense" for t in ("piqa", "winogrande")}
    (point,), boot, (per_seed,) = seeded_bootstrap(store, dense_cells, [seeds], seed=0)
    singles = [paired_retention(store, dense_cells, cells) for cells in seeds.values()]
    assert per_seed == pytest.approx([r for r, _, _ in singles])
    assert point == pytest.approx(np.mean(per_seed))
    lo, hi = np.percentile(boot[0], [2.5, 97.5])
    assert lo < point < hi
    assert hi - lo > 1.5 * max(h - low for _, low, h in singles)
    (same,), boot_one, _ = seeded_bootstrap(store, dense_cells, [{0: seeds[0]}], seed=0)
    assert same == pytest.approx(singles[0][0])  # one seed: the item-only retention


def test_retention_at_targets_interpolates_between_bracketing_points():
    from bench.summary import format_retention_at_targets, retention_at_targets

    def row(method, target, c, r, lo, hi):
        return {"model": "m", "method": method, "target": target, "c(tasks)": c, "retention": r, "ret_lo": lo,
                "ret_hi": hi, "device": "cpu", "dtype": "float32"}

    summary = pd.DataFrame([row("dense", 0.0, 0.0, np.nan, np.nan, np.nan),
                            row("a", 0.2, 0.20, 0.9, 0.8, 1.0), row("a", 0.3, 0.30, 0.7, 0.6, 0.8),
                            row("b", 0.25, 0.233, 0.95, 0.9, 1.0), row("c", 0.35, 0.35, 0.5, 0.4, 0.6)])
    at = retention_at_targets(summary).set_index(["method", "target"])
    assert set(at.index.get_level_values("target")) == {0.2, 0.25, 0.3, 0.35}
    a = at.loc[("a", 0.25)]
    assert a["retention"] == pytest.approx(0.8) and a["lo"] == pytest.approx(0.7) and a["hi"] == pytest.approx(0.9)
    assert a["from c"] == "0.200–0.300"
    assert at.loc[("a", 0.2), "retention"] == pytest.approx(0.9)  # a measured point stands for its own target
    assert np.isnan(at.loc[("a", 0.35), "retention"])  # no extrapolation
    assert at.loc[("b", 0.25), "retention"] == pytest.approx(0.95)  # within ±0.02 of the target
    assert np.isnan(at.loc[("b", 0.3), "retention"]) and np.isnan(at.loc[("c", 0.25), "retention"])
    text = format_retention_at_targets(retention_at_targets(summary))
    assert "0.800 [0.700, 0.900]" in text and "outside" in text


def test_cells_from_before_calibration_seeds_were_recorded_count_as_the_runs_seed():
    """An older cell without `calibration_seed` was calibrated with the run's seed: a newer cell of the same method
    and seed supersedes it instead of standing beside it as a second calibration seed."""
    from bench.summary import current_rows, seed_cells

    def row(cell, method, calibration_seed, timestamp):
        return {"cell": cell, "model": "m", "method": method, "target_sparsity": 0.25, "seed": 0,
                "calibration_seed": calibration_seed, "device": "cpu", "dtype": "float32", "task": "piqa",
                "limit": 20, "timestamp": timestamp}

    rows = pd.DataFrame([row("old", "ftp", None, "2026-01-01"), row("new", "ftp", 0, "2026-02-01"),
                         row("seed1", "ftp", 1, "2026-02-02"), row("dense", "dense", None, "2026-01-01")])
    rows["calibration_seed"] = rows["calibration_seed"].astype("Int64")
    assert set(current_rows(rows)["cell"]) == {"new", "seed1", "dense"}
    assert seed_cells(rows[rows["cell"].isin(["old", "seed1"])]) == {0: {"piqa": "old"}, 1: {"piqa": "seed1"}}
