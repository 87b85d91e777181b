"""The measurements a cell holds, as functions of (context, method, settings): `measure_accuracy` (one lm-eval
task), `measure_perplexity` (WikiText-2), `measure_efficiency` (FLOPs, latency, memory) and `measure_determinism`
(dense scored twice on one task, compared exactly) and `measure_latency_sweep` (bench.units.latency). `measure` dispatches on the unit's name."""

from __future__ import annotations

from typing import Any

from bench.units.accuracy import measure_accuracy
from bench.units.context import DETERMINISM, LATENCY_SWEEP, CellContext, fits_lengths
from bench.units.efficiency import measure_efficiency
from bench.units.latency import measure_latency_sweep
from bench.units.perplexity import measure_perplexity
from methods import Method


def measure_determinism(ctx: CellContext, method: Method, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Score `settings["task"]` twice and compare every per-item log-likelihood exactly (the gate's check that the
    scoring engine is deterministic on this machine)."""
    task = settings["task"]
    _, first = measure_accuracy(ctx, method, task, settings)
    _, again = measure_accuracy(ctx, method, task, settings)
    a = [s["loglikelihoods"] for s in sorted(first, key=lambda s: s["doc_id"])]
    b = [s["loglikelihoods"] for s in sorted(again, key=lambda s: s["doc_id"])]
    return [{"task": DETERMINISM, "metric": f"identical:{task}", "value": float(a == b), "n": len(a),
             "limit": settings["limit"]}]


def measure(ctx: CellContext, method: Method, unit: str, settings: dict[str, Any]):
    """(rows, per-item samples or None) of one unit."""
    if unit == "wikitext2":
        return measure_perplexity(ctx, method, settings), None
    if unit == "efficiency":
        return measure_efficiency(ctx, method, settings), None
    if unit == DETERMINISM:
        return measure_determinism(ctx, method, settings), None
    if unit == LATENCY_SWEEP:
        return measure_latency_sweep(ctx, method, settings), None
    return measure_accuracy(ctx, method, unit, settings)


__all__ = ["CellContext", "DETERMINISM", "LATENCY_SWEEP", "fits_lengths", "measure", "measure_determinism"]
