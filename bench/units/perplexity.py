"""The perplexity unit of a cell."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.matching import Workload
from bench.units.context import CellContext
from methods import Method


def measure_perplexity(ctx: CellContext, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Perplexity with the knob solved on the windows themselves; compute sparsity counted with FlopCounterMode
    on every window as it was scored (`measured_sparsity`: all windows; `compute_sparsity_sd`: spread across
    windows); `ppl_ratio`: the method's perplexity ÷ the dense model's on exactly the same predictions."""
    from bench.wikitext import perplexity, wikitext_windows

    windows = wikitext_windows(ctx.tokenizer, settings["seq_len"], settings["windows"])
    match = ctx.fit(method, [(1, windows.shape[1])] * len(windows))
    with method.apply(ctx.model) as pruned:
        if method.knob(ctx.model.config) is not None:
            workload = Workload([(w[None], torch.zeros(1, len(w), dtype=torch.bool), {}) for w in windows])
            match = ctx.solve(method, pruned, workload)
        result = perplexity(pruned, windows, progress=ctx.progress, count_flops=True)
    dense = ctx.dense_perplexity(windows)
    dense_window = ctx.dense_flops(1, windows.shape[1])
    per_window = np.array([1.0 - flops / dense_window for flops in result.executed_flops])
    spread = float(per_window.std(ddof=1)) if len(per_window) > 1 else 0.0
    # All windows have one length, so the mean of the per-window values is one division of integer sums:
    # exact to the last bit on every CPU (numpy's SIMD mean is not, and the gate compares exactly).
    measured = 1.0 - sum(result.executed_flops) / (dense_window * len(result.executed_flops))
    base = {"task": "wikitext2", "n": result.windows, "seq_len": result.seq_len,
            **ctx.match_columns(match, measured)}
    dense_same = dense.ppl_on(result.scored)
    return [{**base, "metric": "ppl", "value": result.ppl},
            {**base, "metric": "dense_ppl_same_positions", "value": dense_same},
            {**base, "metric": "ppl_ratio", "value": result.ppl / dense_same},
            {**base, "metric": "scored_fraction", "value": result.nll_tokens / result.predictions},
            {**base, "metric": "compute_sparsity", "value": measured,
             "stderr": spread / np.sqrt(len(per_window))},
            {**base, "metric": "compute_sparsity_sd", "value": spread}]
