"""Per-item comparisons with the dense model, and significance over many comparisons.

Accuracy retention compares two averages; the per-choice log-likelihoods the store keeps for every item say much
more (Dutta et al. 2024, "Accuracy is Not All You Need", arXiv 2407.09141). For every item scored by both the dense
and the pruned model:

- KL: KL(dense ‖ pruned) between the answer distributions, the softmax over the choices' log-likelihoods (a task
  with one continuation, LAMBADA, has no distribution: its dense − pruned log-likelihood of the target instead);
- flips: the item's correctness (the task's primary metric) changed, in either direction; `lost` counts only
  correct → wrong;
- agreement: both pick the same choice (argmax of the raw log-likelihoods, lm-eval's `acc` prediction).

Each is averaged over a task's items, then over tasks, with a 95% CI from the same paired bootstrap as retention
(items resampled within each task, the same resample for dense and the method). scipy.stats.bootstrap is not used
for it: it resamples one axis of equal-length samples, and these statistics resample each task's items separately
and then average the tasks (a stratified bootstrap), which it does not do.

`holm` adjusts the p-values of a family of comparisons (Holm 1979) so that "significant" keeps its 5% meaning
however many method pairs a table shows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BOOTSTRAP_SAMPLES = 2000
ITEM_METRICS = ("kl", "flips", "lost", "agreement")


def item_values(dense: dict, pruned: dict, metric: str) -> dict[str, float]:
    """The four per-item values for one item's dense and pruned samples."""
    d, p = np.asarray(dense["loglikelihoods"], float), np.asarray(pruned["loglikelihoods"], float)
    if len(d) > 1:
        log_pd = d - np.logaddexp.reduce(d)
        log_pp = p - np.logaddexp.reduce(p)
        kl = float(np.sum(np.exp(log_pd) * (log_pd - log_pp)))
        agree = float(np.argmax(d) == np.argmax(p))
    else:
        kl = float(d[0] - p[0])
        agree = float(dense.get(metric) == pruned.get(metric))
    right_dense, right_pruned = float(dense.get(metric, 0.0)), float(pruned.get(metric, 0.0))
    return {"kl": kl, "flips": float(right_dense != right_pruned),
            "lost": float(right_dense > right_pruned), "agreement": agree}


def paired_item_metrics(tasks: Iterable[tuple[list[dict], list[dict], str]],
                        seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{metric: (mean over tasks of the per-task item mean, 95% CI low, high)} from (dense samples, pruned samples,
    primary metric) per task; items are matched by doc_id (samples stored without log-likelihoods are skipped)."""
    rng = np.random.default_rng(seed)
    per_task_means, per_task_boot = [], []
    for dense, pruned, metric in tasks:
        by_id = {s["doc_id"]: s for s in pruned}
        pairs = [(s, by_id[s["doc_id"]]) for s in dense
                 if s["doc_id"] in by_id and "loglikelihoods" in s and "loglikelihoods" in by_id[s["doc_id"]]]
        if not pairs:
            continue
        values = np.array([[item_values(d, p, metric)[m] for m in ITEM_METRICS] for d, p in pairs])
        idx = rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))
        per_task_means.append(values.mean(axis=0))
        per_task_boot.append(values[idx].mean(axis=1))  # [samples, metrics]
    if not per_task_means:
        return {m: (float("nan"),) * 3 for m in ITEM_METRICS}
    mean = np.mean(per_task_means, axis=0)
    boot = np.mean(per_task_boot, axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {m: (float(mean[i]), float(lo[i]), float(hi[i])) for i, m in enumerate(ITEM_METRICS)}


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0" from its bootstrap distribution: twice the smaller tail, at
    least 1/len(samples) (the resolution of the resampling)."""
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan")
    tail = min(np.mean(finite <= 0), np.mean(finite >= 0))
    return float(min(1.0, max(2 * tail, 1.0 / len(finite))))


def holm(p_values: Iterable[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given); NaN stays NaN and is not counted."""
    p = np.asarray(list(p_values), float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()
