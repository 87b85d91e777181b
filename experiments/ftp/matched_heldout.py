"""FTP's learned-vs-static comparison on held-out calibration text, with the static router matched to the learned
router's measured c to within `--tolerance` (the committed artifacts matched it to within 0.002, and near c = 0.25
one unit of c is worth ~9-12 nats of LM loss, so that band alone can move the difference by ~±0.02 nats).
Read-only: it evaluates committed artifacts and trains nothing.

    python -m experiments.ftp.matched_heldout [ARTIFACT_DIR ...] [--tolerance 0.0003] [--at-c 0.25]

Default: the default model's three committed `ftp` seeds of the current recipe. Prints, per artifact, the learned
router's c and LM loss at its inference scale on the 12 held-out rescale windows, the static router's at the matched
c, their difference, the same with the learned router's first token forced computed (how much of the difference the
attention sink explains), the local slope of the static router's loss in c, and a paired 95% interval of learned −
static over the 12 windows (t with 11 degrees of freedom: the windows are the unit that varies). With `--at-c C` the
learned router's schedule scale is solved to put its own c within `--tolerance` of C instead, so that variants
(GA vs uniform schedule, inputs left out) compare at one c."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.models import load_model
from experiments.ftp.artifacts import committed_seeds, load
from methods.ftp.block import RoutingController, routed_model
from methods.ftp.measure import measure_routing, solve_scale
from methods.ftp.router import first_valid_token
from methods.ftp.schedule import scaled_schedule

T_975_DF11 = 2.201  # two-sided 95% quantile of Student's t with 11 degrees of freedom (12 windows)


def position_losses(model, rows: torch.Tensor) -> torch.Tensor:
    """[rows, N - 1] next-token cross-entropy at every position of each row, routed one row at a time (as the
    evaluator routes); a row's mean is its LM loss."""
    with torch.inference_mode():
        return torch.stack([F.cross_entropy(model(input_ids=row[None], use_cache=False).logits[0, :-1].float(),
                                            row[1:], reduction="none") for row in rows]).double()


def paired_interval(differences: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width of paired per-window differences (t quantile for 12 windows, normal otherwise)."""
    quantile = T_975_DF11 if len(differences) == 12 else 1.96
    return float(differences.mean()), quantile * float(differences.std()) / len(differences) ** 0.5


class FirstTokenForced(RoutingController):
    """Diagnostic only: the learned router's decisions with every routed block's first token computed."""

    def prefill_decision(self, index: int) -> torch.Tensor:
        compute = super().prefill_decision(index)
        if not self.policy.routed(index):
            return compute
        return compute | first_valid_token(self.state.valid)


def compare(model, tokenizer, directory: Path, tolerance: float, at_c: float | None = None) -> dict:
    loaded = load(directory, tokenizer, next(model.parameters()).device)
    artifact, method, windows = loaded.artifact, loaded.method, loaded.windows.rescale
    schedule, scale, top = artifact["schedule"], artifact["schedule_scale"], method.max_block_sparsity
    row: dict = {"artifact": directory.name, "seed": method.seed}
    router = method.build_router().to(windows.device)
    for name, controller in (("learned", method.controller(model.config, schedule, router)),
                             ("first_forced", FirstTokenForced(model.config, method.policy(schedule), router,
                                                               seed=method.seed))):
        with routed_model(model, controller):
            if at_c is not None and name == "learned":
                scale = solve_scale(model, controller, schedule, windows, at_c, tolerance, 30, top).scale
                row["scale"] = scale
            controller.with_schedule(scaled_schedule(schedule, scale, top))
            measured = measure_routing(model, controller, windows, with_loss=True)
            if name == "learned":
                learned_windows = position_losses(model, windows).mean(1)
        row[f"{name}_c"], row[f"{name}_loss"] = measured["compute_sparsity"], measured["lm_loss"]
    static = RoutingController(model.config, method.policy(schedule, kind="static"), None)
    with routed_model(model, static):
        fits = {}
        for name in ("learned", "first_forced"):
            fit = fits[name] = solve_scale(model, static, schedule, windows, row[f"{name}_c"], tolerance, 30, top,
                                           with_loss=True)
            row[f"static_at_{name}_c"], row[f"static_loss_at_{name}_c"] = (fit.measured["compute_sparsity"],
                                                                             fit.measured["lm_loss"])
            row[f"{name}_minus_static"] = row[f"{name}_loss"] - fit.measured["lm_loss"]
            if name == "learned":  # the solver left the static router at the matched scale
                mean, half = paired_interval(learned_windows - position_losses(model, windows).mean(1))
                row["paired_mean"], row["paired_ci95_half_width"] = mean, half
        near = [(t["compute_sparsity"], t["lm_loss"]) for t in fits["learned"].history
                if abs(t["compute_sparsity"] - row["learned_c"]) < 0.03]
        if len(near) >= 2 and max(c for c, _ in near) - min(c for c, _ in near) > 0.002:
            c, loss = torch.tensor(near, dtype=torch.float64).T  # least-squares slope of loss in c
            row["static_slope_nats_per_unit_c"] = float(((c - c.mean()) * (loss - loss.mean())).sum()
                                                        / ((c - c.mean()) ** 2).sum())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0003)
    parser.add_argument("--at-c", type=float, default=None,
                        help="solve the learned router to this c (default: the artifact's inference scale)")
    args = parser.parse_args()
    directories = args.artifacts or committed_seeds()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    for directory in directories:
        row = compare(model, tokenizer, directory, args.tolerance, args.at_c)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
