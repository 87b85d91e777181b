"""Per-item comparisons with dense (KL, flips, agreement) and the Holm adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.paired import bootstrap_p_value, holm, item_values, paired_item_metrics


def _sample(doc_id, lls, correct):
    return {"doc_id": doc_id, "acc": float(correct), "loglikelihoods": lls}


def test_item_values_by_definition():
    same = item_values(_sample(0, [-1.0, -2.0], 1), _sample(0, [-1.0, -2.0], 1), "acc")
    assert same == {"kl": 0.0, "flips": 0.0, "lost": 0.0, "agreement": 1.0}
    dense, pruned = _sample(0, [-1.0, -3.0], 1), _sample(0, [-2.0, -1.0], 0)
    values = item_values(dense, pruned, "acc")
    p = np.exp([-1.0, -3.0]) / np.exp([-1.0, -3.0]).sum()
    q = np.exp([-2.0, -1.0]) / np.exp([-2.0, -1.0]).sum()
    assert values["kl"] == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert (values["flips"], values["lost"], values["agreement"]) == (1.0, 1.0, 0.0)
    gained = item_values(pruned, dense, "acc")
    assert (gained["flips"], gained["lost"]) == (1.0, 0.0)
    # one continuation (LAMBADA): the dense − pruned log-likelihood of the target
    assert item_values(_sample(0, [-2.0], 1), _sample(0, [-5.0], 1), "acc")["kl"] == pytest.approx(3.0)


def test_paired_metrics_average_tasks_and_match_items_by_id():
    dense = [_sample(i, [-1.0, -2.0], 1) for i in range(10)]
    pruned = [_sample(i, [-2.0, -1.0] if i < 4 else [-1.0, -2.0], i >= 4) for i in reversed(range(10))]
    other = [_sample(i, [-1.0, -2.0], 1) for i in range(10)]
    result = paired_item_metrics([(dense, pruned, "acc"), (dense, other, "acc")])
    assert result["flips"][0] == pytest.approx((0.4 + 0.0) / 2)
    assert result["agreement"][0] == pytest.approx((0.6 + 1.0) / 2)
    value, lo, hi = result["flips"]
    assert lo <= value <= hi and hi - lo > 0
    empty = paired_item_metrics([([], [], "acc")])
    assert all(math.isnan(v) for v in empty["kl"])


def test_holm_matches_its_definition():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan")])[0] == 0.5 and math.isnan(holm([0.5, float("nan")])[1])
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 × 0.8 capped at 1, and monotone


def test_bootstrap_p_value():
    assert bootstrap_p_value(np.array([1.0] * 999 + [-1.0])) == pytest.approx(0.002)
    assert bootstrap_p_value(np.full(1000, 2.0)) == pytest.approx(0.001)  # the resolution, never 0
    assert bootstrap_p_value(np.array([-1.0, 1.0] * 50)) == pytest.approx(1.0)
