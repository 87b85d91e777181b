"""Figures and a Markdown report, regenerated only from the results store."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.store import Store  # noqa: E402
from bench.summary import (  # noqa: E402
    accuracy_rows,
    current_rows,
    format_pairwise,
    format_summary,
    format_unmatched,
    pairwise_differences,
    summarize,
    unmatched_cells,
)


def markdown_table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if not np.isfinite(v) else floatfmt.format(v)
        return "-" if v is None or v is pd.NA else str(v)

    head = "| " + " | ".join(frame.columns) + " |"
    sep = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(method: str, target: float) -> str:
    return "dense" if method == "dense" else f"{method}@{target:g}"


def fig_retention(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, g in summary[summary["method"] != "dense"].groupby("method"):
        x = g["c(tasks)"].fillna(g["target"])
        err = np.vstack([g["retention"] - g["ret_lo"], g["ret_hi"] - g["retention"]])
        ax.errorbar(x, g["retention"] * 100, yerr=err * 100, marker="o", capsize=3, label=method)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    _finish(fig, ax, path, "compute sparsity measured on the scored task items", "accuracy retention vs dense (%)",
            "Accuracy retention over matched tasks (paired bootstrap 95% CI)")


def fig_task_accuracy(rows: pd.DataFrame, path: Path) -> None:
    acc = accuracy_rows(rows).copy()
    acc["label"] = [_label(m, t) for m, t in zip(acc["method"], acc["target_sparsity"], strict=True)]
    table = acc.pivot_table(index="task", columns="label", values="value", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(table)), 4.2))
    width = 0.8 / max(len(table.columns), 1)
    for i, label in enumerate(table.columns):
        ax.bar(np.arange(len(table)) + i * width, table[label] * 100, width, label=label)
    ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, table.index, rotation=20)
    ax.set_ylabel("accuracy (%; acc_norm where defined)")
    ax.set_title("Per-task accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig_perplexity(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(1.0, color="grey", ls="--", lw=0.8, label="dense")
    for method, g in summary[summary["method"] != "dense"].groupby("method"):
        ax.plot(g["c(wiki)"].fillna(g["target"]), g["ppl_ratio"], marker="o", label=method)
    ax.set_yscale("log")
    _finish(fig, ax, path, "compute sparsity measured on the WikiText-2 windows",
            "perplexity ÷ dense perplexity on the same positions", "Perplexity ratio vs sparsity")


def fig_flops_vs_speedup(summary: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    g = summary.dropna(subset=["flops_ratio", "prefill_speedup"])
    for _, r in g.iterrows():
        ax.scatter(1 / r["flops_ratio"], r["prefill_speedup"])
        ax.annotate(_label(r["method"], r["target"]), (1 / r["flops_ratio"], r["prefill_speedup"]), fontsize=7)
    lim = max([1.5, *(1 / g["flops_ratio"]).tolist(), *g["prefill_speedup"].tolist()]) * 1.05
    ax.plot([1, lim], [1, lim], color="grey", ls="--", lw=0.8, label="speedup = FLOPs reduction")
    _finish(fig, ax, path, "FLOPs reduction (dense ÷ pruned decoder FLOPs)", "measured prefill speedup (interleaved)",
            "FLOPs reduction vs measured speedup")


def write_report(results: str, out: str) -> list[Path]:
    store = Store(results)
    stored = store.load_rows()
    rows = current_rows(stored)
    superseded = stored["cell"].nunique() - rows["cell"].nunique()
    summary = summarize(rows, store)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "retention_vs_sparsity.png": lambda p: fig_retention(summary, p),
        "task_accuracy.png": lambda p: fig_task_accuracy(rows, p),
        "perplexity_ratio_vs_sparsity.png": lambda p: fig_perplexity(summary, p),
        "flops_vs_speedup.png": lambda p: fig_flops_vs_speedup(summary, p),
    }
    paths = []
    for name, draw in figures.items():
        draw(out_dir / name)
        paths.append(out_dir / name)
    acc = accuracy_rows(rows).copy()
    acc["label"] = [_label(m, t) for m, t in zip(acc["method"], acc["target_sparsity"], strict=True)]
    per_task = acc.pivot_table(index="label", columns="task", values="value", aggfunc="mean").reset_index()
    task_sparsity = acc.pivot_table(index="label", columns="task", values="measured_sparsity",
                                     aggfunc="mean").reset_index()
    models = ", ".join(sorted(rows["model"].dropna().unique()))
    commits = ", ".join(sorted(rows["git_commit"].dropna().unique()))
    limits = ", ".join(str(x) for x in sorted(acc["limit"].dropna().unique())) or "all"
    text = [
        "# Pruning benchmark report",
        "",
        f"Generated from `{results}/` ({len(rows)} rows, {rows['cell'].nunique()} cells; {superseded} older cells "
        f"superseded by a newer one of the same method, sparsity, task and limit). Model(s): {models}. "
        f"Items per task (limit): {limits}. Code: {commits}.",
        "",
        "## Summary",
        "",
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
        "same choice.",
        "",
        "```",
        format_summary(summary),
        "```",
        "",
        "## Unmatched cells",
        "",
        "```",
        format_unmatched(unmatched_cells(rows[rows["method"] != "dense"])),
        "```",
        "",
        "## Method against method",
        "",
        "Retention of A minus retention of B at the same target sparsity, on the matched tasks and items both were "
        "scored on, with a "
        "95% CI from one paired bootstrap (the same resampled items for dense, A and B). `p` is the bootstrap "
        "two-sided p-value of a zero difference; `significant` = its Holm-adjusted value over every comparison in "
        "the table is below 0.05 (the CIs themselves are not adjusted).",
        "",
        "```",
        format_pairwise(pairwise_differences(rows, store)),
        "```",
        "",
        "## Per-task accuracy",
        "",
        markdown_table(per_task),
        "",
        "## Measured compute sparsity per task",
        "",
        markdown_table(task_sparsity),
        "",
        "## Figures",
        "",
        *[f"![{p.stem}]({p.name})" for p in paths],
        "",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    paths.append(report)
    return paths
