"""Retrain FTP's router on a fixed schedule and compare it with the static router on held-out calibration text: a
quick way to try training-recipe fields without the schedule search (the GA and its fine-tune are skipped).

    python -m experiments.ftp.router_trial ARTIFACT_DIR [field=value ...]

ARTIFACT_DIR is an FTP artifact (e.g. methods/artifacts/ftp-<hash>): its "schedule" is reused and the router is
retrained with the fields of its key (its recipe and seed) changed by the field=value overrides.
Prints the selection history and, on the 12 held-out rescale windows at the learned router's measured c, its LM
loss, the static router's at the same c, and the first-token computed fraction (as `calibrate --json` does)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.models import load_model
from experiments.ftp.artifacts import field_overrides, load
from methods.ftp.block import routed_model
from methods.ftp.measure import solve_scale
from methods.ftp.router import TokenRouter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="another seed than the artifact's")
    parser.add_argument("--sparsity", type=float, default=None, help="another target than the artifact's")
    parser.add_argument("--save", type=Path, help="write the trained router's state_dict here (torch.save)")
    parser.add_argument("fields", nargs="*", help="FTP field=value overrides (JSON values)")
    args = parser.parse_intermixed_args()
    overrides = field_overrides(args.fields)
    overrides.update({k: v for k, v in (("seed", args.seed), ("sparsity", args.sparsity)) if v is not None})
    model, tokenizer = load_model()
    loaded = load(args.artifact, tokenizer, **overrides)
    method, windows, schedule = loaded.method, loaded.windows, loaded.artifact["schedule"]
    start = time.perf_counter()
    ctl = method.controller(model.config, schedule, TokenRouter(method.router_hidden))
    with routed_model(model, ctl):
        trained = method.fit_router(model, ctl, schedule, windows, loaded.rng)
        fit = solve_scale(model, ctl, schedule, windows.rescale, method.sparsity, method.rescale_tolerance,
                          method.rescale_iterations, method.max_block_sparsity, with_loss=True)
        report = method.heldout_report(model, ctl, schedule, windows.rescale, fit.measured)
    if args.save:
        torch.save(ctl.router.state_dict(), args.save)
    for row in trained["selection"]:
        print("selection", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(json.dumps({"overrides": overrides, "seed": method.seed, "seconds": round(time.perf_counter() - start),
                      "delta_learned_minus_static": report["heldout_lm_loss"] - report["heldout_static_lm_loss"],
                      **report}, indent=1))


if __name__ == "__main__":
    main()
