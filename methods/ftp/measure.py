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
