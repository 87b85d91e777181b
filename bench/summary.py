"""From tidy rows to the per (method, sparsity) summary: measured sparsity, mean accuracy, accuracy retention
with a paired bootstrap confidence interval, perplexity, FLOPs ratio and measured prefill speedup."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.store import Store

BOOTSTRAP_SAMPLES = 2000


def primary_metric(task: str) -> str:
    from bench.tasks import TASKS

    return TASKS[task].primary_metric if task in TASKS else "acc"


def accuracy_rows(rows: pd.DataFrame) -> pd.DataFrame:
    acc = rows[~rows["task"].isin(["wikitext2", "efficiency"])]
    keep = acc.apply(lambda r: r["metric"] == primary_metric(r["task"]), axis=1) if len(acc) else []
    return acc[keep] if len(acc) else acc


def _item_scores(store: Store, cell: str, metric: str) -> dict[int, float]:
    return {s["doc_id"]: s[metric] for s in store.load_samples(cell) if metric in s}


def paired_retention(store: Store, dense_cells: dict[str, str], pruned_cells: dict[str, str],
                     seed: int = 0) -> tuple[float, float, float]:
    """Retention = mean over tasks of pruned accuracy ÷ the same for dense, on the same items; CI by resampling
    items within each task (the same resample for both models: paired)."""
    rng = np.random.default_rng(seed)
    dense_means, pruned_means = [], []
    dense_boot, pruned_boot = [], []
    for task, pcell in pruned_cells.items():
        if task not in dense_cells:
            continue
        metric = primary_metric(task)
        d, p = _item_scores(store, dense_cells[task], metric), _item_scores(store, pcell, metric)
        ids = sorted(set(d) & set(p))
        if not ids:
            continue
        dv, pv = np.array([d[i] for i in ids]), np.array([p[i] for i in ids])
        dense_means.append(dv.mean())
        pruned_means.append(pv.mean())
        idx = rng.integers(0, len(ids), size=(BOOTSTRAP_SAMPLES, len(ids)))
        dense_boot.append(dv[idx].mean(axis=1))
        pruned_boot.append(pv[idx].mean(axis=1))
    if not dense_means:
        return float("nan"), float("nan"), float("nan")
    retention = float(np.mean(pruned_means) / np.mean(dense_means))
    ratios = np.mean(pruned_boot, axis=0) / np.maximum(np.mean(dense_boot, axis=0), 1e-12)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return retention, float(lo), float(hi)


def summarize(rows: pd.DataFrame, store: Store) -> pd.DataFrame:
    """One line per (model, method, target sparsity) found in `rows`."""
    out = []
    group_keys = ["model", "method", "target_sparsity", "seed", "device", "dtype"]
    for key, group in rows.groupby(group_keys, dropna=False, sort=False):
        model, method, target, seed, device, dtype = key
        same_setup = (rows["model"] == model) & (rows["seed"] == seed) & (rows["device"] == device) \
            & (rows["dtype"] == dtype)
        dense_rows = rows[same_setup & (rows["method"] == "dense")]
        g_acc = accuracy_rows(group)
        d_acc = accuracy_rows(dense_rows)
        limits = set(g_acc["limit"].dropna().tolist())
        d_acc = d_acc[d_acc["limit"].isin(limits) & d_acc["task"].isin(g_acc["task"])] if len(d_acc) else d_acc
        pruned_cells = dict(zip(g_acc["task"], g_acc["cell"], strict=False))
        dense_cells = dict(zip(d_acc["task"], d_acc["cell"], strict=False))
        retention, lo, hi = paired_retention(store, dense_cells, pruned_cells, seed=int(seed))
        eff = group[group["task"] == "efficiency"].set_index("metric")["value"]
        ppl = group[(group["task"] == "wikitext2") & (group["metric"] == "ppl")]["value"]
        tasks_sparsity = g_acc["measured_sparsity"]
        out.append({
            "method": method, "target": target,
            "sparsity@512": eff.get("compute_sparsity", np.nan),
            "sparsity(tasks)": tasks_sparsity.mean() if len(tasks_sparsity) else np.nan,
            "mean_acc": g_acc["value"].mean() if len(g_acc) else np.nan,
            "tasks": len(g_acc),
            "retention": retention, "ret_lo": lo, "ret_hi": hi,
            "ppl": ppl.iloc[0] if len(ppl) else np.nan,
            "flops_ratio": eff["decoder_flops"] / eff["dense_decoder_flops"] if "decoder_flops" in eff else np.nan,
            "prefill_speedup": eff.get("prefill_speedup", np.nan),
            "model": model,
        })
    frame = pd.DataFrame(out)
    if len(frame):
        frame["_dense"] = frame["method"] != "dense"
        frame = frame.sort_values(["_dense", "method", "target"]).drop(columns="_dense").reset_index(drop=True)
    return frame


def format_summary(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no results)"
    shown = frame.copy()
    shown["retention (95% CI)"] = [
        f"{r:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(r) else "-"
        for r, lo, hi in zip(shown["retention"], shown["ret_lo"], shown["ret_hi"], strict=True)]
    shown = shown.drop(columns=["retention", "ret_lo", "ret_hi", "model"])
    cols = ["method", "target", "sparsity@512", "sparsity(tasks)", "mean_acc", "retention (95% CI)", "ppl",
            "flops_ratio", "prefill_speedup", "tasks"]
    return shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
