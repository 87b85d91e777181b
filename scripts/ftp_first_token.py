"""Does FTP's router compute the first token (the attention sink)? Per routed block, on the 512-token WikiText-2
probe (the latency probe's input), for the committed artifacts of the default model.

    python scripts/ftp_first_token.py [ftp ftp-topk ftp-sink ftp-static ...]

Prints, per method, how many of the routed blocks (s_i > 0) compute token 0, and the probe's compute sparsity."""

from __future__ import annotations

import sys

import torch

from bench.artifacts import ensure_calibrated
from bench.models import DEFAULT_MODEL, load_model
from bench.perplexity import wikitext_windows
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
            controller = method._controller
            routed = [i for i, s in enumerate(controller.schedule) if s > 0]
            first = [i for i in routed if bool(controller.last_decisions[i][0, 0])]
            stats = method.stats()
        print(f"{name}: first token computed in {len(first)} of {len(routed)} routed blocks; "
              f"compute sparsity on the probe {stats['compute_sparsity']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["ftp", "ftp-topk", "ftp-sink", "ftp-static"])
