"""FTP's prefill speed against its static router at the same measured compute sparsity, interleaved in one run.

    python -m experiments.ftp.prefill_speed [--seq-len 512] [--repeats 10]

On the WikiText-2 probe: measures `ftp`'s compute sparsity c (its own accounting, router included), sets
`ftp-static`'s schedule scale so its c is the same (exact budgets: solved by arithmetic), then times prefill of
dense, ftp-static and ftp in rotating order and prints each speedup over dense, their ratio, and the router's share
of the dense FLOPs. Run it on an otherwise idle machine."""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.artifacts import ensure_calibrated
from bench.flops import analytic_decoder_flops
from bench.models import DEFAULT_MODEL, load_model
from bench.timing import Timer, prefill
from bench.wikitext import wikitext_windows
from methods import make_method


def static_scale_for(method, config, width: int, target: float) -> float:
    """The schedule scale at which ftp-static's compute sparsity on one `width`-token row is closest to `target`."""
    dense = analytic_decoder_flops(config, width)
    knob = method.knob(config)
    low, high = knob.low, knob.high
    for _ in range(60):
        mid = (low + high) / 2
        method.set_knob(mid)
        c = 1 - method.row_flops(config, width, None) / dense
        low, high = (mid, high) if c < target else (low, mid)
    return (low + high) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    ids = wikitext_windows(tokenizer, args.seq_len, 1)
    ftp, static = (make_method(name, sparsity=0.25, progress=False) for name in ("ftp", "ftp-static"))
    for method in (ftp, static):
        ensure_calibrated(method, model, tokenizer, DEFAULT_MODEL)
    with ftp.apply(model):
        model.model(input_ids=ids, use_cache=False)
        stats = ftp.stats()
    c = stats["compute_sparsity"]
    static.set_knob(static_scale_for(static, model.config, args.seq_len, c))
    with static.apply(model):
        model.model(input_ids=ids, use_cache=False)
        c_static = static.stats()["compute_sparsity"]
    timer = Timer(ids.device)
    contexts = {"dense": None, "ftp-static": static, "ftp": ftp}
    times: dict[str, list[float]] = {name: [] for name in contexts}
    order = list(contexts)
    for rep in range(args.repeats + 1):
        for name in order[rep % 3:] + order[: rep % 3]:  # rotate who goes first
            method = contexts[name]
            if method is None:
                t = timer(lambda: prefill(model, ids))
            else:
                with method.apply(model) as pruned:
                    t = timer(lambda pruned=pruned: prefill(pruned, ids))
            if rep:  # the first round warms up
                times[name].append(t)
    dense = statistics.median(times["dense"])
    speed = {name: dense / statistics.median(times[name]) for name in ("ftp-static", "ftp")}
    print(f"prefill, {args.seq_len} tokens, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    print(f"  compute sparsity: ftp {c:.4f} (router {stats['router_flops'] / stats['dense_flops']:.2%} of dense "
          f"FLOPs, attention table included), ftp-static {c_static:.4f}")
    print(f"  speedup over dense: ftp-static {speed['ftp-static']:.3f}x, ftp {speed['ftp']:.3f}x; "
          f"ftp / ftp-static = {speed['ftp'] / speed['ftp-static']:.3f}")


if __name__ == "__main__":
    main()
