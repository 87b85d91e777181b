"""Figures, a Markdown report and a self-contained HTML report, regenerated only from the results store.

Every model in the store gets its own section (paper-style table, summary, method-vs-method differences,
unmatched cells) and its own panel in each figure. The HTML embeds its figures as data URIs, so it opens offline
as one file."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.power import format_power, study_power  # noqa: E402
from bench.store import Store  # noqa: E402
from bench.summary import (  # noqa: E402
    accuracy_rows,
    current_rows,
    format_latency_sweep,
    format_pairwise,
    format_retention_at_targets,
    format_summary,
    format_unmatched,
    latency_sweep_table,
    pairwise_differences,
    retention_at_targets,
    summarize,
    unmatched_cells,
)
from bench.tables import PaperTable, caption, format_text, paper_tables  # noqa: E402

PANEL = (5.6, 4.2)  # inches per model panel


def markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if not np.isfinite(v) else floatfmt.format(v)
        return "-" if v is None or v is pd.NA else str(v)

    head = "| " + " | ".join(frame.columns) + " |"
    sep = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _label(method: str, target: float) -> str:
    return "dense" if method == "dense" else f"{method}@{target:g}"


def _colours(methods) -> dict[str, tuple]:
    """One colour per method, the same in every figure and panel."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(set(methods)))}


def _panels(models: list[str], title: str, width: float = PANEL[0]):
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), PANEL[1]), squeeze=False)
    fig.suptitle(title)
    return fig, dict(zip(models, axes[0], strict=True))


def _save(fig, path: Path) -> None:
    rows = -(-len(fig.legends[0].get_texts()) // fig.legends[0]._ncols) if fig.legends else 0
    fig.tight_layout(rect=(0, min(0.05 + 0.05 * rows, 0.4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_panel(ax, model: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(model)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _finish(fig, axes: dict, path: Path) -> None:
    _legend_outside(fig, axes.values())
    _save(fig, path)


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, below the panels: labels never cover points."""
    axes = list(axes)
    handles: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=8, frameon=False,
                   ncol=max(1, min(len(handles), 3 * len(axes))))


def fig_retention(summary: pd.DataFrame, path: Path) -> None:
    """Retention vs compute sparsity measured on the scored items: a CI band where a method was run at several
    sparsities, error bars otherwise."""
    models = sorted(summary["model"].unique())
    colours = _colours(summary["method"])
    fig, axes = _panels(models, "Accuracy retention vs measured compute sparsity (paired bootstrap 95% CI)")
    for model, ax in axes.items():
        pruned = summary[(summary["model"] == model) & (summary["method"] != "dense")]
        for method, g in pruned.dropna(subset=["retention"]).sort_values("target").groupby("method"):
            x = g["c(tasks)"].fillna(g["target"]).to_numpy()
            y, lo, hi = (g[c].to_numpy() * 100 for c in ("retention", "ret_lo", "ret_hi"))
            if len(g) > 1:
                ax.plot(x, y, marker="o", color=colours[method], label=method)
                ax.fill_between(x, lo, hi, color=colours[method], alpha=0.15)
            else:
                ax.errorbar(x, y, yerr=np.vstack([y - lo, hi - y]), marker="o", capsize=3, color=colours[method],
                            label=method, ls="none")
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        _label_panel(ax, model, "compute sparsity c on the scored items", "accuracy retention vs dense (%)")
    _finish(fig, axes, path)


def fig_pareto(summary: pd.DataFrame, path: Path) -> None:
    """Retention vs measured prefill speedup; the dashed line is the speedup c would give if time followed
    FLOPs, 1/(1 − c), at each target."""
    models = sorted(summary["model"].unique())
    colours = _colours(summary["method"])
    fig, axes = _panels(models, "Retention vs measured prefill speedup (ideal: 1/(1 − c))")
    for model, ax in axes.items():
        pruned = summary[(summary["model"] == model) & (summary["method"] != "dense")]
        pruned = pruned[~pruned["prefill_unstable"].astype(bool)]  # an unstable probe gives no speedup to plot
        pruned = pruned.dropna(subset=["retention", "prefill_speedup"])
        for method, g in pruned.groupby("method"):
            y = g["retention"].to_numpy() * 100
            err = np.vstack([y - g["ret_lo"].to_numpy() * 100, g["ret_hi"].to_numpy() * 100 - y])
            ax.errorbar(g["prefill_speedup"], y, yerr=err, marker="o", capsize=3, ls="none", color=colours[method],
                        label=method)
        for target in sorted(pruned["target"].unique()):
            ax.axvline(1 / (1 - target), color="grey", ls="--", lw=0.8)
            ax.annotate(f"ideal @ c={target:g}", (1 / (1 - target), ax.get_ylim()[1]), fontsize=7, rotation=90,
                        va="top", ha="right", color="grey")
        ax.axvline(1.0, color="black", lw=0.6)
        _label_panel(ax, model, "prefill speedup over dense (interleaved, measured)", "accuracy retention (%)")
    _finish(fig, axes, path)


def fig_task_accuracy(rows: pd.DataFrame, path: Path) -> None:
    acc = accuracy_rows(rows).copy()
    acc["label"] = [_label(m, t) for m, t in zip(acc["method"], acc["target_sparsity"], strict=True)]
    models = sorted(acc["model"].unique())
    n_tasks = acc["task"].nunique()
    fig, axes = _panels(models, "Per-task accuracy (%; acc_norm where defined)", width=max(6.4, 1.1 * n_tasks))
    for model, ax in axes.items():
        table = acc[acc["model"] == model].pivot_table(index="task", columns="label", values="value", aggfunc="mean")
        width = 0.8 / max(len(table.columns), 1)
        for i, label in enumerate(table.columns):
            ax.bar(np.arange(len(table)) + i * width, table[label] * 100, width, label=label)
        ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, table.index, rotation=25, ha="right")
        ax.set_title(model)
        ax.set_ylabel("accuracy (%)")
    _finish(fig, axes, path)


def fig_perplexity(summary: pd.DataFrame, path: Path) -> None:
    models = sorted(summary["model"].unique())
    colours = _colours(summary["method"])
    fig, axes = _panels(models, "Perplexity ÷ dense perplexity on the same positions (WikiText-2)")
    for model, ax in axes.items():
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        pruned = summary[(summary["model"] == model) & (summary["method"] != "dense")]
        for method, g in pruned.dropna(subset=["ppl_ratio"]).sort_values("target").groupby("method"):
            ax.plot(g["c(wiki)"].fillna(g["target"]), g["ppl_ratio"], marker="o", color=colours[method],
                    label=method)
        ax.set_yscale("log")
        _label_panel(ax, model, "compute sparsity c on the WikiText-2 windows", "perplexity ratio")
    _finish(fig, axes, path)


def fig_flops_vs_speedup(summary: pd.DataFrame, path: Path) -> None:
    """Points in the legend (coloured by method, one marker per target), never as overlapping text labels."""
    models = sorted(summary["model"].unique())
    colours = _colours(summary["method"])
    markers = dict(zip(sorted(summary["target"].unique()), "osD^vP*X", strict=False))
    fig, axes = _panels(models, "FLOPs reduction vs measured prefill speedup")
    for model, ax in axes.items():
        g = summary[(summary["model"] == model) & ~summary["prefill_unstable"].astype(bool)]
        g = g.dropna(subset=["flops_ratio", "prefill_speedup"])
        for r in g.itertuples(index=False):
            ax.scatter(1 / r.flops_ratio, r.prefill_speedup, color=colours[r.method], marker=markers[r.target],
                       label=_label(r.method, r.target), s=40)
        lim = max([1.5, *(1 / g["flops_ratio"]).tolist(), *g["prefill_speedup"].tolist()]) * 1.05
        ax.plot([1, lim], [1, lim], color="grey", ls="--", lw=0.8, label="speedup = FLOPs reduction")
        _label_panel(ax, model, "FLOPs reduction (dense ÷ pruned decoder FLOPs)", "prefill speedup (interleaved)")
    _finish(fig, axes, path)


def fig_latency_sweep(rows: pd.DataFrame, path: Path) -> bool:
    """Prefill speedup vs sequence length per method (one line per batch size), 95% CI bars, the ideal 1/(1 − c)
    dashed; unstable points hollow. False (no figure) when the store has no sweep."""
    table = latency_sweep_table(rows)
    if table.empty:
        return False
    models = sorted(table["model"].unique())
    colours = _colours(table["method"])
    fig, axes = _panels(models, "Prefill speedup vs length (latency sweep; hollow = unstable; dashed = 1/(1 − c))")
    for model, ax in axes.items():
        for (method, batch), g in table[table["model"] == model].groupby(["method", "batch"]):
            g = g.sort_values("seq_len")
            style = "-" if batch == table["batch"].min() else ":"
            ax.plot(g["seq_len"], g["prefill_speedup"], style, color=colours[method], label=f"{method} (batch {batch})")
            ax.errorbar(g["seq_len"], g["prefill_speedup"], ls="none", color=colours[method], capsize=2,
                        yerr=np.vstack([g["prefill_speedup"] - g["prefill_speedup_lo"],
                                        g["prefill_speedup_hi"] - g["prefill_speedup"]]))
            for stable, marker_face in ((True, colours[method]), (False, "none")):
                pts = g[g["unstable"] != stable]
                ax.scatter(pts["seq_len"], pts["prefill_speedup"], facecolors=marker_face, edgecolors=colours[method],
                           zorder=3)
            ax.plot(g["seq_len"], 1 / (1 - g["compute_sparsity"]), "--", color=colours[method], lw=0.8, alpha=0.6)
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log", base=2)
        _label_panel(ax, model, "sequence length (tokens)", "prefill speedup over dense")
    _finish(fig, axes, path)
    return True


def layer_profiles(rows: pd.DataFrame, store: Store) -> dict[str, pd.DataFrame]:
    """Per model: rows = method@target (BlockPruner split into its MHA and MLP blocks), columns = decoder layers,
    values = the fraction of tokens the layer (block) computed on the WikiText-2 windows, as the method reported it
    in the cell (`stats`: removed layers and blocks are 0, routed or dropped tokens lower it)."""
    wiki = rows[(rows["task"] == "wikitext2") & (rows["method"] != "dense")].drop_duplicates("cell")
    out: dict[str, pd.DataFrame] = {}
    for model, group in wiki.groupby("model"):
        lines = {}
        seeded = "calibration_seed" in group and group["calibration_seed"].nunique() > 1
        for r in group.sort_values(["method", "target_sparsity"]).itertuples():
            stats = store.load_identity(r.cell).get("stats", {})
            label = _label(r.method, r.target_sparsity)
            if seeded and not pd.isna(r.calibration_seed):  # one row per calibration seed
                label += f" seed {int(r.calibration_seed)}"
            fractions = stats.get("per_layer_computed_fraction") or []
            if "blocks_removed" in stats and fractions:
                layers = len(fractions)
                for kind in ("mha", "mlp"):
                    gone = {int(i) for k, i in stats["blocks_removed"] if k == kind}
                    lines[f"{label} {kind.upper()}"] = [0.0 if i in gone else 1.0 for i in range(layers)]
            elif fractions:
                lines[label] = [float(f) for f in fractions]
        if lines:
            width = max(len(v) for v in lines.values())
            out[str(model)] = pd.DataFrame({k: v + [np.nan] * (width - len(v)) for k, v in lines.items()}).T
    return out


def fig_layer_profile(profiles: dict[str, pd.DataFrame], path: Path) -> bool:
    """What each method did, per layer, as a heat map: 1 = every token computed, 0 = removed."""
    if not profiles:
        return False
    models = sorted(profiles)
    height = max(2.0, 0.45 * max(len(p) for p in profiles.values()) + 1.4)
    fig, axes = plt.subplots(len(models), 1, figsize=(11, height * len(models)), squeeze=False)
    fig.suptitle("Fraction of tokens each decoder layer computed (WikiText-2 windows; 0 = removed)")
    for ax, model in zip(axes[:, 0], models, strict=True):
        profile = profiles[model]
        image = ax.imshow(profile.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_yticks(range(len(profile)), profile.index, fontsize=8)
        ax.set_xticks(range(profile.shape[1]), [str(i) for i in range(profile.shape[1])], fontsize=7)
        ax.set_xlabel("decoder layer")
        ax.set_title(model)
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


FIGURES = {
    "retention_vs_sparsity.png": ("summary", fig_retention),
    "retention_vs_speedup.png": ("summary", fig_pareto),
    "task_accuracy.png": ("rows", fig_task_accuracy),
    "perplexity_ratio_vs_sparsity.png": ("summary", fig_perplexity),
    "flops_vs_speedup.png": ("summary", fig_flops_vs_speedup),
}


def what_is_real(summary: pd.DataFrame, pairwise: pd.DataFrame) -> list[str]:
    """Plain sentences, per model and target, from the significance results: which differences survive Holm
    correction, which methods' retention CIs exclude 100%, and how many comparisons are indistinguishable."""
    lines = []
    pruned = summary[summary["method"] != "dense"]
    several = summary[["device", "dtype"]].drop_duplicates().shape[0] > 1
    for (model, device, dtype, target), group in pruned.groupby(["model", "device", "dtype", "target"], sort=True):
        head = f"{model}{f' ({device}, {dtype})' if several else ''} at c = {target:g}:"
        ranked = group.dropna(subset=["retention"])
        if ranked.empty:
            lines.append(f"{head} no matched task, so no retention to compare.")
            continue
        worse = [f"{r.method} ({100 * r.retention:.1f}% [{100 * r.ret_lo:.1f}, {100 * r.ret_hi:.1f}])"
                 for r in ranked.itertuples() if np.isfinite(r.ret_hi) and r.ret_hi < 1]
        same = pairwise[(pairwise["model"] == model) & (pairwise["device"] == device) & (pairwise["dtype"] == dtype)
                        & (pairwise["target"] == target)] if len(pairwise) else pairwise
        real = same[same["significant"]] if len(same) else same
        sentences = [head]
        if len(real):
            diffs = [f"{a if d > 0 else b} over {b if d > 0 else a} by {100 * abs(d):.1f} points "
                     f"(Holm p {p:.3f})" for a, b, d, p in zip(real["a"], real["b"], real["retention_a_minus_b"],
                                                              real["p_holm"], strict=True)]
            sentences.append("significant after Holm correction: " + "; ".join(diffs) + ".")
        else:
            sentences.append("no method-vs-method difference in retention survives Holm correction.")
        if len(same):
            sentences.append(f"{len(same) - len(real)} of {len(same)} comparisons are indistinguishable at this "
                             "study's size.")
        sentences.append("Retention CI entirely below 100%: " + (", ".join(worse) if worse else "none") + ".")
        lines.append(" ".join(sentences))
    return lines


# The questions users bring (issue 34): (A, B, margin, what it says). A claim with a margin is confirmed when the
# difference's 95% CI lies above it and refuted when the CI excludes it; with no margin ("A beats B") it is
# confirmed or refuted by a Holm-significant difference one way or the other.
CLAIMS: tuple[tuple[str, str, float, str], ...] = (
    ("ftp", "shortgpt", 0.10, "the FTP paper: FTP keeps ≥ 10 points more retention than ShortGPT"),
    ("ftp", "blockpruner", 0.10, "the FTP paper: FTP keeps ≥ 10 points more retention than BlockPruner"),
    ("ftp", "ftp-static", 0.0, "FTP's learned router beats its static teacher"),
    ("ftp", "ftp-random", 0.0, "FTP's learned router beats random token choice at its schedule"),
    ("sdtp", "sdtp-random", 0.0, "SDTP's saliency predictor beats random tokens at the same budgets"),
    ("shortgpt", "tail", 0.0, "Block Influence (ShortGPT) beats removing the last layers"),
)


def the_claims(pairwise: pd.DataFrame) -> list[str]:
    """One sentence per claim in CLAIMS whose two methods the store compares (per model, target, device, dtype):
    the difference A − B with its CI and Holm p, and confirmed / refuted / open at this resolution."""
    lines = []
    if pairwise.empty:
        return lines
    several = pairwise[["device", "dtype"]].drop_duplicates().shape[0] > 1
    for (model, device, dtype, target), same in pairwise.groupby(["model", "device", "dtype", "target"], sort=True):
        where = f"{model}{f' ({device}, {dtype})' if several else ''} at c = {target:g}"
        for a, b, margin, claim in CLAIMS:
            row = same[((same["a"] == a) & (same["b"] == b)) | ((same["a"] == b) & (same["b"] == a))]
            if row.empty:
                continue
            r = row.iloc[0]
            sign = 1.0 if r["a"] == a else -1.0
            diff, lo, hi = sign * r["retention_a_minus_b"], *sorted((sign * r["lo"], sign * r["hi"]))
            if margin > 0:
                verdict = ("confirmed (the CI lies above it)" if lo > margin else
                           f"refuted (the CI excludes +{100 * margin:.0f})" if hi < margin else
                           f"open (the CI holds +{100 * margin:.0f})")
            else:
                verdict = ("confirmed (Holm-significant)" if r["significant"] and diff > 0 else
                           "refuted (the reverse is Holm-significant)" if r["significant"] else
                           "open (not significant after Holm)")
            lines.append(f"{where}: {claim}: {a} − {b} = {100 * diff:+.1f} points "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}], Holm p {r['p_holm']:.3f}: {verdict}.")
    return lines


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html_table(table: PaperTable) -> str:
    body = table.frame.to_html(index=False, escape=True, border=0, classes="paper")
    return f"<figure>{body}<figcaption>{html.escape(caption(table))}</figcaption></figure>"


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table.paper{border-collapse:collapse;font-size:13px}table.paper td,table.paper th{padding:3px 8px;text-align:right;
border-bottom:1px solid #ddd}table.paper td:first-child,table.paper th:first-child{text-align:left}
figcaption{font-size:12px;color:#555;margin:4px 0 18px}pre{font-size:11px;overflow-x:auto;background:#f7f7f7;
padding:8px}img{max-width:100%;display:block;margin:8px 0 20px}"""


def write_report(results: str, out: str) -> list[Path]:
    store = Store(results)
    stored = store.load_rows()
    rows = current_rows(stored)
    superseded = stored["cell"].nunique() - rows["cell"].nunique()
    summary = summarize(rows, store)
    pairwise = pairwise_differences(rows, store)
    tables = paper_tables(rows, summary, pairwise)
    real = what_is_real(summary, pairwise)
    claims = the_claims(pairwise)
    power_text = format_power(study_power(rows, store))
    at_targets = retention_at_targets(summary)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, (source, draw) in FIGURES.items():
        (out_dir / name).unlink(missing_ok=True)
        if accuracy_rows(rows).empty:  # a store of generation tasks only: their table is the long-prompt section
            continue
        draw(summary if source == "summary" else rows, out_dir / name)
        figures.append(out_dir / name)
    profile_path = out_dir / "layer_profile.png"
    profile_path.unlink(missing_ok=True)
    if fig_layer_profile(layer_profiles(rows, store), profile_path):
        figures.append(profile_path)
    sweep_path = out_dir / "latency_sweep.png"
    sweep_path.unlink(missing_ok=True)  # a figure from an earlier store must not linger
    if fig_latency_sweep(rows, sweep_path):
        figures.append(sweep_path)
    sweep_text = format_latency_sweep(latency_sweep_table(rows))
    from bench.long_context import format_long_context, long_context_table

    long_table = long_context_table(rows, store)
    long_text = format_long_context(long_table) if len(long_table) else ""
    long_note = ("Generation tasks (bench.long_context): RULER's needle in a haystack at one prompt length each, "
                 "scored by greedy generation through the engine. `acc` = share of the needle's values in the "
                 "answer; retention = acc ÷ dense's acc on the same documents (95% CI: paired bootstrap over "
                 "documents); `c_prefill` = c on the prompts' prefill (matched to the target), `c_decode` = c on "
                 "the decode steps. A length where dense scores 0 is reported and not compared.")
    models = sorted(rows["model"].dropna().unique())
    commits = ", ".join(sorted(rows["git_commit"].dropna().unique()))
    acc = accuracy_rows(rows)
    limits = ", ".join(str(x) for x in sorted(acc["limit"].dropna().unique())) or "all"
    intro = (f"Generated from `{results}/` ({len(rows)} rows, {rows['cell'].nunique()} cells; {superseded} older "
             f"cells superseded by a newer one of the same method, sparsity, task and limit). Model(s): "
             f"{', '.join(models)}. Items per task (limit): {limits}. Code: {commits}.")
    definitions = (
        "Matching: every cell's compute sparsity c = 1 − F_exec/F_dense is counted with FlopCounterMode on every "
        "forward exactly as it was scored; input-dependent methods solve their knob on each task's own inputs, "
        "static ones fit the study's sequence lengths. A cell is *matched* when |c − target| ≤ 0.02; `matched` "
        "counts the matched tasks, and only those enter retention and the differences below (the others are "
        "listed under *Unmatched cells*). Retention = mean primary accuracy (acc_norm where the task defines it, "
        "else acc) of the pruned model ÷ the dense model's on the same items; 95% CI from a paired bootstrap over "
        "items. `c tasks` = mean [min, max] over tasks; `c wiki` over the WikiText-2 windows ± its spread across "
        "windows (* = unmatched); `c(probe)` on the latency probe. `ppl_ratio` = perplexity ÷ the dense model's "
        "on exactly the same predictions (SDTP keeps logits at part of the positions: `scored_fraction` rows). "
        "Per item against dense (bench.paired, paired-bootstrap 95% CIs): `flips vs dense` = share of items whose "
        "correctness changed, either way; `KL vs dense` = KL(dense ‖ pruned) between the softmax over the choices' "
        "log-likelihoods (LAMBADA: the target's log-likelihood drop); `agree` = share of items where both pick the "
        "same choice.")
    pairwise_note = ("Retention of A minus retention of B at the same target sparsity, on the matched tasks and "
                     "items both were scored on, with a 95% CI from one paired bootstrap (the same resampled items "
                     "for dense, A and B). `p` is the bootstrap two-sided p-value of a zero difference; "
                     "`significant` = its Holm-adjusted value over every comparison in the table is below 0.05 "
                     "(the CIs themselves are not adjusted).")
    per_model = []
    for model in models:
        mine = rows[rows["model"] == model]
        per_model.append((model, [t for t in tables if t.model == model],
                          format_summary(summary[summary["model"] == model]),
                          format_retention_at_targets(at_targets[at_targets["model"] == model]
                                                      if len(at_targets) else at_targets),
                          format_unmatched(unmatched_cells(mine[mine["method"] != "dense"])),
                          format_pairwise(pairwise[pairwise["model"] == model] if len(pairwise) else pairwise)))
    markdown = ["# Pruning benchmark report", "", intro, "", "## What is real", "", *[f"- {x}" for x in real], "",
                "## The claims", "", *([f"- {x}" for x in claims] or ["(none of the claimed pairs is in this store)"]),
                "", "## Resolution", "", power_text, "", "## Definitions", "", definitions, ""]
    for model, model_tables, summary_text, at_text, unmatched_text, pairwise_text in per_model:
        markdown += [f"## {model}", "", "### Paper-style table", "", "```", format_text(model_tables), "```", "",
                     "### Summary", "", "```", summary_text, "```", "", "### Retention at each target c", "", "```",
                     at_text, "```", "", "### Unmatched cells", "", "```",
                     unmatched_text, "```", "", "### Method against method", "", pairwise_note, "", "```",
                     pairwise_text, "```", ""]
    if long_text:
        markdown += ["## Long prompts", "", long_note, "", "```", long_text, "```", ""]
    markdown += ["## Latency sweep", "", "```", sweep_text, "```", ""]
    markdown += ["## Figures", "", "One panel per model.", "", *[f"![{p.stem}]({p.name})" for p in figures], ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(markdown))

    page = ["<!doctype html><html><head><meta charset='utf-8'><title>Pruning benchmark report</title>",
            f"<style>{CSS}</style></head><body><h1>Pruning benchmark report</h1>", f"<p>{html.escape(intro)}</p>",
            "<h2>What is real</h2><ul>", *[f"<li>{html.escape(x)}</li>" for x in real], "</ul>",
            "<h2>The claims</h2><ul>", *[f"<li>{html.escape(x)}</li>" for x in claims], "</ul>",
            "<h2>Resolution</h2>", f"<p>{html.escape(power_text)}</p>"]
    for model, model_tables, summary_text, at_text, unmatched_text, pairwise_text in per_model:
        page += [f"<h2>{html.escape(model)}</h2>", *[_html_table(t) for t in model_tables],
                 "<h3>Summary</h3>", _pre(summary_text), "<h3>Retention at each target c</h3>", _pre(at_text), "<h3>Method against method</h3>",
                 f"<p>{html.escape(pairwise_note)}</p>", _pre(pairwise_text), "<h3>Unmatched cells</h3>",
                 _pre(unmatched_text)]
    if long_text:
        page += ["<h2>Long prompts</h2>", f"<p>{html.escape(long_note)}</p>", _pre(long_text)]
    page += ["<h2>Latency sweep</h2>", _pre(sweep_text)]
    page += ["<h2>Figures</h2><p>One panel per model.</p>",
             # a self-check a browser can read: how many figures decoded (the report test reads it)
             "<script>window.addEventListener('load',()=>{const i=[...document.images];document.body.dataset"
             ".figures=i.length;document.body.dataset.figuresLoaded=i.filter(x=>x.complete&&x.naturalWidth>0)"
             ".length;});</script>",
             *[f"<img alt='{p.stem}' src='{_data_uri(p)}'>" for p in figures],
             f"<h2>Definitions</h2><p>{html.escape(definitions)}</p></body></html>"]
    page_path = out_dir / "report.html"
    page_path.write_text("\n".join(page))
    return [*figures, report, page_path]
