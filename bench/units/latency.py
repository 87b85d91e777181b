"""The latency-sweep unit (`run --latency-sweep`): prefill and decode speedup over a batch × length grid, each
point its own rows with `batch` and `seq_len`, each speedup with a 95% CI from a bootstrap over interleaved rounds,
the dense-vs-dense control stored beside it, and `unstable` = 1 where the control strays from 1.00 or a CI stays
wider than ±3% at the cap (bench.timing.sweep_point)."""

from __future__ import annotations

from typing import Any

import torch

from bench.matching import Workload
from bench.units.context import LATENCY_SWEEP, CellContext
from methods import Method


def measure_latency_sweep(ctx: CellContext, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from bench.flops import count_flops
    from bench.timing import sweep_point
    from bench.wikitext import wikitext_windows

    rows = []
    for batch, seq_len in settings["grid"]:
        ids = wikitext_windows(ctx.tokenizer, seq_len, batch).to(ctx.device)
        dense_flops = count_flops(ctx.model, ids).decoder
        match = ctx.fit(method, [(batch, seq_len)])
        if method.knob(ctx.model.config) is not None:
            with method.apply(ctx.model) as pruned:  # the knob solved on this point's inputs stays set
                match = ctx.solve(method, pruned, Workload([(ids, torch.zeros_like(ids, dtype=torch.bool), {})]))
        point = sweep_point(ctx.model, lambda: method.apply(ctx.model), ids, settings["decode_tokens"],
                            min_rounds=settings["min_rounds"], max_rounds=settings["max_rounds"])
        with method.apply(ctx.model) as pruned:
            flops = count_flops(pruned, ids).decoder
        measured = 1.0 - flops / dense_flops
        base = {"task": LATENCY_SWEEP, "batch": batch, "seq_len": seq_len, "n": point.rounds,
                **ctx.match_columns(match, measured)}
        for name, (value, lo, hi) in (("prefill_speedup", point.prefill_speedup()),
                                      ("decode_speedup", point.decode_speedup()),
                                      ("control_speedup", point.control())):
            rows += [{**base, "metric": name, "value": value},
                     {**base, "metric": f"{name}_lo", "value": lo}, {**base, "metric": f"{name}_hi", "value": hi}]
        rows += [{**base, "metric": "compute_sparsity", "value": measured},
                 {**base, "metric": "dense_prefill_ms", "value": 1000 * float(torch.tensor(
                     point.prefill["dense"]).median())},
                 {**base, "metric": "unstable", "value": float(point.unstable())}]
    return rows
