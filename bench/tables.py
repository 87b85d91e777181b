"""The paper-style table: one per (model, target sparsity), rows = methods, columns = per-task accuracy, their
average, accuracy retention, perplexity ratio, measured compute sparsity and prefill speedup, with significance
marked. Printed as text, LaTeX (`bench table --format latex`) or HTML (the report)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.summary import accuracy_rows

UNMATCHED = "†"  # a task cell whose c is off the target: shown, not in retention
BELOW_BEST = "‡"  # retention significantly below the best method's (Holm-adjusted over the comparisons shown)


@dataclass(frozen=True)
class PaperTable:
    model: str
    target: float
    setup: str  # device and dtype the rows were measured on
    frame: pd.DataFrame  # display strings, rows = methods
    best: str | None  # the method with the highest retention
    significant_below_best: tuple[str, ...]


def _pct(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{100 * value:.1f}"


def _fixed(value, fmt: str) -> str:
    return "-" if value is None or not np.isfinite(value) else fmt.format(value)


def paper_tables(rows: pd.DataFrame, summary: pd.DataFrame, pairwise: pd.DataFrame) -> list[PaperTable]:
    """One table per (model, target) found in `summary`; dense is the first row of each."""
    from bench.tasks import TASKS

    acc = accuracy_rows(rows)
    tasks = sorted(set(acc["task"]), key=lambda t: (list(TASKS).index(t) if t in TASKS else len(TASKS), t))
    tables = []
    pruned = summary[summary["method"] != "dense"]
    for (model, device, dtype, target), group in pruned.groupby(["model", "device", "dtype", "target"], sort=True):
        same_setup = (summary["model"] == model) & (summary["device"] == device) & (summary["dtype"] == dtype)
        dense = summary[same_setup & (summary["method"] == "dense")]
        lines = pd.concat([dense.head(1), group.sort_values("method")])
        ranked = group.dropna(subset=["retention"])
        best = ranked.loc[ranked["retention"].idxmax(), "method"] if len(ranked) else None
        below = []
        if best is not None and len(pairwise):
            same = pairwise[(pairwise["model"] == model) & (pairwise["device"] == device)
                            & (pairwise["dtype"] == dtype) & (pairwise["target"] == target) & pairwise["significant"]]
            below = sorted({b if a == best else a for a, b in zip(same["a"], same["b"], strict=True)
                            if best in (a, b)})
        out = []
        for line in lines.to_dict("records"):
            method = line["method"]
            mine = acc[(acc["model"] == model) & (acc["device"] == device) & (acc["dtype"] == dtype)
                       & (acc["method"] == method) & (acc["target_sparsity"] == (0.0 if method == "dense" else target))]
            record = {"method": method}
            values = []
            for task in tasks:
                cell = mine[mine["task"] == task]
                if cell.empty:
                    record[task] = "-"
                    continue
                value = float(cell["value"].mean())
                values.append(value)
                off = method != "dense" and not bool(cell["matched"].fillna(False).astype(bool).all())
                record[task] = _pct(value) + (UNMATCHED if off else "")
            record["avg"] = _pct(float(np.mean(values))) if values else "-"
            retention = _pct(line["retention"])
            if np.isfinite(line["retention"]) and np.isfinite(line["ret_lo"]):
                retention += f" [{_pct(line['ret_lo'])}, {_pct(line['ret_hi'])}]"
            record["retention %"] = retention + (BELOW_BEST if method in below else "")
            record["ppl ratio"] = _fixed(line["ppl_ratio"], "{:.2f}")
            record["c"] = _fixed(line["c(tasks)"], "{:.3f}")
            record["prefill speedup"] = "unstable" if line.get("prefill_unstable", False) \
                else _fixed(line["prefill_speedup"], "{:.2f}×")
            out.append(record)
        tables.append(PaperTable(model, float(target), f"{device}, {dtype}", pd.DataFrame(out), best, tuple(below)))
    return tables


def caption(table: PaperTable) -> str:
    return (f"{table.model} ({table.setup}), target compute sparsity {table.target:g}. Accuracy (%; acc_norm where the task defines "
            f"it) per task and averaged; retention = pruned ÷ dense accuracy over the matched tasks, 95% paired-"
            f"bootstrap CI; c = compute sparsity measured on the scored items; {UNMATCHED} = unmatched cell (|c − "
            f"target| > 0.02, left out of retention); {BELOW_BEST} = retention significantly below the best method's "
            f"({table.best}) after Holm correction over all method-vs-method comparisons.")


def format_text(tables: list[PaperTable]) -> str:
    if not tables:
        return "(no pruned method in the store)"
    return "\n\n".join(f"{caption(t)}\n{t.frame.to_string(index=False)}" for t in tables)


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("×", r"$\times$"), ("÷", "/"), ("−", "-"), (UNMATCHED, r"$^\dagger$"), (BELOW_BEST, r"$^\ddagger$")):
        text = text.replace(a, b)
    return text


def format_latex(tables: list[PaperTable]) -> str:
    """One `table` environment per (model, target), booktabs rules, the best retention in bold."""
    if not tables:
        return "% no pruned method in the store"
    parts = []
    for t in tables:
        columns = list(t.frame.columns)
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 r"\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", r"\toprule",
                 " & ".join(_latex_escape(c) for c in columns) + r" \\", r"\midrule"]
        for record in t.frame.to_dict("records"):
            cells = [_latex_escape(str(record[c])) for c in columns]
            if record["method"] == t.best:
                cells[columns.index("retention %")] = r"\textbf{" + cells[columns.index("retention %")] + "}"
            lines.append(" & ".join(cells) + r" \\")
            if record["method"] == "dense":
                lines.append(r"\midrule")
        lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _latex_escape(caption(t)) + "}",
                  r"\end{table}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
