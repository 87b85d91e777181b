"""`bench power` on planted per-item scores: the detectable difference shrinks as 1/√n, the items a 2-point
difference needs follow from it, and a task where dense is at chance is flagged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.power import DETECT, study_power


class _Store:
    def __init__(self, samples: dict[str, list[dict]]) -> None:
        self.samples = samples

    def load_samples(self, cell: str) -> list[dict]:
        return self.samples[cell]


def _planted(n: int, seed: int = 0, dense_right: dict | None = None, losses: dict | None = None):
    """Dense, A (loses 10% of dense's right answers) and B (loses 20%) on piqa (2 choices) and arc_easy (4);
    `losses` {task: (A's, B's)} overrides the shares lost."""
    rng = np.random.default_rng(seed)
    dense_right = dense_right or {"piqa": 0.8, "arc_easy": 0.8}
    losses = losses or {}
    samples, rows = {}, []
    for task, choices in (("piqa", 2), ("arc_easy", 4)):
        dense = (rng.random(n) < dense_right[task]).astype(float)
        loss_a, loss_b = losses.get(task, (0.1, 0.2))
        for method, loss in (("dense", 0.0), ("a", loss_a), ("b", loss_b)):
            right = dense if method == "dense" else np.where(rng.random(n) < loss, 0.0, dense)
            cell = f"{task}/{method}"
            samples[cell] = [{"doc_id": i, "acc_norm": r, "acc": r, "loglikelihoods": [0.0] * choices}
                             for i, r in enumerate(right)]
            rows.append({"model": "m", "method": method, "target_sparsity": 0.0 if method == "dense" else 0.25,
                         "seed": 0, "device": "cpu", "dtype": "float32", "limit": n, "task": task,
                         "metric": "acc_norm", "value": right.mean(), "matched": True, "cell": cell, "n": n})
    return pd.DataFrame(rows), _Store(samples)


def test_detectable_difference_shrinks_with_items_and_sizes_the_study():
    small = study_power(*_planted(100))
    large = study_power(*_planted(1600))
    (s,), (big,) = small, large
    assert s.pairs == 1 and s.tasks == 2 and s.items_per_task == 100
    assert s.mde == pytest.approx(2.8016 * s.se, rel=1e-3)
    assert big.mde == pytest.approx(s.mde / 4, rel=0.35)  # 16× the items: a quarter of the MDE
    assert s.items_for_detect == pytest.approx(100 * (s.mde / DETECT) ** 2, rel=0.01)
    assert big.items_for_detect == pytest.approx(s.items_for_detect, rel=0.6)  # the same study, sized alike
    assert s.near_chance == ()


def test_task_at_chance_is_flagged():
    (result,) = study_power(*_planted(200, dense_right={"piqa": 0.5, "arc_easy": 0.8}))
    assert result.near_chance == ("piqa",)
    (result,) = study_power(*_planted(200, dense_right={"piqa": 0.8, "arc_easy": 0.25}))
    assert result.near_chance == ("arc_easy",)


def test_signal_tells_a_diluting_task_from_an_informative_one():
    """A task on which both methods lose alike adds items (smaller SE) but no difference: the MDE looks better with
    it, the observed |Δ|/SE worse; restricted to the informative task (`tasks=`), the signal rises."""
    planted = _planted(400, losses={"piqa": (0.3, 0.3), "arc_easy": (0.02, 0.3)})
    (both,) = study_power(*planted)
    (informative,) = study_power(*planted, tasks=["arc_easy"])
    assert both.tasks == 2 and informative.tasks == 1
    assert informative.se > both.se  # half the items
    assert informative.signal > 1.3 * both.signal
    assert both.signal > 2  # a 28-point loss difference on 400 items stands out either way
