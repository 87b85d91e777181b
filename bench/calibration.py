"""Calibration token windows from the vendored C4 text (never an evaluation set).

Documents are shuffled with the seed, joined with the EOS token, tokenized once and cut into consecutive
non-overlapping windows (ShortGPT/BlockPruner style). Sample count, length, seed and source are recorded
with every artifact through the CalibrationSet hash."""

from __future__ import annotations

import functools
import random

import torch

from bench.datafiles import read_jsonl
from bench.errors import BenchError
from methods.base import CalibrationSet

SOURCES: dict[str, tuple[str, ...]] = {
    # the head of the C4 en train shard SparseGPT/Wanda sample from: ~496k SmolLM2 tokens (~968 × 512)
    "c4": ("calibration/c4_en_train_shard00000_first1000.jsonl",),
    # all vendored C4 text: ~1.6M tokens, for router/predictor training
    "c4-all": ("calibration/c4_en_train_shard00000_first1000.jsonl",
               "calibration/c4_en_validation_subset1998.jsonl",
               "calibration/c4_en_llamafactory_demo300.jsonl"),
}
DEFAULT_SOURCE = "c4"


@functools.lru_cache(maxsize=4)
def _token_stream(source: str, tokenizer_key: str, seed: int, tokenizer) -> torch.Tensor:
    docs = [row["text"] for name in SOURCES[source] for row in read_jsonl(name)]
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token or ""
    ids = tokenizer(eos.join(docs), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def load_calibration(tokenizer, n_samples: int = 64, seq_len: int = 512, seed: int = 0,
                     source: str = DEFAULT_SOURCE) -> CalibrationSet:
    """`n_samples` windows of `seq_len` tokens as one [n_samples, seq_len] tensor; each starts with BOS (and holds
    seq_len − 1 tokens of text) when the model's tokenizer adds one (`adds_bos`)."""
    from bench.models import adds_bos, prepend_bos

    if source not in SOURCES:
        raise BenchError(f"unknown calibration source {source!r}; use one of {sorted(SOURCES)}")
    if n_samples < 1 or seq_len < 2:
        raise BenchError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples} × {seq_len}")
    key = f"{tokenizer.name_or_path}:{len(tokenizer)}"
    stream = _token_stream(source, key, seed, tokenizer)
    bos = adds_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    available = len(stream) // body
    if n_samples > available:
        raise BenchError(f"calibration source {source!r} holds {available} windows of {seq_len} tokens, "
                         f"{n_samples} were asked for; use --calibration-source c4-all or fewer samples")
    windows = stream[: n_samples * body].view(n_samples, body)
    if bos:
        windows = prepend_bos(windows, tokenizer)
    description = f"{source}:n{n_samples}:len{seq_len}:seed{seed}" + (":bos" if bos else "")
    return CalibrationSet.from_tensor(windows.clone(), description)
