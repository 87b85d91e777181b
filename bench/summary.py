"""From tidy rows to the per (method, sparsity) summary: compute sparsity measured on the scored task items (mean,
range, how many tasks are matched), mean accuracy and accuracy retention with a paired bootstrap confidence
interval over the matched tasks only, perplexity and its ratio to dense on the same positions, FLOPs ratio and
measured prefill speedup. Cells whose c is off the target by more than 0.02 are listed, never compared."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.defaults import MATCH_TOLERANCE
from bench.paired import ITEM_METRICS, bootstrap_p_value, holm, paired_item_metrics
from bench.store import NON_TASK_UNITS, Store

BOOTSTRAP_SAMPLES = 2000


def primary_metric(task: str) -> str:
    from bench.tasks import TASKS

    return TASKS[task].primary_metric if task in TASKS else "acc"


def current_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The newest cell per (model, method, target sparsity, seed, calibration seed, device, dtype, task, item limit):
    cells written
    before a method's parameters or a unit's measurement changed stay in the store (nothing is deleted) but must
    not be averaged with the new ones."""
    if rows.empty:
        return rows
    keys = ["model", "method", "target_sparsity", "seed", "calibration_seed", "device", "dtype", "task", "limit"]
    keys = [k for k in keys if k in rows]
    per_cell = rows.drop_duplicates("cell").sort_values("timestamp")  # a cell's rows share one timestamp
    if "calibration_seed" in per_cell:
        per_cell = per_cell.assign(calibration_seed=calibration_seeds(per_cell))
    latest = per_cell.groupby(keys, dropna=False, sort=False)["cell"].last()
    return rows[rows["cell"].isin(set(latest))]


def calibration_seeds(frame: pd.DataFrame) -> pd.Series:
    """Each row's calibration seed. Cells written before it was recorded were calibrated with the run's `seed` (the
    only choice then), so a missing value of a pruned method reads as that seed; dense has none."""
    if "calibration_seed" not in frame:
        return pd.Series(pd.NA, index=frame.index, dtype="Int64")
    missing = frame["calibration_seed"].isna() & (frame["method"] != "dense")
    return frame["calibration_seed"].astype("Int64").where(~missing, frame["seed"].astype("Int64"))


def accuracy_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The primary metric's rows of the multiple-choice / log-likelihood tasks; generation tasks (long prompts) have
    their own table (bench.long_context)."""
    from bench.tasks import GENERATION_TASKS

    return primary_rows(rows[~rows["task"].isin(NON_TASK_UNITS) & ~rows["task"].isin(GENERATION_TASKS)])


def primary_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of each task's primary metric."""
    keep = rows.apply(lambda r: r["metric"] == primary_metric(r["task"]), axis=1) if len(rows) else []
    return rows[keep] if len(rows) else rows


def matched_only(acc: pd.DataFrame) -> pd.DataFrame:
    """The cells compared: compute sparsity on the scored items within ±0.02 of the target (bench.matching)."""
    return acc[acc["matched"].fillna(False).astype(bool)]


def unmatched_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Every cell left out of the comparison, with the c it reached and why."""
    cells = rows.drop_duplicates("cell")
    off = cells[~cells["matched"].fillna(False).astype(bool)]
    columns = [c for c in ("method", "target_sparsity", "task", "measured_sparsity", "knob", "knob_value",
                           "unmatched_reason") if c in off]
    return off[columns].sort_values(["method", "target_sparsity", "task"]).reset_index(drop=True)


def _item_scores(store: Store, cell: str, metric: str) -> dict[int, float]:
    return {s["doc_id"]: s[metric] for s in store.load_samples(cell) if metric in s}


def _aligned_items(store: Store, dense_cells: dict[str, str], *method_cells: dict[str, str]):
    """Per task present for dense and every method: (dense scores, [scores per method]) on the common items."""
    for task in method_cells[0]:
        if task not in dense_cells or not all(task in cells for cells in method_cells):
            continue
        metric = primary_metric(task)
        scores = [_item_scores(store, cells[task], metric) for cells in (dense_cells, *method_cells)]
        ids = sorted(set.intersection(*(set(s) for s in scores)))
        if ids:
            arrays = [np.array([s[i] for i in ids]) for s in scores]
            yield arrays[0], arrays[1:]


def bootstrap_retentions(store: Store, dense_cells: dict[str, str], method_cells: list[dict[str, str]],
                          seed: int) -> tuple[list[float], np.ndarray] | None:
    """(retention per method, bootstrap retentions [methods, samples]). Items are resampled within each task,
    the same resample for dense and every method (paired)."""
    rng = np.random.default_rng(seed)
    dense_means, means, dense_boot, boots = [], [], [], []
    for dense, methods in _aligned_items(store, dense_cells, *method_cells):
        idx = rng.integers(0, len(dense), size=(BOOTSTRAP_SAMPLES, len(dense)))
        dense_means.append(dense.mean())
        dense_boot.append(dense[idx].mean(axis=1))
        means.append([m.mean() for m in methods])
        boots.append([m[idx].mean(axis=1) for m in methods])
    if not dense_means:
        return None
    dense_mean, dense_resampled = np.mean(dense_means), np.mean(dense_boot, axis=0)
    retention = list(np.mean(means, axis=0) / dense_mean) if dense_mean > 0 else [float("nan")] * len(means[0])
    # a resample in which dense scores 0 has no retention: it is left out, never divided by a floor
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(dense_resampled > 0, np.mean(boots, axis=0) / dense_resampled, np.nan)
    return retention, boot


def seeded_bootstrap(store: Store, dense_cells: dict[str, str], methods: list[dict[int, dict[str, str]]],
                     seed: int) -> tuple[list[float], np.ndarray, list[np.ndarray]] | None:
    """Retention with calibration seeds: (mean over seeds of each method's retention, two-level bootstrap
    retentions [methods, samples], each method's per-seed retentions). Each resample draws the items of every task
    (the same for dense and every seed of every method: paired) and then, per method, as many seeds as it has
    with replacement, their deviations from the seeds' mean widened by √(k/(k−1)) so that k seeds resampled carry
    the seed variance itself (the plain resample gives (k−1)/k of it); the item-and-seed variance both enter the
    CI. With 2–3 seeds the seed part of the CI stays rough: it rests on that many values."""
    rng = np.random.default_rng(seed)
    flat = [cells for m in methods for cells in m.values()]
    dense_t: list[np.ndarray] = []
    per: list[list[list[np.ndarray]]] = [[[] for _ in m] for m in methods]
    for dense, arrays in _aligned_items(store, dense_cells, *flat):
        dense_t.append(dense)
        columns = iter(arrays)  # flat order: each method's seeds in turn
        for mi, m in enumerate(methods):
            for si in range(len(m)):
                per[mi][si].append(next(columns))
    if not dense_t:
        return None
    idx = [rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d))) for d in dense_t]
    dense_mean = float(np.mean([d.mean() for d in dense_t]))
    dense_boot = np.mean([d[i].mean(axis=1) for d, i in zip(dense_t, idx, strict=True)], axis=0)
    points, boots, spreads = [], [], []
    for mi, m in enumerate(methods):
        by_seed = np.array([np.mean([a.mean() for a in per[mi][si]]) / dense_mean if dense_mean > 0 else np.nan
                            for si in range(len(m))])
        seed_boot = np.array([np.mean([a[i].mean(axis=1) for a, i in zip(per[mi][si], idx, strict=True)], axis=0)
                              for si in range(len(m))])  # [seeds, samples]
        with np.errstate(divide="ignore", invalid="ignore"):
            seed_boot = np.where(dense_boot > 0, seed_boot / dense_boot, np.nan)
        k = len(m)
        if k > 1:  # resampling k seeds underestimates their variance by (k − 1)/k: widen their deviations to match
            centre = seed_boot.mean(axis=0, keepdims=True)
            seed_boot = centre + (seed_boot - centre) * np.sqrt(k / (k - 1))
        pick = rng.integers(0, k, size=(BOOTSTRAP_SAMPLES, k))
        boots.append(np.take_along_axis(seed_boot.T, pick, axis=1).mean(axis=1))
        points.append(float(by_seed.mean()))
        spreads.append(by_seed)
    return points, np.array(boots), spreads


def seed_cells(acc: pd.DataFrame) -> dict[int, dict[str, str]]:
    """{calibration seed: {task: cell}} (`calibration_seeds`: a cell written before seeds were recorded counts as
    the run's seed; -1 where neither is known)."""
    if "calibration_seed" not in acc:
        return {-1: dict(zip(acc["task"], acc["cell"], strict=False))}
    seeds = calibration_seeds(acc).fillna(-1).astype(int)
    return {int(s): dict(zip(g["task"], g["cell"], strict=False)) for s, g in acc.groupby(seeds)}


def _interval(samples: np.ndarray) -> tuple[float, float]:
    """95% percentile interval; NaN (printed "CI n/a") when over 5% of the resamples have no value (dense scored 0
    on them: too few items)."""
    finite = samples[np.isfinite(samples)]
    if len(finite) < 0.95 * len(samples):
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def paired_retention(store: Store, dense_cells: dict[str, str], pruned_cells: dict[str, str],
                     seed: int = 0) -> tuple[float, float, float]:
    """Retention = mean over tasks of pruned accuracy ÷ the same for dense, on the same items; 95% CI by a
    paired bootstrap over items."""
    result = bootstrap_retentions(store, dense_cells, [pruned_cells], seed)
    if result is None:
        return float("nan"), float("nan"), float("nan")
    (retention,), boot = result
    lo, hi = _interval(boot[0])
    return float(retention), lo, hi


def retention_difference(store: Store, dense_cells: dict[str, str], a_cells: dict[str, str],
                         b_cells: dict[str, str], seed: int = 0) -> tuple[float, float, float]:
    """Retention of A minus retention of B on the tasks and items all three share, with a 95% CI from one paired
    bootstrap (the same resampled items for dense, A and B). A CI that excludes 0 is a significant difference."""
    diff, lo, hi, _p = retention_difference_test(store, dense_cells, a_cells, b_cells, seed)
    return diff, lo, hi


def retention_difference_test(store: Store, dense_cells: dict[str, str], a_cells: dict[str, str],
                              b_cells: dict[str, str], seed: int = 0) -> tuple[float, float, float, float]:
    """`retention_difference` and its bootstrap two-sided p-value (bench.paired.bootstrap_p_value)."""
    result = bootstrap_retentions(store, dense_cells, [a_cells, b_cells], seed)
    if result is None:
        return (float("nan"),) * 4
    (ra, rb), boot = result
    lo, hi = _interval(boot[0] - boot[1])
    return float(ra - rb), lo, hi, bootstrap_p_value(boot[0] - boot[1])


def item_metrics_against_dense(store: Store, dense_cells: dict[str, str], pruned_cells: dict[str, str],
                               seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """KL, flips, lost and agreement with dense over the tasks both scored (bench.paired), with 95% CIs."""
    tasks = [(store.load_samples(dense_cells[t]), store.load_samples(cell), primary_metric(t))
             for t, cell in pruned_cells.items() if t in dense_cells]
    return paired_item_metrics(tasks, seed=seed)


def dense_accuracy(acc: pd.DataFrame, model, seed, device, dtype, limits: set) -> pd.DataFrame:
    """The dense reference's accuracy rows for one setup (model, seed, device, dtype) at these item limits."""
    same = (acc["model"] == model) & (acc["seed"] == seed) & (acc["device"] == device) & (acc["dtype"] == dtype)
    return acc[same & (acc["method"] == "dense") & acc["limit"].isin(limits)]


def summarize(rows: pd.DataFrame, store: Store) -> pd.DataFrame:
    """One line per (model, method, target sparsity) found in `rows`."""
    out = []
    group_keys = ["model", "method", "target_sparsity", "seed", "device", "dtype"]
    all_acc = accuracy_rows(rows)
    for key, group in rows.groupby(group_keys, dropna=False, sort=False):
        model, method, target, seed, device, dtype = key
        g_all = accuracy_rows(group)
        g_acc = matched_only(g_all)
        d_acc = dense_accuracy(all_acc, model, seed, device, dtype, set(g_acc["limit"].dropna()))
        d_acc = d_acc[d_acc["task"].isin(g_acc["task"])]
        dense_cells = dict(zip(d_acc["task"], d_acc["cell"], strict=False))
        by_seed = seed_cells(g_acc) if len(g_acc) else {}
        seed_values = np.array([])
        if len(by_seed) > 1:
            (retention,), boot, (seed_values,) = seeded_bootstrap(store, dense_cells, [by_seed], int(seed)) \
                or ([np.nan], np.full((1, 1), np.nan), [np.array([])])
            lo, hi = _interval(boot[0])
            per_seed = [item_metrics_against_dense(store, dense_cells, cells, seed=int(seed))
                        for cells in by_seed.values()]
            # the mean over seeds, with the widest of the seeds' item CIs
            items = {m: (float(np.mean([x[m][0] for x in per_seed])), min(x[m][1] for x in per_seed),
                         max(x[m][2] for x in per_seed)) for m in ITEM_METRICS}
        else:
            pruned_cells = dict(zip(g_acc["task"], g_acc["cell"], strict=False))
            retention, lo, hi = paired_retention(store, dense_cells, pruned_cells, seed=int(seed))
            items = item_metrics_against_dense(store, dense_cells, pruned_cells, seed=int(seed))
        # several calibration seeds: their mean (one seed: its value)
        eff = group[group["task"] == "efficiency"].groupby("metric")["value"].mean()
        wiki_rows = group[group["task"] == "wikitext2"]
        wiki = wiki_rows.groupby("metric")["value"].mean()
        tasks_sparsity = g_all["measured_sparsity"].astype(float)
        out.append({
            "method": method, "target": target,
            "c(tasks)": tasks_sparsity.mean() if len(tasks_sparsity) else np.nan,
            "c_min(tasks)": tasks_sparsity.min() if len(tasks_sparsity) else np.nan,
            "c_max(tasks)": tasks_sparsity.max() if len(tasks_sparsity) else np.nan,
            "matched": f"{len(g_acc)}/{len(g_all)}",
            "c(wiki)": wiki.get("compute_sparsity", np.nan),
            "c_sd(wiki)": wiki.get("compute_sparsity_sd", np.nan),
            "wiki_matched": bool(wiki_rows["matched"].fillna(False).all()) if len(wiki_rows) else False,
            "c(probe)": eff.get("compute_sparsity", np.nan),
            "mean_acc": g_acc["value"].mean() if len(g_acc) else np.nan,
            "tasks": len(g_acc),
            "retention": retention, "ret_lo": lo, "ret_hi": hi,
            "seeds": max(len(by_seed), 1) if method != "dense" else 1,
            "seed_min": float(seed_values.min()) if len(seed_values) else np.nan,
            "seed_max": float(seed_values.max()) if len(seed_values) else np.nan,
            **{f"{m}{suffix}": items[m][i] for m in ITEM_METRICS for i, suffix in enumerate(("", "_lo", "_hi"))},
            "ppl": wiki.get("ppl", np.nan),
            "ppl_ratio": wiki.get("ppl_ratio", np.nan),
            "flops_ratio": eff["decoder_flops"] / eff["dense_decoder_flops"] if "decoder_flops" in eff else np.nan,
            "prefill_speedup": eff.get("prefill_speedup", np.nan),
            # the probe's dense-vs-dense control strayed (bench.units.efficiency): its speedup is not a number to read
            "prefill_unstable": bool(eff.get("unstable", 0.0) > 0),
            "model": model, "device": device, "dtype": dtype,
        })
    frame = pd.DataFrame(out)
    if len(frame):
        frame["_dense"] = frame["method"] != "dense"
        frame = frame.sort_values(["_dense", "method", "target"]).drop(columns="_dense").reset_index(drop=True)
    return frame


def pairwise_differences(rows: pd.DataFrame, store: Store) -> pd.DataFrame:
    """Every ordered pair of pruned methods run at the same (model, target sparsity, seed, device, dtype, limit):
    retention(A) − retention(B) over the tasks matched for both, with its paired-bootstrap 95% CI, and whether
    the CI excludes 0."""
    acc = matched_only(accuracy_rows(rows))
    out = []
    keys = ["model", "target_sparsity", "seed", "device", "dtype", "limit"]
    for key, group in acc.groupby(keys, dropna=False, sort=True):
        model, target, seed, device, dtype, limit = key
        dense = dense_accuracy(acc, model, seed, device, dtype, {limit})
        dense_cells = dict(zip(dense["task"], dense["cell"], strict=False))
        seeded = {m: seed_cells(g) for m, g in group.groupby("method") if m != "dense"}
        names = sorted(seeded)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if len(seeded[a]) == 1 and len(seeded[b]) == 1:
                    (cells_a,), (cells_b,) = seeded[a].values(), seeded[b].values()
                    diff, lo, hi, p = retention_difference_test(store, dense_cells, cells_a, cells_b, seed=int(seed))
                else:  # two-level: items and each method's seeds resampled
                    result = seeded_bootstrap(store, dense_cells, [seeded[a], seeded[b]], int(seed))
                    if result is None:
                        continue
                    (ra, rb), boot, _ = result
                    diff, (lo, hi), p = ra - rb, _interval(boot[0] - boot[1]), bootstrap_p_value(boot[0] - boot[1])
                if np.isfinite(diff):
                    out.append({"model": model, "device": device, "dtype": dtype, "target": target, "a": a, "b": b,
                                "retention_a_minus_b": diff,
                                "lo": lo, "hi": hi, "ci_excludes_0": bool(np.isfinite(lo) and (lo > 0 or hi < 0)),
                                "p": p})
    frame = pd.DataFrame(out)
    if len(frame):
        # one family: every comparison the table shows, Holm-adjusted so "significant" keeps its 5% meaning
        frame["p_holm"] = holm(frame["p"])
        frame["significant"] = frame["p_holm"] < 0.05
    return frame


def format_pairwise(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(fewer than two pruned methods at one sparsity)"
    shown = frame.copy()
    shown["A − B (95% CI)"] = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else f"{d:+.3f} [CI n/a]"
                               for d, lo, hi in zip(shown["retention_a_minus_b"], shown["lo"], shown["hi"], strict=True)]
    shown["significant (Holm)"] = shown["significant"].map({True: "yes", False: "no"})
    shown["p"] = [f"{p:.3f}" for p in shown["p"]]
    shown["p Holm"] = [f"{p:.3f}" for p in shown["p_holm"]]
    columns = ["target", "a", "b", "A − B (95% CI)", "p", "p Holm", "significant (Holm)"]
    table = shown[(["model"] if shown["model"].nunique() > 1 else []) + columns].to_string(
        index=False, float_format=lambda v: f"{v:.3f}")
    return (table + f"\n(significant: Holm-adjusted bootstrap p < 0.05 over these {len(shown)} comparisons; "
            "the 95% CIs are unadjusted)")


def format_summary(frame: pd.DataFrame) -> str:
    """The summary as text: one table per model when the store holds several."""
    if frame.empty:
        return "(no results)"
    if frame["model"].nunique() > 1:
        return "\n\n".join(f"model: {model}\n{format_summary(g)}" for model, g in frame.groupby("model", sort=True))
    shown = frame.copy()
    shown["retention (95% CI)"] = [
        "-" if not np.isfinite(r) else f"{r:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{r:.3f} [CI n/a]"
        for r, lo, hi in zip(shown["retention"], shown["ret_lo"], shown["ret_hi"], strict=True)]
    shown["c tasks [min, max]"] = [f"{c:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(c) else "-"
                                   for c, lo, hi in zip(shown["c(tasks)"], shown["c_min(tasks)"],
                                                        shown["c_max(tasks)"], strict=True)]
    shown["c wiki"] = [(f"{c:.3f}±{sd:.3f}" + ("" if ok else "*")) if np.isfinite(c) else "-"
                       for c, sd, ok in zip(shown["c(wiki)"], shown["c_sd(wiki)"], shown["wiki_matched"],
                                            strict=True)]
    for name, label, fmt in (("flips", "flips vs dense", "{:.3f} [{:.3f}, {:.3f}]"),
                             ("kl", "KL vs dense", "{:.3f} [{:.3f}, {:.3f}]"),
                             ("agreement", "agree", "{:.3f}")):
        shown[label] = ["-" if method == "dense" or not np.isfinite(v) else fmt.format(v, lo, hi)
                        for method, v, lo, hi in zip(shown["method"], shown[name], shown[f"{name}_lo"],
                                                     shown[f"{name}_hi"], strict=True)]
    with_seeds = "seeds" in shown and (shown["seeds"] > 1).any()
    if with_seeds:
        shown["seeds [retention min, max]"] = [
            f"{int(n)} [{a:.3f}, {b:.3f}]" if n > 1 else str(int(n))
            for n, a, b in zip(shown["seeds"], shown["seed_min"], shown["seed_max"], strict=True)]
    shown["prefill speedup"] = ["unstable" if bad else "-" if not np.isfinite(v) else f"{v:.2f}"
                                for v, bad in zip(shown["prefill_speedup"], shown["prefill_unstable"], strict=True)]
    cols = ["method", "target", "c tasks [min, max]", "matched", "c wiki", "c(probe)", "mean_acc",
            "retention (95% CI)", *(["seeds [retention min, max]"] if with_seeds else []), "flips vs dense",
            "KL vs dense", "agree", "ppl", "ppl_ratio", "prefill speedup"]
    return shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def retention_at_targets(summary: pd.DataFrame) -> pd.DataFrame:
    """Each pruned method's retention at each target c studied for its model, read off its own retention-vs-measured-c
    curve: linear interpolation between the two measured points that bracket the target (the CI bounds interpolated
    with the same weights, which is exact when the two points' errors are perfectly correlated and otherwise a
    conservative approximation), the point itself when one lies within ±0.02 of the target, and nothing where the
    target lies outside the measured range (no extrapolation). `from c` names the measured points used."""
    studied = summary[summary["method"] != "dense"]
    targets_by_model = {model: sorted(g["target"].unique()) for model, g in studied.groupby("model")}
    pruned = studied.dropna(subset=["retention", "c(tasks)"])
    out = []
    for (model, method, _device, _dtype), g in pruned.groupby(["model", "method", "device", "dtype"], sort=True):
        targets = targets_by_model[model]
        points = g.sort_values("c(tasks)")
        c = points["c(tasks)"].to_numpy(float)
        for target in targets:
            row = {"model": model, "method": method, "target": float(target)}
            near = np.abs(c - target)
            if near.min() <= MATCH_TOLERANCE and (len(c) == 1 or not (c.min() < target < c.max())):
                k = int(near.argmin())
                row.update({"retention": points["retention"].iloc[k], "lo": points["ret_lo"].iloc[k],
                            "hi": points["ret_hi"].iloc[k], "from c": f"{c[k]:.3f}"})
            elif c.min() < target < c.max():
                k = int(np.searchsorted(c, target))
                w = (target - c[k - 1]) / (c[k] - c[k - 1])
                lerp = {name: (1 - w) * points[name].iloc[k - 1] + w * points[name].iloc[k]
                        for name in ("retention", "ret_lo", "ret_hi")}
                row.update({"retention": lerp["retention"], "lo": lerp["ret_lo"], "hi": lerp["ret_hi"],
                            "from c": f"{c[k - 1]:.3f}–{c[k]:.3f}"})
            else:
                row.update({"retention": np.nan, "lo": np.nan, "hi": np.nan,
                            "from c": "outside " + (f"{c[0]:.3f}" if len(c) == 1 else f"{c.min():.3f}–{c.max():.3f}")})
            out.append(row)
    return pd.DataFrame(out)


def format_retention_at_targets(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no pruned method with a retention)"
    shown = frame.copy()
    shown["retention at target (95% CI)"] = [
        "-" if not np.isfinite(r) else f"{r:.3f} [{lo:.3f}, {hi:.3f}]"
        for r, lo, hi in zip(shown["retention"], shown["lo"], shown["hi"], strict=True)]
    columns = ["method", "target", "retention at target (95% CI)", "from c"]
    return (shown[(["model"] if shown["model"].nunique() > 1 else []) + columns].to_string(index=False)
            + "\n(linear in measured c between the bracketing points, CI bounds likewise; a point within ±0.02 "
              "of the target stands for it; no extrapolation)")


def format_unmatched(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(every cell is matched: |c − target| <= 0.02 on the scored inputs)"
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


SWEEP_METRICS = ("prefill_speedup", "decode_speedup", "control_speedup")


def latency_sweep_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (model, method, target, batch, seq_len) of the latency-sweep unit: each speedup with its CI,
    the dense-vs-dense control, c at that point, the rounds timed and the `unstable` flag."""
    sweep = rows[rows["task"] == "latency_sweep"]
    if sweep.empty:
        return pd.DataFrame()
    keys = ["model", "device", "dtype", "method", "target_sparsity", "batch", "seq_len"]
    # calibration seeds of one method: their mean; `unstable` then reads > 0 when any seed's point was
    wide = sweep.pivot_table(index=keys, columns="metric", values="value", aggfunc="mean").reset_index()
    rounds = sweep.groupby(keys)["n"].max().reset_index(name="rounds")
    wide = wide.merge(rounds, on=keys)
    wide["unstable"] = wide["unstable"] > 0
    return wide.sort_values(keys).reset_index(drop=True)


def format_latency_sweep(frame: pd.DataFrame) -> str:
    """Speedups with 95% CIs; a point whose control strays from 1.00 (or whose CIs stayed wide) prints as
    `unstable` with its control instead of a speedup."""
    if frame.empty:
        return "(no latency sweep in the store: run with --latency-sweep)"

    def ci(row, name: str) -> str:
        return f"{row[name]:.2f} [{row[name + '_lo']:.2f}, {row[name + '_hi']:.2f}]"

    lines = []
    for _, row in frame.iterrows():
        line = {"model": row["model"], "device": row["device"], "method": row["method"],
                "target": row["target_sparsity"],
                "batch": int(row["batch"]), "seq_len": int(row["seq_len"]), "c": f"{row['compute_sparsity']:.3f}",
                "ideal 1/(1-c)": f"{1 / (1 - row['compute_sparsity']):.2f}", "rounds": int(row["rounds"])}
        if row["unstable"]:
            line["prefill speedup (95% CI)"] = line["decode speedup (95% CI)"] = "unstable"
        else:
            line["prefill speedup (95% CI)"] = ci(row, "prefill_speedup")
            line["decode speedup (95% CI)"] = ci(row, "decode_speedup")
        line["dense vs dense control"] = ci(row, "control_speedup")
        lines.append(line)
    table = pd.DataFrame(lines)
    for column in ("model", "device"):
        if table[column].nunique() == 1:
            table = table.drop(columns=column)
    return table.to_string(index=False) + ("\n(unstable: the dense-vs-dense control's 95% CI misses 1.00, or a CI "
                                           "stayed wider than ±3% at the round cap; rerun on a quieter machine)")
