"""Greedy generation through the (possibly pruned) model with a KV cache, for lm-eval's `generate_until` requests:
one prefill forward over each prompt, then one-token decode steps, every forward counted by phase.

What each kind of method does while generating (each method's own cached forward, nothing special-cased here):
layer and block removal run the layers (sub-blocks) they keep, with the KV cache of those; SDTP prunes the prompt
during prefill and decodes every new token against the cache of the prompt positions each layer kept (decoding is
never pruned); FTP routes the prefill and routes each decoded token per block by the same argmax rule on features
kept incrementally (its paper's KV-cache variant: a skipped block writes no cache entry for that token).

Rows are batched only when their prompts have the same length, so a batch runs no padding and each row computes
what it computes alone (tests check the tokens are the same); a method whose cached forward holds one sequence
(`Method.batched_decode = False`: FTP, whose blocks cache different tokens per row) generates row by row.

FLOPs: each forward under FlopCounterMode (decoder blocks, LM head excluded), against the dense model's on the same
shapes: prefill = `dense_flops(batch, n)`, a decode step = one query token per row attending to its cache plus
itself (`dense_step_flops(batch, past)`). The two phases are tallied apart (`c_prefill`, `c_decode`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bench.flops import counted_forward
from methods.base import scoring


@dataclass
class PhaseTally:
    executed: int = 0
    dense: int = 0
    forwards: int = 0
    tokens: int = 0  # query tokens run (prompt tokens in prefill, generated tokens in decode)

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.executed / self.dense if self.dense else None

    def add(self, executed: int, dense: int, tokens: int) -> None:
        self.executed += executed
        self.dense += dense
        self.forwards += 1
        self.tokens += tokens


@dataclass
class GenerationTally:
    prefill: PhaseTally = field(default_factory=PhaseTally)
    decode: PhaseTally = field(default_factory=PhaseTally)
    requests: int = 0

    @property
    def sparsity(self) -> float | None:
        """c over both phases of every generated request."""
        dense = self.prefill.dense + self.decode.dense
        return 1.0 - (self.prefill.executed + self.decode.executed) / dense if dense else None


@dataclass(frozen=True)
class DenseCost:
    """The dense model's decoder FLOPs for a prefill [batch, n] and for one decode step of `batch` rows whose caches
    hold `past` tokens (None: do not count)."""

    prefill: Callable[[int, int], int]
    step: Callable[[int, int], int]


def equal_length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by prompt length (at most `batch_size` per group), longest first."""
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    groups = []
    for length in sorted(by_length, reverse=True):
        rows = by_length[length]
        groups += [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    return groups


def _forward(model, cost: DenseCost | None, phase: PhaseTally | None, dense: Callable[[], int], **call):
    if cost is None:
        return model(**call)
    out, executed = counted_forward(model, **call)
    phase.add(executed, dense(), int(call["input_ids"].numel()))
    return out


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    done: Callable[[list[int]], bool], eos_token_ids: Sequence[int] = (), batch_size: int = 1,
                    cost: DenseCost | None = None, tally: GenerationTally | None = None,
                    on_row: Callable[[int], None] | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, the stopping token included): at most `max_new_tokens`,
    ending at an EOS id or as soon as `done(tokens so far)` holds (a stop sequence is in the text)."""
    device = next(model.parameters()).device
    tally = tally if tally is not None else GenerationTally()
    outputs: list[list[int]] = [[] for _ in prompts]
    eos = set(int(t) for t in eos_token_ids)
    for rows in equal_length_batches(prompts, batch_size):
        ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
        batch, n = ids.shape
        last = torch.zeros(batch, n, dtype=torch.bool, device=device)
        last[:, -1] = True  # the position whose logits give the first new token (a token method keeps it)
        with torch.inference_mode():
            with scoring(last):
                out = _forward(model, cost, tally.prefill, lambda b=batch, w=n: cost.prefill(b, w), input_ids=ids,
                               use_cache=True, logits_to_keep=1)
            cache, past = out.past_key_values, n
            finished = [False] * batch
            for _ in range(max_new_tokens):
                token = out.logits[:, -1].float().argmax(-1)
                for b, i in enumerate(rows):
                    if not finished[b]:
                        outputs[i].append(int(token[b]))
                        finished[b] = int(token[b]) in eos or done(outputs[i]) \
                            or len(outputs[i]) >= max_new_tokens
                if all(finished):
                    break
                out = _forward(model, cost, tally.decode, lambda b=batch, p=past: cost.step(b, p),
                               input_ids=token[:, None], past_key_values=cache, use_cache=True)
                cache, past = out.past_key_values, past + 1
        tally.requests += batch
        if on_row is not None:
            on_row(batch)
    return outputs
