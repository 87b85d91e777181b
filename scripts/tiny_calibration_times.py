"""Calibration wall time of every method on a user-sized small model, per architecture, with the budgets the harness
gives such a model (bench.budgets: FTP's and SDTP's "small" presets) and its thread policy (bench.models.cpu_threads).

The model is the size the architectures issue measured: 12 layers, hidden 64, 4 heads / 2 KV heads, SmolLM2's
49,152-token vocabulary, random weights; calibration windows are random tokens in the shape each method asks the
harness for (`default_calibration`). Prints one markdown row per (architecture, method).

    PYTHONPATH=. python scripts/tiny_calibration_times.py [--archs llama,qwen2,...] [--methods shortgpt,...]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

import torch

from bench.budgets import sized_fields
from bench.models import TINY_ARCHITECTURES, cpu_threads, tiny_model
from methods import make_method, method_class
from methods.base import CalibrationSet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(TINY_ARCHITECTURES))
    parser.add_argument("--methods", default="shortgpt,blockpruner,sdtp,ftp")
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    print("| architecture | method | preset | calibration s | threads | params (M) |")
    print("|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        model = tiny_model(arch, num_layers=12, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=args.vocab)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for name in args.methods.split(","):
            quiet = {"progress": False} if "progress" in {f.name for f in fields(method_class(name))} else {}
            method = make_method(name, **sized_fields(name, {"sparsity": 0.25, **quiet}, model.config))
            wanted = method.default_calibration or {"n_samples": 64, "seq_len": 512}
            g = torch.Generator().manual_seed(0)
            windows = torch.randint(3, args.vocab, (wanted["n_samples"], wanted["seq_len"]), generator=g)
            calibration = CalibrationSet.from_tensor(windows, "random-tokens")
            with cpu_threads(model, None) as threads:
                start = time.perf_counter()
                method.calibrate(model, None, calibration)
                seconds = time.perf_counter() - start
            preset = getattr(method, "preset", "–")
            print(f"| {arch} | {name} | {preset} | {seconds:.1f} | {threads} | {params:.1f} |", flush=True)


if __name__ == "__main__":
    main()
