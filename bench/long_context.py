"""The long-prompt table: generation tasks (RULER's needle in a haystack, one task per prompt length) per method and
length, apart from the multiple-choice summary (its retention averages short log-likelihood tasks; a generation
task's accuracy and compute are another regime, bench.tasks.GENERATION_TASKS).

Per (method, target, length): accuracy, retention against dense on the same documents with a paired-bootstrap 95%
CI, c on prefill (what the matching protocol holds to the target, `matched`) and c on decode. A length where dense
scores zero has no retention: it is reported as such and no method is compared on it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.store import Store
from bench.summary import dense_accuracy, paired_retention, primary_rows


def long_context_table(rows: pd.DataFrame, store: Store) -> pd.DataFrame:
    from bench.ruler import NIAH_TASKS
    from bench.tasks import GENERATION_TASKS

    gen = rows[rows["task"].isin(GENERATION_TASKS)]
    if gen.empty:
        return pd.DataFrame()
    acc = primary_rows(gen)
    out = []
    for (model, method, target, seed, device, dtype, task), group in acc.groupby(
            ["model", "method", "target_sparsity", "seed", "device", "dtype", "task"], dropna=False, sort=False):
        cell = group["cell"].iloc[-1]
        dense = dense_accuracy(acc, model, seed, device, dtype, set(group["limit"].dropna()))
        dense = dense[dense["task"] == task]
        dense_acc = float(dense["value"].iloc[-1]) if len(dense) else np.nan
        extras = gen[gen["cell"] == cell].groupby("metric")["value"].last()
        matched = bool(group["matched"].fillna(False).iloc[-1]) or method == "dense"
        retention = lo = hi = np.nan
        if method != "dense" and len(dense) and dense_acc > 0 and matched:
            retention, lo, hi = paired_retention(store, {task: dense["cell"].iloc[-1]}, {task: cell}, seed=int(seed))
        out.append({"model": model, "method": method, "target": target,
                    "length": NIAH_TASKS.get(task, task), "task": task, "n": int(group["n"].iloc[-1]),
                    "acc": float(group["value"].iloc[-1]), "dense_acc": dense_acc,
                    "retention": retention, "ret_lo": lo, "ret_hi": hi,
                    "c_prefill": float(extras.get("compute_sparsity", np.nan)),
                    "c_decode": float(extras.get("c_decode", np.nan)), "matched": matched})
    frame = pd.DataFrame(out)
    frame["_dense"] = frame["method"] != "dense"
    return frame.sort_values(["model", "length", "_dense", "method", "target"]).drop(columns="_dense") \
        .reset_index(drop=True)


def format_long_context(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no generation tasks)"
    shown = frame.copy()

    def retention(r) -> str:
        if r["method"] == "dense":
            return "-"
        if not r["dense_acc"] > 0:
            return "dense at 0: not compared"
        if not r["matched"]:
            return "unmatched"
        return f"{r['retention']:.3f} [{r['ret_lo']:.3f}, {r['ret_hi']:.3f}]" if np.isfinite(r["ret_lo"]) \
            else f"{r['retention']:.3f} [CI n/a]"

    shown["retention (95% CI)"] = shown.apply(retention, axis=1)
    shown["target"] = ["-" if m == "dense" else f"{t:g}" for m, t in zip(shown["method"], shown["target"],
                                                                        strict=True)]
    cols = ["length", "method", "target", "n", "acc", "dense_acc", "retention (95% CI)", "c_prefill", "c_decode"]
    return shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
