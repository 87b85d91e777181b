"""The efficiency unit of a cell."""

from __future__ import annotations

from typing import Any

import torch

from bench.matching import Workload
from bench.units.context import CellContext
from methods import Method


def measure_efficiency(ctx: CellContext, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from bench.efficiency import interleaved_latency, parameter_count, peak_memory_mb
    from bench.flops import count_flops
    from bench.perplexity import wikitext_windows

    n, b = settings["seq_len"], settings["batch"]
    ids = wikitext_windows(ctx.tokenizer, n, b).to(ctx.device)
    dense_flops = count_flops(ctx.model, ids).decoder
    match = ctx.fit(method, [(b, n)])
    if method.knob(ctx.model.config) is not None:
        with method.apply(ctx.model) as pruned:  # the solved knob stays set for the timed apply()s below
            match = ctx.solve(method, pruned, Workload([(ids, torch.zeros_like(ids, dtype=torch.bool), {})]))
    dense_lat, pruned_lat = interleaved_latency(ctx.model, lambda: method.apply(ctx.model), ids,
                                                repeats=settings["repeats"], new_tokens=settings["decode_tokens"])
    with method.apply(ctx.model) as pruned:
        flops = count_flops(pruned, ids).decoder
        memory = peak_memory_mb(pruned, ids)
        params = parameter_count(pruned)
    measured = 1.0 - flops / dense_flops
    base = {"task": "efficiency", "batch": b, "seq_len": n, "n": settings["repeats"],
            **ctx.match_columns(match, measured)}
    spread = pruned_lat.prefill_spread * pruned_lat.prefill_median * 1000
    return [
        {**base, "metric": "decoder_flops", "value": float(flops)},
        {**base, "metric": "dense_decoder_flops", "value": float(dense_flops)},
        {**base, "metric": "compute_sparsity", "value": measured},
        {**base, "metric": "prefill_ms", "value": pruned_lat.prefill_median * 1000, "stderr": spread},
        {**base, "metric": "dense_prefill_ms", "value": dense_lat.prefill_median * 1000},
        {**base, "metric": "prefill_speedup", "value": dense_lat.prefill_median / pruned_lat.prefill_median},
        {**base, "metric": "decode_tokens_per_s", "value": pruned_lat.decode_median},
        {**base, "metric": "decode_speedup", "value": pruned_lat.decode_median / dense_lat.decode_median},
        {**base, "metric": "peak_memory_mb", "value": memory},
        {**base, "metric": "params", "value": float(params)},
    ]
