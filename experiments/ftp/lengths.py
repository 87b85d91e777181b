"""FTP's learned router against its static teacher at the lengths it routes: the 12 held-out 512-token rescale windows
cut into N-token rows (at most 48), each router's schedule scale solved to put its own c on the target at that
length, and the paired 95% interval of learned − static over the rows. The task requests the study scores average
32-43 tokens (docs/experiments/ftp-router.md, "At the lengths the tasks score"). Read-only: it evaluates an artifact, or a router saved by `ftp_router_trial.py --save`, and trains nothing.

    python -m experiments.ftp.lengths [ARTIFACT_DIR] [--lengths 32,64,128,512] [--router PATH] [field=value ...]

Default: the default model's committed seed-0 `ftp` artifact of the current recipe. `--router PATH` replaces the
artifact's router weights (its schedule is kept); `field=value` overrides the artifact's fields (e.g.
`position_input=false` for a router trained without it). Prints one JSON line per N: each router's solved scale, c,
LM loss and first-token computed fraction, learned − static with its paired interval, learned − static over the last
third of the positions, and the five positions where learned − static is largest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.models import load_model
from experiments.ftp.artifacts import committed_seeds, field_overrides, load
from experiments.ftp.matched_heldout import paired_interval, position_losses
from methods.ftp.block import routed_model
from methods.ftp.measure import solve_scale

MAX_ROWS = 48


def rows_of_length(windows: torch.Tensor, length: int, limit: int = MAX_ROWS) -> torch.Tensor:
    """The windows cut into consecutive `length`-token rows (a remainder shorter than `length` dropped), the first
    `limit` of them."""
    usable = (windows.shape[1] // length) * length
    return windows[:, :usable].reshape(-1, length)[:limit]


def compare_at_lengths(model, method, schedule, router, windows: torch.Tensor, lengths, target: float,
                       tolerance: float) -> list[dict]:
    ctl = method.controller(model.config, schedule, router)
    out = []
    with routed_model(model, ctl):
        for length in lengths:
            rows = rows_of_length(windows, length)
            row: dict = {"N": length, "rows": len(rows)}
            losses = {}
            for kind in ("learned", "static"):
                ctl.policy = method.policy(schedule, kind=kind)
                # the solver leaves the router at its best scale; the losses are read there once
                fit = solve_scale(model, ctl, schedule, rows, target, tolerance, 30, method.max_block_sparsity)
                losses[kind] = position_losses(model, rows)
                row[kind] = {"scale": fit.scale, "c": fit.measured["compute_sparsity"],
                             "lm_loss": float(losses[kind].mean()),
                             "first_token_computed": fit.measured["first_token_computed_fraction"]}
            excess = losses["learned"] - losses["static"]  # [rows, N - 1]
            mean, half = paired_interval(excess.mean(1))
            row["learned_minus_static"], row["paired_ci95_half_width"] = mean, half
            # where the difference sits: the last third of the positions (where a multiple-choice continuation
            # is scored) and the five positions with the largest mean excess
            row["last_third_learned_minus_static"] = float(excess[:, -((length - 1) // 3):].mean())
            by_position = excess.mean(0)
            row["largest_excess_positions"] = {int(j): float(by_position[j])
                                               for j in by_position.argsort(descending=True)[:5]}
            out.append(row)
    return out


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--lengths", default="32,64,128,512")
    parser.add_argument("--router", type=Path, help="router weights saved by ftp_router_trial.py --save")
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--tolerance", type=float, default=0.0015)
    parser.add_argument("fields", nargs="*", help="FTP field=value overrides (JSON values)")
    args = parser.parse_intermixed_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    overrides = field_overrides(args.fields)
    loaded = load(args.artifact or committed_seeds((0,))[0], tokenizer, **overrides)
    router = loaded.method.build_router()
    if args.router:
        router.load_state_dict(torch.load(args.router))
    lengths = [int(n) for n in args.lengths.split(",")]
    for row in compare_at_lengths(model, loaded.method, loaded.artifact["schedule"], router,
                                  loaded.windows.rescale, lengths, args.target, args.tolerance):
        print(json.dumps(_rounded(row)), flush=True)


if __name__ == "__main__":
    main()
