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


def decode(model, input_ids: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    """Greedy decoding of `new_tokens` after a (untimed) prefill; returns the timed part as a closure."""
    with torch.inference_mode():
        out = prefill(model, input_ids)
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
            if is_pruned:
                with pruned() as m:
                    p = timer(lambda m=m: prefill(m, input_ids))
                    d = timer(decode(m, input_ids, new_tokens))
            else:
                p = timer(lambda: prefill(model, input_ids))
                d = timer(decode(model, input_ids, new_tokens))
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
