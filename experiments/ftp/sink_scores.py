"""Where does an FTP router skip the attention sink, and what does its attention-score input read there? Read-only.

    python -m experiments.ftp.sink_scores [ARTIFACT_DIR ...]

1. The range of the first token's score input (attention received, methods.md's normalisation: a sum over the
   queries that see it) against the other tokens', under the static router on 8 calibration windows cut to 64,
   128, 256 and 512 tokens: the score grows with the length, so a router trained on 256-token windows meets sink
   scores at 512 tokens that it never saw.
2. For each artifact (default: the committed seed-0 `ftp` of the current recipe), on the 12 held-out rescale windows at its inference
   schedule: every (window, block) where the learned router skips the first token, with its four inputs there."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from bench.models import load_model
from experiments.ftp.artifacts import committed_seeds, load
from methods.ftp.block import RoutingController, routed_model

LENGTHS = (64, 128, 256, 512)


def logged_features(model, controller: RoutingController, rows) -> list[list[torch.Tensor]]:
    """Per row, the router inputs [N, 4] of every routed block, in block order."""
    out = []
    with routed_model(model, controller):
        for row in rows:
            controller.feature_log = []
            model.model(input_ids=row[None], use_cache=False)
            out.append([features for features, _ in controller.feature_log])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    directories = args.artifacts or committed_seeds((0,))
    for directory in directories:
        loaded = load(directory, tokenizer)
        method, calibration = loaded.method, loaded.calibration
        schedule = loaded.artifact["inference_schedule"]
        if directory == directories[0]:  # the length sweep once, on the first artifact's schedule and data
            static = RoutingController(model.config, replace(method.policy(schedule, kind="static"),
                                                             log_features=True), None)
            for length in LENGTHS:
                rows = logged_features(model, static, calibration.input_ids[:8, :length])
                sink = torch.tensor([float(f[0, 1]) for blocks in rows for f in blocks])
                others = torch.cat([f[1:, 1] for blocks in rows for f in blocks])
                print(f"{length:4d} tokens, static routing: first token's score median {float(sink.median()):6.1f} "
                      f"max {float(sink.max()):6.1f}; other tokens' 99th percentile {float(others.quantile(0.99)):5.1f}"
                      f" max {float(others.max()):6.1f}")
        windows = loaded.windows.rescale
        router = method.build_router()
        learned = method.controller(model.config, schedule, router)
        learned.policy = replace(learned.policy, log_features=True)
        routed = [i for i in range(len(schedule)) if learned.policy.routed(i)]
        skipped = 0
        for w, blocks in enumerate(logged_features(model, learned, windows)):
            for block, features in zip(routed, blocks, strict=True):
                logits = router(features[:1])[0]
                if logits[0] < logits[1]:
                    skipped += 1
                    position, score, rank, sparsity = (round(float(x), 3) for x in features[0])
                    print(f"{directory.name}: window {w} block {block}: first token skipped; inputs position "
                          f"{position}, score {score}, rank {rank}, s_i {sparsity}; logit gap "
                          f"{float(logits[0] - logits[1]):+.2f}")
        print(f"{directory.name}: first token skipped in {skipped} of {len(windows) * len(routed)} "
              f"(window, routed block) pairs")


if __name__ == "__main__":
    main()
