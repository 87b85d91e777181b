"""A small sweep on the tiny random LLaMA, in its own process, for the kill and concurrency tests:

    python tests/sweep.py RESULTS [--force] [--die-at-rename N]

prints `[sweep] started` once the model is built (the kill tests time their SIGKILL from there) and, at the end,
one JSON line with the cells it computed and skipped, and its seconds of work after `started` (calibration aside). `--die-at-rename N` SIGKILLs the process at the N-th
rename out of results/.staging/ (a cell fully staged, not yet in place: the worst moment for a crash)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's bench, not an installed one

from bench.models import model_source, tiny_llama  # noqa: E402
from bench.runner import RunConfig, Runner  # noqa: E402
from bench.store import TIMING_METRICS  # noqa: E402,F401  (re-exported to the tests that import it from here)

UNITS_PER_METHOD = 4  # piqa, arc_easy, wikitext2, efficiency


def config(results: str, force: bool = False) -> RunConfig:
    return RunConfig(model="tiny", methods=["shortgpt"], sparsities=[0.25], tasks=["piqa", "arc_easy"], limit=3,
                     results=results, ppl_seq_len=64, ppl_windows=1, latency_seq_len=32, latency_repeats=1,
                     decode_tokens=2, progress=False, batch_size=4, threads=1, force=force)


def _die_at_rename(n: int) -> None:
    original = Path.rename
    seen = []

    def rename(self, target):
        if self.parent.name == ".staging" and not self.name.startswith("old-"):
            seen.append(self)
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, target)

    Path.rename = rename


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--die-at-rename", type=int, default=None)
    args = parser.parse_args()
    if args.die_at_rename:
        _die_at_rename(args.die_at_rename)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source("smollm2-135m"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = tiny_llama(num_layers=4, hidden=32, heads=2, kv_heads=1, intermediate=64, vocab=len(tokenizer), seed=0)
    runner = Runner(config(args.results, args.force), model=model, tokenizer=tokenizer)
    print("[sweep] started", flush=True)
    start = time.perf_counter()
    runner.run()
    calibration = sum(v for k, v in runner.clock.seconds.items() if k.startswith("calibrate"))
    print(json.dumps({"written": runner.cells_written, "skipped": runner.cells_skipped,
                      "work_seconds": time.perf_counter() - start - calibration}), flush=True)


if __name__ == "__main__":
    main()
