"""The efficiency unit of a cell."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.matching import Workload
from bench.units.context import CellContext
from methods import Method

CONTROL_BAND = (0.97, 1.03)  # dense against itself outside this: the cell's speedups are flagged `unstable`


def measure_efficiency(ctx: CellContext, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Compute sparsity, memory and parameters of the pruned model on the probe's one (batch, length), and its
    prefill and decode speedups timed as the latency sweep times a point: `repeats` rounds of dense, pruned and a
    second dense run (the control) in rotating order, speedups as ratios of medians with bootstrap CIs. `unstable`
    = 1 where the control reads outside `CONTROL_BAND` or its CI misses 1.00; summaries then print `unstable`
    rather than a speedup. (The sweep's own stopping rule, CIs within ±3%, is `--latency-sweep`'s: at this
    probe it would take up to 30 rounds per method.)"""
    from bench.flops import count_flops
    from bench.timing import parameter_count, peak_memory_mb, sweep_point
    from bench.wikitext import wikitext_windows

    n, b = settings["seq_len"], settings["batch"]
    ids = wikitext_windows(ctx.tokenizer, n, b).to(ctx.device)
    dense_flops = count_flops(ctx.model, ids).decoder
    match = ctx.fit(method, [(b, n)])
    if method.knob(ctx.model.config) is not None:
        with method.apply(ctx.model) as pruned:  # the solved knob stays set for the timed apply()s below
            match = ctx.solve(method, pruned, Workload([(ids, torch.zeros_like(ids, dtype=torch.bool), {})]))
    repeats = settings["repeats"]
    point = sweep_point(ctx.model, lambda: method.apply(ctx.model), ids, new_tokens=settings["decode_tokens"],
                        min_rounds=repeats, max_rounds=repeats)
    with method.apply(ctx.model) as pruned:
        flops = count_flops(pruned, ids).decoder
        memory = peak_memory_mb(pruned, ids)
        params = parameter_count(pruned)
    measured = 1.0 - flops / dense_flops
    base = {"task": "efficiency", "batch": b, "seq_len": n, "n": point.rounds,
            **ctx.match_columns(match, measured)}
    prefill, decode, control = point.prefill_speedup(), point.decode_speedup(), point.control()
    unstable = not (CONTROL_BAND[0] <= control[0] <= CONTROL_BAND[1] and control[1] <= 1.0 <= control[2])
    new_tokens = settings["decode_tokens"]
    pruned_prefill = float(np.median(point.prefill["pruned"]))
    rows = [
        {**base, "metric": "decoder_flops", "value": float(flops)},
        {**base, "metric": "dense_decoder_flops", "value": float(dense_flops)},
        {**base, "metric": "compute_sparsity", "value": measured},
        {**base, "metric": "prefill_ms", "value": pruned_prefill * 1000},
        {**base, "metric": "dense_prefill_ms", "value": float(np.median(point.prefill["dense"])) * 1000},
        {**base, "metric": "decode_tokens_per_s", "value": new_tokens / float(np.median(point.decode["pruned"]))},
        {**base, "metric": "peak_memory_mb", "value": memory},
        {**base, "metric": "params", "value": float(params)},
        {**base, "metric": "unstable", "value": float(unstable)},
    ]
    for name, (value, lo, hi) in (("prefill_speedup", prefill), ("decode_speedup", decode),
                                  ("control_speedup", control)):
        rows += [{**base, "metric": name, "value": value}, {**base, "metric": f"{name}_lo", "value": lo},
                 {**base, "metric": f"{name}_hi", "value": hi}]
    return rows
