"""Latency and memory probes. Dense and pruned are timed interleaved in one process (dense, pruned, pruned,
dense, ...) so their ratio is stable on a noisy machine. GPU: CUDA events after warm-up with explicit syncs; CPU:
perf_counter with the thread count pinned and recorded."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class Timer:
    """Wall time of one call: CUDA events (with a sync) on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def prefill(model, input_ids: torch.Tensor):
    """Time-to-first-token work: the prompt forward with a KV cache, logits for the last position only."""
    with torch.inference_mode():
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=1)


def decode(model, input_ids: torch.Tensor, new_tokens: int, prefilled=None) -> Callable[[], object]:
    """Greedy decoding of `new_tokens` after a prefill (`prefilled`: the output of one already run on
    `input_ids`, else an untimed one here); returns the timed part as a closure."""
    with torch.inference_mode():
        out = prefill(model, input_ids) if prefilled is None else prefilled
    state = {"cache": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}

    def run() -> None:
        cache, token = state["cache"], state["next"]
        with torch.inference_mode():
            for _ in range(new_tokens):
                step = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

    return run


@dataclass(frozen=True)
class LatencyResult:
    prefill_s: list[float]
    decode_tokens_per_s: list[float]

    @property
    def prefill_median(self) -> float:
        return statistics.median(self.prefill_s)

    @property
    def prefill_spread(self) -> float:
        """Inter-quartile range relative to the median."""
        if len(self.prefill_s) < 4:
            return (max(self.prefill_s) - min(self.prefill_s)) / self.prefill_median
        q = statistics.quantiles(self.prefill_s, n=4)
        return (q[2] - q[0]) / self.prefill_median

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tokens_per_s)


def _time_one(model, pruned: Callable[[], AbstractContextManager], use_pruned: bool, timer: Timer,
              input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of the dense model, or of the pruned one inside its apply(); the decode
    continues from the timed prefill's cache."""

    def run(m) -> tuple[float, float]:
        held = {}
        seconds = timer(lambda: held.setdefault("out", prefill(m, input_ids)))
        return seconds, timer(decode(m, input_ids, new_tokens, prefilled=held.get("out")))

    if use_pruned:
        with pruned() as m:
            return run(m)
    return run(model)


def interleaved_latency(model, pruned: Callable[[], AbstractContextManager], input_ids: torch.Tensor,
                        repeats: int = 5, warmup: int = 1, new_tokens: int = 16) -> tuple[LatencyResult, LatencyResult]:
    """(dense, pruned) prefill seconds and decode tokens/s, alternating dense and pruned in ABBA order (dense
    first on even repeats, pruned first on odd ones), so whatever the slot right after the other model's decode
    costs falls on both equally."""
    device = input_ids.device
    timer = Timer(device)
    dense_p, dense_d, pruned_p, pruned_d = [], [], [], []
    for rep in range(warmup + repeats):
        for is_pruned in ((False, True) if rep % 2 == 0 else (True, False)):
            p, d = _time_one(model, pruned, is_pruned, timer, input_ids, new_tokens)
            if rep >= warmup:
                (pruned_p if is_pruned else dense_p).append(p)
                (pruned_d if is_pruned else dense_d).append(new_tokens * input_ids.shape[0] / d)
    return LatencyResult(dense_p, dense_d), LatencyResult(pruned_p, pruned_d)


def peak_memory_mb(model, input_ids: torch.Tensor) -> float:
    """Peak memory of one prefill: CUDA max allocated on GPU; on CPU the process's peak RSS (VmHWM) after
    resetting it, which includes the weights and the interpreter."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        prefill(model, input_ids)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")  # resets the peak-RSS high-water mark (Linux >= 4.0)
    except OSError:
        pass
    prefill(model, input_ids)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parameter_count(model) -> int:
    """Parameters reachable from the (pruned) model; tied weights counted once."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    return int(sum(seen.values()))


# --- the latency sweep: speedups with confidence intervals that survive a noisy machine --------------------------
# short points at two batch sizes, then long prompts at batch 1 (where a token method's prefill saving grows with N)
CPU_GRID = (*((b, n) for b in (1, 4) for n in (128, 512, 1024)), (1, 2048), (1, 4096))
GPU_GRID = (*((b, n) for b in (1, 4, 16) for n in (512, 2048, 4096)), (1, 8192), (1, 16384), (1, 32768))
HALF_WIDTH = 0.03  # repeats grow until every speedup's 95% CI is within ±3% of it, or the cap is reached


def speedup_ci(baseline: np.ndarray, other: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, ...]:
    """median(baseline) / median(other) for per-round timings of the same rounds, and its 95% CI by a bootstrap
    over rounds (a round's two timings are resampled together: they share the machine's state at that moment)."""
    baseline, other = np.asarray(baseline, float), np.asarray(other, float)
    value = float(np.median(baseline) / np.median(other))
    idx = np.random.default_rng(seed).integers(0, len(baseline), size=(samples, len(baseline)))
    boot = np.median(baseline[idx], axis=1) / np.median(other[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return value, float(lo), float(hi)


def relative_half_width(ci: tuple[float, ...]) -> float:
    value, lo, hi = ci
    return (hi - lo) / 2 / value


@dataclass(frozen=True)
class SweepPoint:
    """One (batch, length) point: prefill seconds and decode seconds per round, for dense, pruned and a second
    dense run (the control: dense against itself, which must read 1.00)."""

    prefill: dict[str, list[float]]
    decode: dict[str, list[float]]

    @property
    def rounds(self) -> int:
        return len(self.prefill["dense"])

    def prefill_speedup(self) -> tuple[float, ...]:
        return speedup_ci(self.prefill["dense"], self.prefill["pruned"])

    def decode_speedup(self) -> tuple[float, ...]:
        return speedup_ci(self.decode["dense"], self.decode["pruned"])

    def control(self) -> tuple[float, ...]:
        return speedup_ci(self.prefill["dense"], self.prefill["control"])

    def unstable(self) -> bool:
        """The control's CI misses 1.00 (dense read faster or slower than itself: the machine drifted), or a CI
        is still wider than ±HALF_WIDTH at the cap."""
        _, lo, hi = self.control()
        wide = max(relative_half_width(ci) for ci in (self.prefill_speedup(), self.decode_speedup(), self.control()))
        return not lo <= 1.0 <= hi or wide > HALF_WIDTH


def sweep_point(model, pruned: Callable[[], AbstractContextManager], input_ids: torch.Tensor, new_tokens: int,
                min_rounds: int = 5, max_rounds: int = 30, step: int = 5, warmup: int = 1) -> SweepPoint:
    """Rounds of dense, pruned and the dense control, in an order that rotates every round (so no slot favours
    one of them), until every speedup's CI is within ±HALF_WIDTH (checked after `min_rounds`, then every `step`
    rounds) or `max_rounds` is reached."""
    timer = Timer(input_ids.device)
    prefill_s: dict[str, list[float]] = {"dense": [], "pruned": [], "control": []}
    decode_s: dict[str, list[float]] = {"dense": [], "pruned": [], "control": []}
    kinds = ("dense", "pruned", "control")
    rnd = 0
    while True:
        for kind in kinds[rnd % 3:] + kinds[:rnd % 3]:
            p, d = _time_one(model, pruned, kind == "pruned", timer, input_ids, new_tokens)
            if rnd >= warmup:
                prefill_s[kind].append(p)
                decode_s[kind].append(d)
        rnd += 1
        done = rnd - warmup
        if done >= max_rounds or (done >= min_rounds and (done - min_rounds) % step == 0 and not SweepPoint(
                prefill_s, decode_s).unstable()):
            return SweepPoint(prefill_s, decode_s)
