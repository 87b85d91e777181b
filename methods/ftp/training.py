"""FTP's router training (methods.md §3 step 2): L = λ_g·L_g + λ_s·L_s + λ_d·L_d with the LLM frozen, straight-through
Gumbel gates and the skip simulated by gating (h + g·Δ) with skipped keys masked. Also the LM loss used as GA
fitness."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from methods.ftp.block import RoutingController


def guide_loss(p_compute: dict[int, torch.Tensor], static_compute: dict[int, torch.Tensor]) -> torch.Tensor:
    """L_g: BCE between P(compute) and the static router's decision, averaged over tokens and routed blocks."""
    losses = [F.binary_cross_entropy(p_compute[i], static_compute[i].to(p_compute[i].dtype)) for i in p_compute]
    return torch.stack(losses).mean() if losses else torch.zeros(())


def sparsity_loss(p_compute: dict[int, torch.Tensor], schedule: list[float],
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_s = Σ_i max(0, s_i - ŝ_i), ŝ_i the soft skip fraction of block i: only under-skipping is penalised."""
    terms = []
    for i, p in p_compute.items():
        skip = 1.0 - p
        achieved = skip[valid].mean() if valid is not None else skip.mean()
        terms.append(torch.relu(schedule[i] - achieved))
    return torch.stack(terms).sum() if terms else torch.zeros(())


def distillation_loss(hidden: torch.Tensor, dense_hidden: torch.Tensor) -> torch.Tensor:
    """L_d: MSE between the routed and the dense model's final block outputs."""
    return F.mse_loss(hidden.float(), dense_hidden.float())


def guide_weight(step: int, total_steps: int, start: float = 1.0, decay_fraction: float = 0.5) -> float:
    """λ_g: linear from `start` to 0 over the first `decay_fraction` of training, then 0."""
    horizon = max(1.0, decay_fraction * total_steps)
    return start * max(0.0, 1.0 - step / horizon)


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-3
    guide_weight_start: float = 1.0
    guide_decay_fraction: float = 0.5
    sparsity_weight: float = 1.0
    distill_weight: float = 1.0
    distill_target: str = "final_norm"  # "final_norm": last_hidden_state (LM-head input); "block_output": raw


def train_router(model, controller: RoutingController, windows: torch.Tensor, config: TrainConfig,
                 progress: bool = True) -> dict[str, list[float]]:
    """One epoch over `windows` [n, T] at batch size 1; returns the per-step loss history."""
    router = controller.router
    router.train()
    optimizer = torch.optim.Adam(router.parameters(), lr=config.learning_rate)
    history: dict[str, list[float]] = {"loss_total": [], "loss_guide": [], "loss_sparsity": [], "loss_distill": [],
                                       "guide_weight": []}
    device = next(model.parameters()).device
    bar = tqdm(range(len(windows)), desc="ftp: router training", disable=not progress)
    try:
        for step in bar:
            input_ids = windows[step:step + 1].to(device)
            controller.mode = "dense"
            with torch.no_grad():
                dense_hidden = _final_hidden(model, controller, input_ids, config.distill_target).detach()
            controller.mode, controller.sample_gates = "simulate", True
            with torch.enable_grad():
                hidden = _final_hidden(model, controller, input_ids, config.distill_target)
                record = controller.record
                l_guide = guide_loss(record.p_compute, record.static_compute)
                l_sparsity = sparsity_loss(record.p_compute, controller.schedule, controller.valid)
                l_distill = distillation_loss(hidden, dense_hidden)
                weight = guide_weight(step, len(windows), config.guide_weight_start, config.guide_decay_fraction)
                loss = weight * l_guide + config.sparsity_weight * l_sparsity + config.distill_weight * l_distill
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    optimizer.step()
            for key, value in (("loss_total", loss), ("loss_guide", l_guide), ("loss_sparsity", l_sparsity),
                               ("loss_distill", l_distill), ("guide_weight", weight)):
                history[key].append(float(value.detach() if isinstance(value, torch.Tensor) else value))
            recent = {k: sum(v[-20:]) / len(v[-20:]) for k, v in history.items() if k != "guide_weight"}
            bar.set_postfix(L_g=f"{recent['loss_guide']:.3f}", L_s=f"{recent['loss_sparsity']:.3f}",
                            L_d=f"{recent['loss_distill']:.3f}")
    finally:
        controller.mode, controller.sample_gates = "route", False
        controller.final_hidden = None
        router.eval()
    return history


def _final_hidden(model, controller: RoutingController, input_ids: torch.Tensor, target: str) -> torch.Tensor:
    """The distillation target: the decoder's last_hidden_state (after the final norm) or the raw last block output.

    SmolLM2's raw residual stream carries massive activations (rms ≈ 43, the first token ≈ 228, max |h| ≈ 3,400),
    which make a raw MSE ≈ 2,000 and drown λ_s = 1; the normed state is what the LM head reads."""
    normed = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return normed if target == "final_norm" else controller.final_hidden


def lm_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every position of the windows (one batched forward)."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()))
