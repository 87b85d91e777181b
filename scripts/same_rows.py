"""Do two result stores hold the same rows? Compares every (model, method, target sparsity, calibration seed, task,
metric, batch, seq_len) value except timings (which differ from run to run), exactly, and the cell identities.

    PYTHONPATH=. python scripts/same_rows.py results-local results-ray

Prints the differences and exits 1 if there are any."""

from __future__ import annotations

import sys

from bench.store import TIMING_METRICS as TIMINGS
from bench.store import Store

KEY = ["model", "method", "target_sparsity", "calibration_seed", "task", "metric", "batch", "seq_len"]


def values(path: str) -> tuple[dict, set]:
    rows = Store(path).load_rows()
    kept = rows[~rows["metric"].isin(TIMINGS)]
    return ({tuple(str(v) for v in r[KEY]): r["value"] for _, r in kept.iterrows()}, set(rows["cell"]))


def main(a: str, b: str) -> int:
    (va, ca), (vb, cb) = values(a), values(b)
    def same(x, y) -> bool:
        return x == y or (x is not None and y is not None and x != x and y != y)  # NaN on both sides

    differ = sorted(k for k in va.keys() | vb.keys() if not same(va.get(k), vb.get(k)))
    for key in differ[:20]:
        print("differs:", dict(zip(KEY, key, strict=True)), va.get(key), vb.get(key))
    print(f"{len(va)} rows vs {len(vb)} rows (timings left out); {len(differ)} differ; cells: {len(ca)} vs "
          f"{len(cb)}, {'the same identities' if ca == cb else 'different identities'}")
    return 1 if differ or ca != cb else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
