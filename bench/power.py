"""Statistical power of the study in the store: the smallest retention difference it could detect, and the items per
task a 2-point difference would need.

For each (model, target sparsity) the standard error of a method-vs-method retention difference is read off the
same paired bootstrap the summary uses (bench.summary: items resampled within each task, the same resample for
dense and both methods), as the median over the method pairs in the store (with one pruned method: the SE of its
retention). At a two-sided α = 0.05 and 80% power the minimum detectable difference is

    MDE = (z_{1−α/2} + z_{0.8}) · SE ≈ 2.80 · SE,

and since SE falls as 1/√n, a difference δ needs n · (MDE/δ)² items per task. A task whose dense accuracy is not
above chance (lower end of its 95% Wilson interval at or below 1/choices) is flagged: its items cost time and carry
no signal about what pruning removed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from bench.store import Store
from bench.summary import (
    accuracy_rows,
    bootstrap_retentions,
    dense_accuracy,
    matched_only,
    seed_cells,
    seeded_bootstrap,
)

DETECT = 0.02  # the retention difference a user wants to resolve (2 points)


@dataclass(frozen=True)
class StudyPower:
    model: str
    target: float
    tasks: int
    items_per_task: int  # median over the matched tasks
    pairs: int  # method pairs the SE is the median of (0: one method, SE of its retention)
    se: float
    mde: float
    items_for_detect: int
    near_chance: tuple[str, ...]
    # median over the method pairs of |observed difference| / its SE: how far the differences this study did see
    # stand out of its noise. Unlike the MDE it counts signal too, so it can compare task lists (a task where every
    # method scores alike adds items that shrink the SE and dilute the differences alike). None with one method.
    signal: float | None = None


def _wilson_low(successes: float, n: int, z: float = 1.96) -> float:
    if n == 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def near_chance_tasks(store: Store, dense_cells: dict[str, str]) -> list[str]:
    """Tasks whose dense accuracy's 95% Wilson lower bound is at or below chance (1/choices; LAMBADA: none)."""
    from bench.summary import primary_metric

    out = []
    for task, cell in sorted(dense_cells.items()):
        samples = [s for s in store.load_samples(cell) if primary_metric(task) in s]
        choices = [len(s.get("loglikelihoods", [])) for s in samples]
        if not samples or min(choices, default=0) < 2:
            continue
        chance = float(np.mean([1 / k for k in choices]))
        right = sum(float(s[primary_metric(task)]) for s in samples)
        if _wilson_low(right, len(samples)) <= chance:
            out.append(task)
    return out


def _draws(store: Store, dense_cells: dict[str, str], methods: list[dict[int, dict[str, str]]], seed: int,
           seeded: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(point retentions [methods], bootstrap retentions [methods, samples]): two-level (items, then seeds) when
    the study has calibration seeds, the summary's item bootstrap otherwise."""
    if seeded:
        result = seeded_bootstrap(store, dense_cells, methods, seed)
    else:
        result = bootstrap_retentions(store, dense_cells, [next(iter(m.values())) for m in methods], seed)
    return None if result is None else (np.asarray(result[0], dtype=float), result[1])


def study_power(rows: pd.DataFrame, store: Store, power: float = 0.8, alpha: float = 0.05,
                detect: float = DETECT, tasks: list[str] | None = None) -> list[StudyPower]:
    """One `StudyPower` per (model, target sparsity, ...) of the store; `tasks` restricts the analysis to those
    tasks' items (what the same study would have shown on a shorter task list)."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    if tasks is not None:
        rows = rows[rows["task"].isin(tasks)]
    all_acc = accuracy_rows(rows)
    acc = matched_only(all_acc)
    out = []
    keys = ["model", "target_sparsity", "seed", "device", "dtype", "limit"]
    for (model, target, seed, device, dtype, limit), group in acc.groupby(keys, dropna=False, sort=True):
        if target == 0:
            continue
        dense = dense_accuracy(all_acc, model, seed, device, dtype, {limit})
        dense_cells = dict(zip(dense["task"], dense["cell"], strict=False))
        seeded = {m: seed_cells(g) for m, g in group.groupby("method") if m != "dense"}
        several = any(len(v) > 1 for v in seeded.values())

        names = sorted(seeded)
        ses, zs = [], []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                result = _draws(store, dense_cells, [seeded[a], seeded[b]], int(seed), several)
                if result is not None:
                    point, draws = result
                    ses.append(float(np.nanstd(draws[0] - draws[1])))
                    if ses[-1] > 0 and np.isfinite(point[0] - point[1]):
                        zs.append(abs(float(point[0] - point[1])) / ses[-1])
        pairs = len(ses)
        if not ses and names:  # one pruned method: the SE of its retention (a difference would be ~√2 × wider)
            result = _draws(store, dense_cells, [seeded[names[0]]], int(seed), several)
            if result is not None:
                ses.append(float(np.nanstd(result[1][0])))
        if not ses:
            continue
        se = float(np.median(ses))
        if not math.isfinite(se):  # no finite draw (e.g. a cell without its per-item samples): nothing to say
            continue
        n_items = int(np.median(group.groupby("task")["n"].max())) if "n" in group else int(limit)
        mde = z * se
        out.append(StudyPower(str(model), float(target), int(group["task"].nunique()), n_items, pairs, se, mde,
                              math.ceil(n_items * (mde / detect) ** 2), tuple(near_chance_tasks(store, dense_cells)),
                              float(np.median(zs)) if zs else None))
    return out


def format_power(results: list[StudyPower]) -> str:
    if not results:
        return "(no matched pruned cells: nothing to size)"
    lines = []
    for r in results:
        lines.append(
            f"{r.model} at c = {r.target:g}: {r.tasks} tasks × ~{r.items_per_task} items; the smallest retention "
            f"difference this study detects (α = 0.05 two-sided, 80% power) is {100 * r.mde:.1f} points "
            + (f"(SE {100 * r.se:.1f}, median over {r.pairs} method pairs)" if r.pairs else
               f"(SE {100 * r.se:.1f} of the one method's retention; a difference between two methods is ~√2 × "
               "noisier)")
            + f"; a {100 * DETECT:.0f}-point difference needs "
            f"~{r.items_for_detect:,} items per task."
            + (f" The differences it saw stand at median |Δ|/SE = {r.signal:.2f}." if r.signal is not None else "")
            + (f" Dense is not above chance on {', '.join(r.near_chance)}: those items add cost, not signal."
               if r.near_chance else ""))
    return "\n".join(lines)
