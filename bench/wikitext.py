"""WikiText-2 test perplexity: the raw file read whole, tokenized once, cut into non-overlapping windows of
`seq_len` tokens; token-level NLL over every next-token prediction inside each window.

A method that drops tokens for good (SDTP) has no logits at dropped positions; perplexity is then computed
over the predictions whose position kept its logits, and the row records how many that were."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.datafiles import read_text
from bench.flops import counted_forward
from methods.base import scoring

WIKITEXT2 = "wikitext2/wiki.test.raw"


@functools.lru_cache(maxsize=4)
def _wikitext_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer(read_text(WIKITEXT2), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def wikitext_windows(tokenizer, seq_len: int = 512, max_windows: int | None = 40,
                     bos: bool | None = None) -> torch.Tensor:
    """[n_windows, seq_len]; with `bos` (default: when the tokenizer adds one, see `adds_bos`), each window
    starts with the BOS token and holds seq_len − 1 tokens of text."""
    from bench.models import adds_bos, prepend_bos

    bos = adds_bos(tokenizer) if bos is None else bos
    ids = _wikitext_ids(tokenizer)
    body = seq_len - 1 if bos else seq_len
    n = len(ids) // body if max_windows is None else min(max_windows, len(ids) // body)
    windows = ids[: n * body].view(n, body)
    if bos:
        windows = prepend_bos(windows, tokenizer)
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_tokens: int  # predictions scored
    predictions: int  # predictions a dense model scores over the same windows
    windows: int
    seq_len: int
    token_nll: torch.Tensor  # [windows, seq_len - 1] float64, NLL of every next-token prediction
    scored: torch.Tensor  # [windows, seq_len - 1] bool, predictions whose position kept its logits
    executed_flops: list[int] = field(default_factory=list)  # per window, when counted

    def ppl_on(self, scored: torch.Tensor) -> float:
        """Perplexity over the given predictions only (to compare with another run on the same positions)."""
        return math.exp(float(self.token_nll[scored].mean()))


def perplexity(model, windows: torch.Tensor, progress: bool = True, count_flops: bool = False) -> PerplexityResult:
    """One window per forward (a token method's decisions and its FLOPs are then per window); with
    `count_flops`, each forward runs under FlopCounterMode and its executed decoder FLOPs are kept."""
    device = next(model.parameters()).device
    nlls, masks, executed = [], [], []
    for window in tqdm(windows, desc="wikitext2 ppl", disable=not progress, leave=False):
        ids = window[None].to(device)
        # no position is forced to survive: a token-dropping method reports which logits are real
        with torch.inference_mode(), scoring(torch.zeros_like(ids, dtype=torch.bool)) as ctx:
            if count_flops:
                out, flops = counted_forward(model, input_ids=ids, use_cache=False)
                executed.append(flops)
            else:
                out = model(input_ids=ids, use_cache=False)
        nll = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        valid = torch.ones_like(nll, dtype=torch.bool)
        if ctx.logit_positions is not None:
            valid = ctx.logit_positions[:, :-1].to(nll.device)
        nlls.append(nll[0].double().cpu())
        masks.append(valid[0].cpu())
    token_nll, scored = torch.stack(nlls), torch.stack(masks)
    count = int(scored.sum())
    return PerplexityResult(ppl=math.exp(float(token_nll[scored].sum()) / max(count, 1)), nll_tokens=count,
                            predictions=scored.numel(), windows=windows.shape[0], seq_len=windows.shape[1],
                            token_nll=token_nll, scored=scored, executed_flops=executed)
