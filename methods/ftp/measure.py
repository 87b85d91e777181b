"""What FTP's calibration measures on held-out calibration text with a routed model: compute sparsity, LM loss and
how often the first token is computed, and the schedule scale that puts compute sparsity on a target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from methods.ftp.block import RoutingController
from methods.ftp.schedule import scaled_schedule


def routing_summary(ctl: RoutingController) -> dict[str, Any]:
    """Per-block computed fractions, token and compute sparsity of the prefill forwards, the fraction of routed
    (block, row) pairs that computed the row's first token; decoding separately."""
    st = ctl.stats
    per_block = [c / t if t else 1.0 for c, t in zip(st.prefill_computed, st.prefill_tokens, strict=True)]
    tokens = sum(st.prefill_tokens)
    executed = st.executed_flops + st.router_flops
    routed = [i for i in range(ctl.num_layers) if ctl.policy.routed(i)]
    first_rows = sum(st.rows[i] for i in routed)
    summary: dict[str, Any] = {
        "per_block_computed_fraction": per_block,
        "token_sparsity": 1.0 - sum(st.prefill_computed) / tokens if tokens else 0.0,
        "compute_sparsity": 1.0 - executed / st.dense_flops if st.dense_flops else 0.0,
        "first_token_computed_fraction": (sum(st.first_computed[i] for i in routed) / first_rows
                                          if first_rows else 1.0),
        "executed_flops": executed, "dense_flops": st.dense_flops, "router_flops": st.router_flops,
        "forwards": st.forwards, "decode_steps": st.decode_steps,
    }
    if st.decode_steps:
        decode = [c / st.decode_steps for c in st.decode_computed]
        summary["decode_per_block_computed_fraction"] = decode
        summary["decode_token_sparsity"] = 1.0 - sum(decode) / len(decode)
    return summary


def measure_routing(model, ctl: RoutingController, windows: torch.Tensor, with_loss: bool = False) -> dict[str, Any]:
    """Route `windows` one row at a time (as the evaluator does) and return the routing summary, with the mean
    next-token cross-entropy over every position as "lm_loss" when asked."""
    ctl.reset_stats()
    losses = []
    with torch.inference_mode():
        for row in windows:
            if with_loss:
                logits = model(input_ids=row[None], use_cache=False).logits[0, :-1]
                losses.append(F.cross_entropy(logits.float(), row[1:], reduction="sum"))
            else:
                model.model(input_ids=row[None], use_cache=False)
    summary = routing_summary(ctl)
    if with_loss:
        summary["lm_loss"] = float(torch.stack(losses).sum()) / (windows.shape[0] * (windows.shape[1] - 1))
    ctl.reset_stats()
    return summary


@dataclass
class ScaleFit:
    """The schedule scale whose measured compute sparsity came closest to the target, and every try."""

    scale: float = 1.0
    measured: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def error(self, target: float) -> float:
        return self.measured["compute_sparsity"] - target if self.measured else math.inf


def solve_scale(model, ctl: RoutingController, schedule, windows: torch.Tensor, target: float, tolerance: float,
                iterations: int, max_sparsity: float, with_loss: bool = False,
                on_try: Callable[[float, dict], None] | None = None) -> ScaleFit:
    """Scale the schedule until compute sparsity measured on `windows` is within `tolerance` of `target`:
    regula falsi (Illinois) on c(scale) - target, from scale 1, bracketed by scale 0 (no routed block: c = 0) and
    the scale that puts every block at `max_sparsity`. Leaves `ctl` on the best scale found."""
    fit = ScaleFit()
    saturated = max_sparsity / min(s for s in schedule if s > 0)

    def gap_at(scale: float) -> float:
        ctl.with_schedule(scaled_schedule(schedule, scale, max_sparsity))
        measured = measure_routing(model, ctl, windows, with_loss)
        fit.history.append({"scale": scale, "compute_sparsity": measured["compute_sparsity"],
                            **({"lm_loss": measured["lm_loss"]} if with_loss else {})})
        if abs(measured["compute_sparsity"] - target) < abs(fit.error(target)):
            fit.scale, fit.measured = scale, measured
        if on_try is not None:
            on_try(scale, measured)
        return measured["compute_sparsity"] - target

    low, f_low = 0.0, -target
    high, f_high = None, None
    scale, side = 1.0, 0
    for _ in range(iterations):
        gap = gap_at(scale)
        if abs(gap) <= tolerance:
            break
        if gap < 0:
            low, f_low = scale, gap
            if high is None:
                if scale >= saturated:
                    break
                scale = min(saturated, 2.0 * scale)
                continue
            if side == -1:
                f_high /= 2
            side = -1
        else:
            high, f_high = scale, gap
            if side == 1:
                f_low /= 2
            side = 1
        scale = high - f_high * (high - low) / (f_high - f_low)
    ctl.with_schedule(scaled_schedule(schedule, fit.scale, max_sparsity))
    return fit


def loss_at_target(model, ctl: RoutingController, schedule, windows: torch.Tensor, target: float, fit: ScaleFit,
                   max_sparsity: float, step: float = 0.02) -> float:
    """LM loss at compute sparsity exactly `target`: linear in c between the nearest tries of `fit` (a
    `solve_scale(..., with_loss=True)`) below and above the target, one scale step of `step` (relative) at a time
    measured past the best try when none lies on a side. Comparing candidate routers at their own solved c instead
    lets one that lands low win: near c = 0.25 a unit of c is worth ~10 nats, so ±0.002 moves the loss ±0.02.
    Leaves `ctl` on `fit.scale`."""
    tries = [(h["compute_sparsity"], h["lm_loss"]) for h in fit.history]
    saturated = max_sparsity / min(s for s in schedule if s > 0)
    for direction in (1, -1):  # +1: a try at c >= target is needed; -1: one at c <= target
        scale = fit.scale
        while not any((c - target) * direction >= 0 for c, _ in tries):
            scale = min(saturated, scale * (1 + direction * step))
            ctl.with_schedule(scaled_schedule(schedule, scale, max_sparsity))
            measured = measure_routing(model, ctl, windows, with_loss=True)
            tries.append((measured["compute_sparsity"], measured["lm_loss"]))
            fit.history.append({"scale": scale, "compute_sparsity": measured["compute_sparsity"],
                                "lm_loss": measured["lm_loss"]})
            if scale >= saturated or scale <= 0:
                break
    ctl.with_schedule(scaled_schedule(schedule, fit.scale, max_sparsity))
    below = [t for t in tries if t[0] <= target]
    above = [t for t in tries if t[0] >= target]
    if not below or not above:  # saturated: the nearest try
        return min(tries, key=lambda t: abs(t[0] - target))[1]
    (c_low, loss_low), (c_high, loss_high) = max(below), min(above)
    if c_high == c_low:
        return (loss_low + loss_high) / 2
    return loss_low + (loss_high - loss_low) * (target - c_low) / (c_high - c_low)

