"""Do a method's per-item log-likelihoods depend on the batch size? Compares two result stores of the same study
run with different `--batch-size` (docs/matching.md):

    python -m bench run --methods sdtp --tasks piqa,openbookqa,arc_easy --limit 100 --batch-size 16 --results A
    python -m bench run --methods sdtp --tasks piqa,openbookqa,arc_easy --limit 100 --batch-size 1 --results B
    python scripts/batch_independence.py A B --method sdtp

Prints, per task, the items compared, the largest |Δ log-likelihood| over every choice, and c in each store."""

from __future__ import annotations

import argparse

import numpy as np

from bench.store import Store
from bench.summary import accuracy_rows, current_rows


def cells(store: Store, method: str) -> dict[str, tuple[str, float]]:
    rows = accuracy_rows(current_rows(store.load_rows()))
    rows = rows[rows["method"] == method]
    return {task: (cell, c) for task, cell, c in zip(rows["task"], rows["cell"], rows["measured_sparsity"],
                                                       strict=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store_a")
    parser.add_argument("store_b")
    parser.add_argument("--method", default="sdtp")
    args = parser.parse_args()
    a, b = Store(args.store_a), Store(args.store_b)
    cells_a, cells_b = cells(a, args.method), cells(b, args.method)
    worst = 0.0
    for task in sorted(set(cells_a) & set(cells_b)):
        items_a = {s["doc_id"]: s["loglikelihoods"] for s in a.load_samples(cells_a[task][0])}
        items_b = {s["doc_id"]: s["loglikelihoods"] for s in b.load_samples(cells_b[task][0])}
        common = sorted(set(items_a) & set(items_b))
        delta = max(float(np.max(np.abs(np.subtract(items_a[i], items_b[i])))) for i in common)
        worst = max(worst, delta)
        print(f"{task:15s} items={len(common):4d} max|Δ loglik|={delta:.2e} c: {cells_a[task][1]:.4f} "
              f"vs {cells_b[task][1]:.4f}")
    print(f"max |Δ log-likelihood| over all tasks: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
