"""The accuracy unit of a cell."""

from __future__ import annotations

from typing import Any

from bench.console import library_output_to
from bench.matching import MatchResult, Workload
from bench.units.context import CellContext, fits_lengths
from methods import Method


def fit_pool(task: str, tasks: list[str]) -> list[str]:
    """The tasks whose forwards a length-fitted static method (BlockPruner) is fitted on for `task`'s cell: every
    multiple-choice task of the study, pooled; a generation task (one prompt length of niah_single_1) on its own,
    since c on its long prefills is what is matched there (docs/matching.md)."""
    from bench.tasks import GENERATION_TASKS

    if task in GENERATION_TASKS:
        return [task]
    return [t for t in tasks if t not in GENERATION_TASKS]


def measure_accuracy(ctx: CellContext, method: Method, task: str, settings: dict[str, Any]):
    """Accuracy, and compute sparsity counted with FlopCounterMode on every forward exactly as it was scored
    (same batches, padding and protected positions). A generation task's c is counted by phase: `compute_sparsity`
    (what the matching protocol holds to the target) is c on the prompts' prefill, where the methods differ;
    `c_decode` is c on the decode steps and `c_all` on both."""
    from lm_eval.evaluator import evaluate

    from bench.evaluate import BenchLM
    from bench.tasks import GENERATION_TASKS, TASKS, build_task_dict

    match = MatchResult(target=method.sparsity)
    if fits_lengths(method):
        pooled = [s for t in fit_pool(task, ctx.tasks) for s in ctx.task_shapes(t, method.sequence_dependent)]
        match = ctx.fit(method, pooled)
    with library_output_to(ctx.log):  # a generated task's own progress bars (RULER) go to the log
        task_dict = build_task_dict([task], settings["limit"], tokenizer=ctx.tokenizer_path)
    with method.apply(ctx.model) as pruned:
        def on_workload(forwards) -> None:
            nonlocal match
            if method.knob(ctx.model.config) is not None:
                match = ctx.solve(method, pruned, Workload([(f.input_ids, f.scored, f.kwargs)
                                                             for f in forwards]))

        lm = BenchLM(pruned, ctx.tokenizer, batch_size=ctx.batch_size,
                     sequence_dependent=method.sequence_dependent, progress=ctx.progress,
                     dense_flops=ctx.dense_flops, method_flops=method.executed_flops, on_workload=on_workload,
                     decode_flops=ctx.dense_decode_flops, batched_decode=type(method).batched_decode)
        with library_output_to(ctx.log):
            out = evaluate(lm=lm, task_dict=task_dict, limit=settings["limit"], log_samples=True,
                           bootstrap_iters=1000, verbosity="ERROR")
    generated = task in GENERATION_TASKS
    tally = lm.generation.prefill if generated else lm.engine.flops
    items = lm.generation.requests if generated else tally.items
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
    rows += [{**base, "metric": "compute_sparsity", "value": tally.sparsity, "n": items},
             {**base, "metric": "scored_tokens", "value": float(tally.tokens), "n": items},
             {**base, "metric": "decoder_flops", "value": float(tally.executed), "n": items},
             {**base, "metric": "dense_decoder_flops", "value": float(tally.dense), "n": items}]
    if generated:
        decode = lm.generation.decode
        rows += [{**base, "metric": "c_decode", "value": decode.sparsity, "n": items},
                 {**base, "metric": "c_all", "value": lm.generation.sparsity, "n": items},
                 {**base, "metric": "decode_tokens", "value": float(decode.tokens), "n": items},
                 {**base, "metric": "decode_decoder_flops", "value": float(decode.executed), "n": items},
                 {**base, "metric": "dense_decode_decoder_flops", "value": float(decode.dense), "n": items}]
        samples = [{"doc_id": s["doc_id"], **{m: float(s[m]) for m in TASKS[task].metrics if m in s},
                    "generation": str(s["filtered_resps"][0])} for s in out["samples"][task]]
        return rows, samples
    samples = [{"doc_id": s["doc_id"], **{m: float(s[m]) for m in TASKS[task].metrics if m in s},
                "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
               for s in out["samples"][task]]
    return rows, samples
