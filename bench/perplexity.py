"""WikiText-2 test perplexity: the raw file read whole, tokenized once, cut into non-overlapping windows of
`seq_len` tokens; token-level NLL over every next-token prediction inside each window.

A method that drops tokens for good (SDTP) has no logits at dropped positions; perplexity is then computed
over the predictions whose position kept its logits, and the row records how many that were."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.datafiles import read_text
from methods.base import scoring

WIKITEXT2 = "wikitext2/wiki.test.raw"


@functools.lru_cache(maxsize=4)
def _wikitext_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer(read_text(WIKITEXT2), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def wikitext_windows(tokenizer, seq_len: int = 512, max_windows: int | None = 40, bos: bool = False) -> torch.Tensor:
    """[n_windows, seq_len]; with `bos`, each window starts with the BOS token (Gemma needs it)."""
    ids = _wikitext_ids(tokenizer)
    body = seq_len - 1 if bos else seq_len
    n = len(ids) // body if max_windows is None else min(max_windows, len(ids) // body)
    windows = ids[: n * body].view(n, body)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_tokens: int  # predictions scored
    predictions: int  # predictions a dense model scores over the same windows
    windows: int
    seq_len: int


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    device = next(model.parameters()).device
    nll_sum = 0.0
    count = 0
    for batch in tqdm(windows.split(batch_size), desc="wikitext2 ppl", disable=not progress, leave=False):
        batch = batch.to(device)
        # no position is forced to survive: a token-dropping method reports which logits are real
        with torch.inference_mode(), scoring(torch.zeros_like(batch, dtype=torch.bool)) as ctx:
            logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")
        valid = torch.ones_like(nll, dtype=torch.bool)
        if ctx.logit_positions is not None:
            valid = ctx.logit_positions[:, :-1].to(nll.device)
        nll_sum += float(nll[valid].double().sum())
        count += int(valid.sum())
    predictions = windows.shape[0] * (windows.shape[1] - 1)
    return PerplexityResult(ppl=math.exp(nll_sum / max(count, 1)), nll_tokens=count, predictions=predictions,
                            windows=windows.shape[0], seq_len=windows.shape[1])
