"""FTP's decoding quality, reported apart from prefill routing (methods.md §3: in the paper, cached decoding raised
LLaMA2-7B's WikiText-2 perplexity from 5.47 to 11.12).

    python -m experiments.ftp.decode_quality [--windows 2] [--seq-len 256] [--prompt 32]

Teacher-forced perplexity on WikiText-2 windows: the first `--prompt` tokens are prefilled, every later token is
fed one at a time through the KV cache (each block routes the new token by argmax on incrementally kept
features) and scored. Printed next to dense decoding of the same tokens and to FTP's prefill routing of the whole
window (the way the benchmark scores tasks), with the decode steps' token sparsity."""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from bench.artifacts import ensure_calibrated
from bench.models import DEFAULT_MODEL, load_model
from bench.wikitext import wikitext_windows
from methods import make_method


def decoded_nll(model, ids: torch.Tensor, prompt: int) -> list[float]:
    """NLL of tokens prompt+1 … T-1, each predicted after feeding the previous one through the cache."""
    out = model(input_ids=ids[:, :prompt], use_cache=True)
    cache, nll = out.past_key_values, []
    logits = out.logits[:, -1]
    for t in range(prompt, ids.shape[1]):
        nll.append(float(F.cross_entropy(logits.float(), ids[:, t])))
        if t + 1 < ids.shape[1]:
            step = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache, logits = step.past_key_values, step.logits[:, -1]
    return nll


def prefill_nll(model, ids: torch.Tensor, prompt: int) -> list[float]:
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt - 1:-1]
    return F.cross_entropy(logits.float(), ids[0, prompt:], reduction="none").tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ftp")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    windows = wikitext_windows(tokenizer, args.seq_len, args.windows)
    method = make_method(args.method, sparsity=0.25, progress=False)
    ensure_calibrated(method, model, tokenizer, DEFAULT_MODEL)
    dense, routed_prefill, routed_decode = [], [], []
    for row in windows:
        ids = row[None]
        dense += decoded_nll(model, ids, args.prompt)
        with method.apply(model):
            routed_prefill += prefill_nll(model, ids, args.prompt)
            method.reset_stats()
            routed_decode += decoded_nll(model, ids, args.prompt)
            stats = method.stats()
    ppl = {name: math.exp(sum(v) / len(v)) for name, v in
           (("dense", dense), ("prefill", routed_prefill), ("decode", routed_decode))}
    print(f"{args.method}, WikiText-2, {args.windows} windows × {args.seq_len} tokens, prompt {args.prompt}: "
          f"{len(dense)} scored tokens")
    print(f"  perplexity: dense {ppl['dense']:.2f}, {args.method} prefill routing {ppl['prefill']:.2f}, "
          f"{args.method} cached decoding {ppl['decode']:.2f}")
    print(f"  decode steps' token sparsity (last window): {stats.get('decode_token_sparsity', 0.0):.3f}")


if __name__ == "__main__":
    main()
