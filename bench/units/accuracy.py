"""The accuracy unit of a cell."""

from __future__ import annotations

from typing import Any

from bench.console import library_output_to
from bench.matching import MatchResult, Workload
from bench.units.context import CellContext, fits_lengths
from methods import Method


def measure_accuracy(ctx: CellContext, method: Method, task: str, settings: dict[str, Any]):
    """Accuracy, and compute sparsity counted with FlopCounterMode on every forward exactly as it was scored
    (same batches, padding and protected positions)."""
    from lm_eval.evaluator import evaluate

    from bench.evaluate import BenchLM
    from bench.tasks import TASKS, build_task_dict

    match = MatchResult(target=method.sparsity)
    if fits_lengths(method):
        pooled = [s for t in ctx.tasks for s in ctx.task_shapes(t, method.sequence_dependent)]
        match = ctx.fit(method, pooled)
    task_dict = build_task_dict([task], settings["limit"])
    with method.apply(ctx.model) as pruned:
        def on_workload(forwards) -> None:
            nonlocal match
            if method.knob(ctx.model.config) is not None:
                match = ctx.solve(method, pruned, Workload([(f.input_ids, f.scored, f.kwargs)
                                                             for f in forwards]))

        lm = BenchLM(pruned, ctx.tokenizer, batch_size=ctx.batch_size,
                     sequence_dependent=method.sequence_dependent, progress=ctx.progress,
                     dense_flops=ctx.dense_flops, method_flops=method.executed_flops, on_workload=on_workload)
        with library_output_to(ctx.log):
            out = evaluate(lm=lm, task_dict=task_dict, limit=settings["limit"], log_samples=True,
                           bootstrap_iters=1000, verbosity="ERROR")
    tally = lm.engine.flops
    base = {"task": task, "limit": settings["limit"], **ctx.match_columns(match, tally.sparsity)}
    result = out["results"][task]
    n_items = len(out["samples"][task])
    rows = []
    for metric in TASKS[task].metrics:
        if f"{metric},none" not in result:
            continue
        stderr = result.get(f"{metric}_stderr,none")
        rows.append({**base, "metric": metric, "value": float(result[f"{metric},none"]),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n_items})
    # what the compute sparsity covers: every request scored (n), their tokens, the FLOP sums
    rows += [{**base, "metric": "compute_sparsity", "value": tally.sparsity, "n": tally.items},
             {**base, "metric": "scored_tokens", "value": float(tally.tokens), "n": tally.items},
             {**base, "metric": "decoder_flops", "value": float(tally.executed), "n": tally.items},
             {**base, "metric": "dense_decoder_flops", "value": float(tally.dense), "n": tally.items}]
    samples = [{"doc_id": s["doc_id"], **{m: float(s[m]) for m in TASKS[task].metrics if m in s},
                "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
               for s in out["samples"][task]]
    return rows, samples
