"""Retention and method-vs-method differences: paired bootstrap over items, on planted per-item scores."""

from __future__ import annotations

import numpy as np
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
