"""Retrain FTP's router on a fixed schedule and compare it with the static router on held-out calibration text: a
quick way to try training-recipe fields without the schedule search (the GA and its fine-tune are skipped).

    python scripts/ftp_router_trial.py ARTIFACT_DIR --seed S [field=value ...]

ARTIFACT_DIR is an FTP artifact whose "schedule" is reused (e.g. methods/artifacts/ftp-<hash> of the same seed).
Prints the selection history and, on the 12 held-out rescale windows at the learned router's measured c, its LM
loss, the static router's at the same c, and the first-token computed fraction (as `calibrate --json` does)."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from bench.artifacts import CalibrationSettings, load_artifact_dir
from bench.calibration import load_calibration
from bench.models import load_model
from methods import make_method
from methods.ftp.block import routed_model
from methods.ftp.measure import solve_scale
from methods.ftp.router import TokenRouter


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--save", type=Path, help="write the trained router's state_dict here (torch.save)")
    parser.add_argument("fields", nargs="*", help="FTP field=value overrides (JSON values)")
    args = parser.parse_intermixed_args()
    overrides = {k: _value(v) for k, v in (f.split("=", 1) for f in args.fields)}
    schedule = load_artifact_dir(args.artifact)[0]["schedule"]
    model, tokenizer = load_model()
    method = make_method("ftp", sparsity=args.sparsity, seed=args.seed, progress=False, **overrides)
    settings = CalibrationSettings.for_method(method, args.seed)
    calibration = load_calibration(tokenizer, settings.n_samples, settings.seq_len, settings.seed, settings.source)
    start = time.perf_counter()
    torch.manual_seed(method.seed)
    rng = random.Random(method.seed)
    windows = method.calibration_windows(calibration, rng, "cpu")  # as FTP.calibrate draws them
    ctl = method.controller(model.config, schedule, TokenRouter(method.router_hidden))
    with routed_model(model, ctl):
        trained = method.fit_router(model, ctl, schedule, windows, rng)
        fit = solve_scale(model, ctl, schedule, windows.rescale, method.sparsity, method.rescale_tolerance,
                          method.rescale_iterations, method.max_block_sparsity, with_loss=True)
        report = method.heldout_report(model, ctl, schedule, windows.rescale, fit.measured)
    if args.save:
        torch.save(ctl.router.state_dict(), args.save)
    for row in trained["selection"]:
        print("selection", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(json.dumps({"overrides": overrides, "seed": args.seed, "seconds": round(time.perf_counter() - start),
                      "delta_learned_minus_static": report["heldout_lm_loss"] - report["heldout_static_lm_loss"],
                      **report}, indent=1))


if __name__ == "__main__":
    main()
