"""Does FTP's router compute the first token (the attention sink)? On the 512-token WikiText-2 probe (the latency
probe's input), for the committed artifacts of the default model, read from `stats()`.

    python -m experiments.ftp.first_token [ftp ftp-topk ftp-static ...]

Prints, per method, the fraction of routed blocks (s_i > 0) that compute token 0, the probe's compute sparsity,
and the router's own share of the dense FLOPs."""

from __future__ import annotations

import sys

import torch

from bench.artifacts import ensure_calibrated
from bench.models import DEFAULT_MODEL, load_model
from bench.wikitext import wikitext_windows
from methods import make_method


def main(names: list[str]) -> None:
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    probe = wikitext_windows(tokenizer, 512, 1)
    for name in names:
        method = make_method(name, sparsity=0.25, progress=False)
        ensure_calibrated(method, model, tokenizer, DEFAULT_MODEL)
        with method.apply(model):
            model.model(input_ids=probe, use_cache=False)
            stats = method.stats()
        print(f"{name}: first token computed in {stats['first_token_computed_fraction']:.0%} of routed blocks; "
              f"compute sparsity on the probe {stats['compute_sparsity']:.3f}; "
              f"router FLOPs {stats['router_flops'] / stats['dense_flops']:.2%} of dense")


if __name__ == "__main__":
    main(sys.argv[1:] or ["ftp", "ftp-static"])
