"""`python -m bench perf`: the scoring engine's speed, as ratios measured side by side in one process.

- throughput_vs_forward: request tokens per second of a full lm-eval `evaluate()` through `BenchLM` ÷ the same
  of a plain `model(input_ids)` loop over the very same request sequences (length-sorted, right-padded batches
  of `batch_size`, as stock lm-eval forms them). >1 means prefix sharing saves more than the harness costs.
- speedup_vs_hflm: stock `HFLM.loglikelihood` seconds ÷ `BenchLM.loglikelihood` seconds on the same requests;
  the scores are checked equal (allclose log-likelihoods, identical greedy flags) in the same run.

The last line is `throughput_vs_forward=X.XX speedup_vs_hflm=Y.YY` for scripts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_PERF_TASKS = ["piqa", "arc_easy", "hellaswag", "winogrande", "boolq"]


@dataclass(frozen=True)
class PerfResult:
    requests: int
    request_tokens: int
    computed_tokens: int
    forward_s: float
    evaluate_s: float
    ours_s: float
    hflm_s: float
    max_abs_diff: float
    greedy_equal: bool
    threads: int

    @property
    def throughput_vs_forward(self) -> float:
        return self.forward_s / self.evaluate_s

    @property
    def speedup_vs_hflm(self) -> float:
        return self.hflm_s / self.ours_s


def build_requests(task_names: list[str], limit: int) -> tuple[dict, list]:
    from bench.tasks import build_task_dict

    task_dict = build_task_dict(task_names, limit)
    requests = []
    for task in task_dict.values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests.extend(task.instances)
    return task_dict, requests


def plain_forward_seconds(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> float:
    """A bare `model(input_ids)` loop: longest first, right-padded batches, no scoring, no harness."""
    order = sorted(sequences, key=len, reverse=True)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            ids = torch.full((len(chunk), len(chunk[0])), pad_id, dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
            model(input_ids=ids.to(model.device))
    return time.perf_counter() - start


def measure(model, tokenizer, task_names: list[str], limit: int, batch_size: int = 16,
            progress: bool = True) -> PerfResult:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from bench.evaluate import BenchLM

    task_dict, requests = build_requests(task_names, limit)
    ours = BenchLM(model, tokenizer, batch_size=batch_size, progress=progress)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # the request sequences exactly as stock scoring runs them (also warms up the kernels)
    encoded = [stock._encode_pair(*r.args) for r in requests]
    sequences = [ours._prepare(ctx, cont).input_ids for ctx, cont in encoded]
    pad_id = tokenizer.pad_token_id or 0
    plain_forward_seconds(model, sequences[:batch_size], batch_size, pad_id)

    forward_s = plain_forward_seconds(model, sequences, batch_size, pad_id)
    start = time.perf_counter()
    evaluate(lm=ours, task_dict=task_dict, limit=limit, bootstrap_iters=0, verbosity="ERROR")
    evaluate_s = time.perf_counter() - start
    engine = ours.engine

    timed = BenchLM(model, tokenizer, batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    ours_scores = timed.loglikelihood(requests)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    stock_scores = stock.loglikelihood(requests, disable_tqdm=not progress)
    hflm_s = time.perf_counter() - start

    a = np.array([s[0] for s in ours_scores])
    b = np.array([s[0] for s in stock_scores])
    return PerfResult(requests=len(requests), request_tokens=engine.tokens, computed_tokens=engine.computed_tokens,
                      forward_s=forward_s, evaluate_s=evaluate_s, ours_s=ours_s, hflm_s=hflm_s,
                      max_abs_diff=float(np.abs(a - b).max()),
                      greedy_equal=[s[1] for s in ours_scores] == [s[1] for s in stock_scores],
                      threads=torch.get_num_threads())


def run_perf(model_name: str, task_names: list[str] | None, limit: int, batch_size: int, threads: int,
             progress: bool = True) -> int:
    from bench.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, device="cpu", dtype="float32")
    tasks = task_names or DEFAULT_PERF_TASKS
    r = measure(model, tokenizer, tasks, limit, batch_size, progress)
    print(f"[perf] model={model_name} tasks={','.join(tasks)} limit={limit} batch={batch_size} threads={r.threads}")
    print(f"[perf] {r.requests} requests, {r.request_tokens} request tokens, {r.computed_tokens} computed after "
          f"prefix sharing ({r.computed_tokens / r.request_tokens:.2f})")
    print(f"[perf] plain model(input_ids) loop {r.forward_s:.1f}s ({r.request_tokens / r.forward_s:.0f} tok/s); "
          f"lm-eval evaluate() via BenchLM {r.evaluate_s:.1f}s ({r.request_tokens / r.evaluate_s:.0f} tok/s, "
          f"{r.requests / r.evaluate_s:.1f} req/s)")
    print(f"[perf] loglikelihood: BenchLM {r.ours_s:.1f}s ({r.requests / r.ours_s:.1f} req/s), stock HFLM "
          f"{r.hflm_s:.1f}s ({r.requests / r.hflm_s:.1f} req/s); max |Δ logprob| {r.max_abs_diff:.2e}, "
          f"greedy flags {'equal' if r.greedy_equal else 'DIFFER'}")
    print(f"throughput_vs_forward={r.throughput_vs_forward:.2f} speedup_vs_hflm={r.speedup_vs_hflm:.2f}")
    return 0 if r.greedy_equal and r.max_abs_diff < 1e-3 else 1
