"""Accuracy through lm-eval (unforked): an `HFLM` subclass whose log-likelihood engine batches by length,
computes logits only where they are scored, and tells the method which positions are scored.

The requests, their tokenization and the metrics are stock lm-eval; only the scoring loop is ours. It scores
exactly the tokens stock `HFLM._loglikelihood_tokens` scores (same truncation, same continuation slice)."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from bench.flops import count_flops  # noqa: E402
from methods.base import scoring  # noqa: E402

FLOP_PROBES_PER_TASK = 16


@dataclass
class ScoredInput:
    """One forward's worth of tokens and the positions whose logits are read."""

    input_ids: list[int]
    scored_from: int  # first position whose logits score a continuation token

    def scored_mask(self) -> torch.Tensor:
        mask = torch.zeros(1, len(self.input_ids), dtype=torch.bool)
        mask[0, self.scored_from:] = True
        return mask


@dataclass
class EngineStats:
    forwards: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    probes: dict[str, list[ScoredInput]] = field(default_factory=lambda: defaultdict(list))


class BenchLM(HFLM):
    """HFLM over an in-memory (possibly pruned) model.

    sequence_dependent: the method's decisions depend on the whole sequence (token routing), so rows are
    batched only with rows of the same length (no padding is ever seen by the method)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, sequence_dependent: bool = False,
                 progress: bool = True):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.sequence_dependent = sequence_dependent
        self.progress = progress
        self.engine = EngineStats()
        self._task_of_request: list[str] = []

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._task_of_request = [getattr(r, "task_name", "?") for r in requests]
        return super().loglikelihood(requests, disable_tqdm=True)

    def _prepare(self, context_enc: list[int], continuation_enc: list[int]) -> ScoredInput:
        whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
        inp = whole[:-1]
        return ScoredInput(input_ids=inp, scored_from=len(inp) - len(continuation_enc))

    def _batches(self, order: list[int], items: list[ScoredInput]) -> list[list[int]]:
        batches: list[list[int]] = []
        for idx in order:
            if batches and len(batches[-1]) < self.batch_size and (
                    not self.sequence_dependent
                    or len(items[batches[-1][0]].input_ids) == len(items[idx].input_ids)):
                batches[-1].append(idx)
            else:
                batches.append([idx])
        return batches

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        items = [self._prepare(ctx, cont) for _, ctx, cont in requests]
        conts = [cont for _, _, cont in requests]
        tasks = self._task_of_request if len(self._task_of_request) == len(requests) else ["?"] * len(requests)
        for i, item in enumerate(items):
            if len(self.engine.probes[tasks[i]]) < FLOP_PROBES_PER_TASK:
                self.engine.probes[tasks[i]].append(item)
        # longest first, so the first batch shows the worst-case memory at once
        order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), tuple(items[i].input_ids)))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        pad_id = self.tokenizer.pad_token_id or 0
        start = time.perf_counter()
        pbar = tqdm(total=len(items), desc="scoring", disable=not self.progress or disable_tqdm, leave=False)
        for batch in self._batches(order, items):
            width = max(len(items[i].input_ids) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            scored = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, i in enumerate(batch):
                n = len(items[i].input_ids)
                ids[row, :n] = torch.tensor(items[i].input_ids)
                scored[row, items[i].scored_from:n] = True
            # logits only over the span any row scores (the LM head is ~20% of a forward on a small model)
            first = min(items[i].scored_from for i in batch)
            keep = torch.arange(first, width)
            with torch.inference_mode(), scoring(scored.to(self.device)):
                # right padding needs no mask for causal attention (as in stock HFLM)
                logits = self.model(input_ids=ids.to(self.device), use_cache=False, logits_to_keep=keep.to(self.device)).logits
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                n, lo = len(items[i].input_ids), items[i].scored_from
                span = logprobs[row, lo - first:n - first]
                target = torch.tensor(conts[i][-(n - lo):] if n - lo else [], dtype=torch.long)
                greedy = bool((span.argmax(-1) == target).all())
                results[i] = (float(span.gather(-1, target[:, None]).sum()), greedy)
            self.engine.forwards += 1
            self.engine.tokens += sum(len(items[i].input_ids) for i in batch)
            self.engine.padded_tokens += len(batch) * width
            pbar.update(len(batch))
        pbar.close()
        self.engine.seconds += time.perf_counter() - start
        return results


def measure_task_flops(model, probes: list[ScoredInput]) -> tuple[int, list[int]]:
    """Executed decoder FLOPs of the pruned model on each probe (unpadded, batch 1), and the lengths."""
    device = next(model.parameters()).device
    total = 0
    lengths = []
    for probe in probes:
        with scoring(probe.scored_mask().to(device)):
            total += count_flops(model, torch.tensor([probe.input_ids], device=device)).decoder
        lengths.append(len(probe.input_ids))
    return total, lengths
