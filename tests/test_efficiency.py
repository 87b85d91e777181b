"""The latency probe's protocol: interleaved ABBA order, warm-up discarded, one sample per repeat."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.timing import interleaved_latency


class _Recorder(torch.nn.Module):
    """Stands for a model: logs which of dense/pruned ran each prefill (a call without a cache)."""

    def __init__(self, inner, label: str, log: list[str]) -> None:
        super().__init__()
        self.inner, self.label, self.log = inner, label, log

    def forward(self, input_ids, past_key_values=None, **kwargs):
        if past_key_values is None:
            self.log.append(self.label)
        return self.inner(input_ids=input_ids, past_key_values=past_key_values, **kwargs)


def test_abba_order_and_sample_counts(tiny):
    log: list[str] = []
    dense = _Recorder(tiny, "dense", log)

    @contextmanager
    def pruned():
        yield _Recorder(tiny, "pruned", log)

    ids = torch.randint(0, tiny.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    dense_result, pruned_result = interleaved_latency(dense, pruned, ids, repeats=4, warmup=1, new_tokens=2)
    # each slot runs one prefill (timed) and decodes from its cache: one log entry per slot
    slots = log
    assert slots == ["dense", "pruned", "pruned", "dense", "dense", "pruned", "pruned", "dense", "dense", "pruned"]
    assert len(dense_result.prefill_s) == len(pruned_result.prefill_s) == 4
    assert len(dense_result.decode_tokens_per_s) == 4 and all(t > 0 for t in pruned_result.decode_tokens_per_s)
