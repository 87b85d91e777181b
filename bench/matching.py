"""The matching protocol: every comparison at equal compute on the inputs actually scored.

One rule per kind of method (docs/matching.md):

- Input-dependent methods (token routing and dropping: FTP and its variants, SDTP) expose a `Knob`. Before a unit is
  scored, the knob is solved on that unit's own forwards (exactly as they will be evaluated; inputs only, never
  labels) so that c = 1 − F_exec / F_dense counted with FlopCounterMode lands within `SOLVE_TOLERANCE` of the target.
- Static methods keep one pruned model per workload: ShortGPT and random layers remove n/L of the compute on any
  input; BlockPruner picks its prefix from the compute shares of the study's real (batch, width) forwards
  (`Method.fit_lengths`), pooled over every task of the study, the WikiText-2 windows, or the latency probe.

The cell then records c measured while it was scored, and `matched` = |c − target| ≤ `MATCH_TOLERANCE`. A target
that cannot be reached on a unit's inputs (SDTP's protected tokens covering most of a short item) is recorded with
`matched = False`, the reachable value and the reason; summaries leave such cells out."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.defaults import MATCH_TOLERANCE
from bench.flops import RowFlops, padded_lengths
from methods.base import Method, scoring

SOLVE_TOLERANCE = 0.005  # what the knob solve aims for (inside the matching band: the scored c may differ slightly)
MAX_SOLVE_STEPS = 12
# A knob measured by running the model (argmax routing) is solved on an evenly spread subset of the unit's forwards
# of about this many tokens; the cell's c is then counted on all of them while scoring.
SOLVE_TOKENS = 2048
PROTOCOL = "matched-on-scored-inputs-v1"  # part of every cell's identity: cells of another protocol are recomputed


@dataclass(frozen=True)
class Workload:
    """What a unit runs: (input_ids [B, W], scored [B, W] bool or None, extra model kwargs) per forward."""

    forwards: Sequence[tuple[torch.Tensor, torch.Tensor | None, dict]]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(int(ids.shape[0]), int(ids.shape[1])) for ids, _, _ in self.forwards]

    def subsample(self, max_tokens: int) -> Workload:
        """Evenly spread forwards (the engine sorts them by length) holding about `max_tokens` input tokens."""
        tokens = [int(ids.numel()) for ids, _, _ in self.forwards]
        if sum(tokens) <= max_tokens:
            return self
        share = max_tokens / sum(tokens)
        step = max(1, round(1 / share))
        forwards = list(self.forwards)
        # a few forwards each longer than the budget (10 prompts of 8K) would leave none: keep the middle one
        return Workload(forwards[step // 2::step] or [forwards[len(forwards) // 2]])


@dataclass
class MatchResult:
    target: float
    knob: str | None = None
    value: float | None = None
    solved_sparsity: float | None = None  # c at the chosen knob on the workload (None: not solved by measurement)
    steps: int = 0
    reason: str = ""  # why a target could not be reached (empty when it could)
    seconds: float | None = None  # what the solve cost (None: no knob solved)


def is_matched(measured: float | None, target: float) -> bool:
    return measured is not None and abs(measured - target) <= MATCH_TOLERANCE + 1e-12


def workload_sparsity(model, workload: Workload, dense_flops: Callable[[int, int], int],
                      method: Method | None = None) -> float:
    """c of the (pruned) model over every forward of the workload, counted as the engine counts it
    (`bench.flops.RowFlops`)."""
    executed = dense = 0
    device = next(model.parameters()).device
    counter = RowFlops(dense_flops, None if method is None else method.executed_flops)
    with torch.inference_mode():
        for ids, scored, kwargs in workload.forwards:
            call = {k: v.to(device) for k, v in kwargs.items()}
            with scoring(scored.to(device)) if scored is not None else nullcontext():
                _, flops, dense_part = counter.forward(model, input_ids=ids.to(device), use_cache=False,
                                                       logits_to_keep=1, **call)
            executed += flops
            dense += dense_part
    return 1.0 - executed / dense


def analytic_sparsity(method: Method, config, workload: Workload, dense_flops: Callable[[int, int], int]) -> float:
    """c from `Method.row_flops` (methods whose FLOPs follow from each row's shape and scored span), each row at
    its own length (a padded batch's rows as they are alone)."""
    executed = dense = 0
    for ids, scored, kwargs in workload.forwards:
        lengths = padded_lengths(kwargs) or [int(ids.shape[1])] * int(ids.shape[0])
        for row, n in enumerate(lengths):
            executed += method.row_flops(config, n, None if scored is None else scored[row, :n].cpu())
            dense += dense_flops(1, n)
    return 1.0 - executed / dense


def solve_knob(method: Method, model, workload: Workload, dense_flops: Callable[[int, int], int],
               tolerance: float = SOLVE_TOLERANCE, max_steps: int = MAX_SOLVE_STEPS) -> MatchResult:
    """Set the method's knob (inside its live apply()) so that c on `workload` is as close to the target as the
    knob allows. c is taken as monotone in the knob: a secant step through the two latest points (the knob's
    `dense_at`, where c = 0 by construction, counts as a point without a forward), kept inside the bracket the
    points so far give (regula falsi, then bisection, when it strays), and extrapolated towards the bound while
    the target is not yet bracketed. The closest value seen is kept. Methods with `row_flops` are solved by
    arithmetic on every row; the others by counted forwards over an evenly spread subset of the workload."""
    target = method.sparsity
    config = model.config
    knob = method.knob(config)
    result = MatchResult(target=target)
    if knob is None:
        return result
    result.knob = knob.name
    start_time = time.perf_counter()
    seen: dict[float, float] = {}
    first = workload.forwards[0]
    exact = method.row_flops(config, int(first[0].shape[1]), None if first[1] is None else first[1][0]) is not None
    sample = workload if exact else workload.subsample(SOLVE_TOKENS)
    steps_allowed = 4 * max_steps if exact else max_steps  # arithmetic steps cost next to nothing
    points: list[tuple[float, float]] = [] if knob.dense_at is None else [(knob.dense_at, 0.0)]

    def measure(value: float) -> None:
        method.set_knob(value)
        seen[value] = analytic_sparsity(method, config, sample, dense_flops) if exact \
            else workload_sparsity(model, sample, dense_flops, method)
        points.append((value, seen[value]))
        result.steps += 1

    def gap(c: float) -> float:  # > 0: the value is too small (too little sparsity for an increasing knob)
        return (target - c) if knob.increasing else (c - target)

    measure(min(max(knob.value, knob.low), knob.high))
    while result.steps < steps_allowed and min(abs(c - target) for c in seen.values()) > tolerance:
        below = [v for v, c in points if gap(c) > 0]
        above = [v for v, c in points if gap(c) < 0]
        lo, hi = (max(below) if below else None), (min(above) if above else None)
        (v1, c1), (v2, c2) = points[-2] if len(points) > 1 else points[-1], points[-1]
        x = v2 - gap(c2) * (v2 - v1) / (gap(c2) - gap(c1)) if gap(c1) != gap(c2) else None
        if lo is not None and hi is not None:
            if x is None or not lo < x < hi:  # regula falsi on the bracket, kept off its ends, else bisection
                g_lo, g_hi = gap(seen.get(lo, 0.0)), gap(seen.get(hi, 0.0))
                x = lo + (hi - lo) * g_lo / (g_lo - g_hi)
                x = x if lo + 0.05 * (hi - lo) < x < hi - 0.05 * (hi - lo) else (lo + hi) / 2
        else:  # not bracketed yet: towards the bound on the side the target lies
            bound = knob.high if hi is None else knob.low
            if bound in seen:
                result.reason = (f"target {target:g} out of reach on these inputs: {knob.name} at its bound "
                                 f"{bound:g} gives c = {seen[bound]:.4f}")
                break
            toward = x is not None and (x > lo if hi is None else x < hi)
            x = (min(x, bound) if hi is None else max(x, bound)) if toward else bound
        measure(x)
    best = min(seen, key=lambda v: (abs(seen[v] - target), v))
    method.set_knob(best)
    result.value, result.solved_sparsity = float(best), seen[best]
    result.seconds = time.perf_counter() - start_time
    return result
