"""`python -m bench perf --methods ...`: each method's scoring speed against its FLOPs, side by side with dense.

For every method, on the same lm-eval requests (the default study's tasks), in one process:

- time per item: `BenchLM.loglikelihood` seconds ÷ requests, relative to dense's (dense timed first and last; the
  second dense pass against the first is the run's own control, which should read 1.00);
- executed FLOPs relative to dense: what the method executed on those requests (counted as the harness counts a
  cell: FlopCounterMode, or a token method's own per-row account, checked against FlopCounterMode) ÷ what dense
  executed on them (after its prefix sharing);
- seconds per executed FLOP relative to dense: the ratio of the two. 1.0 means the method turns saved FLOPs into
  saved time as well as dense runs its own; the target printed beside it is ≤ 1.5×.

Timed passes run without FLOP counting; a second, untimed pass counts. Input-dependent methods solve their knob
on the requests first (labels-free, as in a study), and the solve's cost is printed apart (`solve_s`). The
machine's matmul throughput (`torch.mm` of the model's own shapes) and dense scoring's achieved share of it show
how far the engine is from the hardware's limit."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

TARGET = 1.5  # every method at most this many times dense's seconds per executed FLOP


@dataclass(frozen=True)
class MethodSpeed:
    method: str
    requests: int
    seconds: float
    executed_flops: int
    solve_s: float | None = None
    knob_value: float | None = None
    compute_sparsity: float | None = None


def matmul_flops_per_second(config, device: torch.device, dtype: torch.dtype, tokens: int = 256,
                            repeats: int = 5) -> float:
    """FLOP/s of plain `torch.mm` on the model's projection shapes ([tokens, hidden] × [hidden, out])."""
    shapes = [(config.hidden_size, config.hidden_size), (config.hidden_size, config.intermediate_size),
              (config.intermediate_size, config.hidden_size)]
    pairs = [(torch.randn(tokens, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
             for k, n in shapes]
    for a, b in pairs:  # warm-up
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for a, b in pairs:
            torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return sum(2 * tokens * k * n for k, n in shapes) / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _score(model, tokenizer, method, requests, batch_size: int, count: bool, dense_flops, progress: bool):
    """(seconds, executed FLOPs or 0) of scoring `requests` with `method` applied (its knob already set)."""
    from bench.evaluate import BenchLM

    with method.apply(model) as pruned:
        lm = BenchLM(pruned, tokenizer, batch_size=batch_size, sequence_dependent=method.sequence_dependent,
                     progress=progress, dense_flops=dense_flops if count else None,
                     method_flops=method.executed_flops)
        _sync(next(model.parameters()).device)
        start = time.perf_counter()
        lm.loglikelihood(requests, disable_tqdm=not progress)
        _sync(next(model.parameters()).device)
        return time.perf_counter() - start, lm.engine.flops.executed


def _solve(model, tokenizer, method, requests, batch_size: int, dense_flops) -> tuple[float | None, float | None]:
    """Solve an input-dependent method's knob on these requests' forwards, as the accuracy unit does."""
    from bench.evaluate import BenchLM
    from bench.matching import Workload, solve_knob

    if method.knob(model.config) is None:
        return None, None
    plan = BenchLM(model, tokenizer, batch_size=batch_size, sequence_dependent=method.sequence_dependent,
                   progress=False, plan_only=True)
    plan.loglikelihood(requests, disable_tqdm=True)
    with method.apply(model) as pruned:
        result = solve_knob(method, pruned, Workload([(f.input_ids, f.scored, f.kwargs) for f in plan.workload]),
                            dense_flops)
        value = method.knob_in_force(model.config)
    method.set_knob(value)  # kept for the scoring passes (apply() re-reads it)
    return result.seconds, value


def measure_methods(model, tokenizer, model_id: str, names: list[str], requests, batch_size: int = 16,
                    sparsity: float = 0.25, progress: bool = True) -> list[MethodSpeed]:
    """Dense, then every method, then dense again, on the same requests; artifacts from the cache (or the
    repository's committed ones), calibrated where neither has one."""
    from bench.artifacts import ensure_calibrated
    from bench.flops import analytic_decoder_flops
    from methods import make_method

    def dense_flops(batch: int, width: int) -> int:
        return analytic_decoder_flops(model.config, width, batch=batch)

    out = []
    order = ["dense", *[n for n in names if n != "dense"], "dense"]
    for name in order:
        method = make_method(name, sparsity=0.0 if name == "dense" else sparsity)
        ensure_calibrated(method, model, tokenizer, model_id)
        solve_s, knob = _solve(model, tokenizer, method, requests, batch_size, dense_flops)
        _, executed = _score(model, tokenizer, method, requests, batch_size, True, dense_flops, False)
        sparsity_measured = method.stats().get("compute_sparsity") if name != "dense" else 0.0
        seconds, _ = _score(model, tokenizer, method, requests, batch_size, False, dense_flops, progress)
        out.append(MethodSpeed(name, len(requests), seconds, executed, solve_s, knob, sparsity_measured))
    return out


def format_speeds(speeds: list[MethodSpeed], matmul_flops: float) -> str:
    """The table: per method, time per item and executed FLOPs vs dense, their ratio against the target."""
    import pandas as pd

    dense, control = speeds[0], speeds[-1]
    dense_rate = dense.seconds / dense.executed_flops
    rows = []
    for s in speeds[1:-1]:
        ratio = (s.seconds / s.executed_flops) / dense_rate
        rows.append({"method": s.method, "ms/item": f"{1000 * s.seconds / s.requests:.1f}",
                     "time vs dense": f"{s.seconds / dense.seconds:.2f}",
                     "FLOPs vs dense": f"{s.executed_flops / dense.executed_flops:.2f}",
                     "s/FLOP vs dense": f"{ratio:.2f}", f"≤ {TARGET}": "yes" if ratio <= TARGET else "NO",
                     "solve_s": "" if s.solve_s is None else f"{s.solve_s:.1f}",
                     "knob": "" if s.knob_value is None else f"{s.knob_value:.3g}"})
    achieved = dense.executed_flops / dense.seconds
    lines = [pd.DataFrame(rows).to_string(index=False) if rows else "(no method besides dense)",
             f"dense: {1000 * dense.seconds / dense.requests:.1f} ms/item, {dense.executed_flops / 1e9:.1f} GFLOP; "
             f"dense vs dense control {control.seconds / dense.seconds:.2f} (the run's own noise: should read 1.00)",
             f"torch.mm on the model's shapes: {matmul_flops / 1e9:.1f} GFLOP/s; dense scoring achieves "
             f"{achieved / 1e9:.1f} GFLOP/s = {achieved / matmul_flops:.0%} of it"]
    return "\n".join(lines)


def run_method_perf(model_name: str, names: list[str], task_names: list[str], limit: int, batch_size: int,
                    threads: int, device: str = "cpu", dtype: str = "float32", progress: bool = True) -> int:
    from bench.engine_perf import build_requests
    from bench.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    _, requests = build_requests(task_names, limit)
    dev = next(model.parameters()).device
    speeds = measure_methods(model, tokenizer, model_name, names, requests, batch_size, progress=progress)
    matmul = matmul_flops_per_second(model.config, dev, model.dtype)
    print(f"[perf] model={model_name} device={dev} dtype={model.dtype} tasks={','.join(task_names)} "
          f"limit={limit} ({len(requests)} requests) batch={batch_size} threads={torch.get_num_threads()}")
    print(format_speeds(speeds, matmul))
    worst = max(((s.seconds / s.executed_flops) / (speeds[0].seconds / speeds[0].executed_flops)
                 for s in speeds[1:-1]), default=0.0)
    print(f"worst_seconds_per_flop_vs_dense={worst:.2f}")
    return 0
