"""SDTP predictor training on the frozen LLM (masking is allowed here: nothing is timed or counted).

Per sequence, two passes:
1. marking: gradient × hidden-state saliency at every stage layer, π̂ = |(∂T/∂h)·h| per token with
   T = summed next-token log-likelihood, divided by the per-sequence maximum;
2. the pruned forward simulated with attention masks: before each stage layer the predictor scores the tokens
   still present, Gumbel-top-k keeps ⌈r^s·N⌉ of them (protected tokens always), and dropped tokens are masked
   as keys for every later layer. The mask multiplies exp(scores) inside the softmax, so the straight-through
   keep decision receives the language-modelling gradient even where it is 0.
Loss = L_cls (next-token CE at the positions that survive every stage) + Σ_stages (L_mse + L_r).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface

from methods.sdtp.pruning import SaliencyPredictor, keep_logit, protected_positions, select_kept, stage_budget
from methods.token_subsets import additive_mask, layer_type, rotary_tables, sliding_window, visible_keys

MASKED_ATTENTION = "sdtp_masked"


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def masked_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with a multiplicative keep matrix `attention_mask` [batch, 1, q, k] (zero above the
    diagonal): softmax weights ∝ exp(s_ij)·M_ij. None: plain causal attention."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True).detach()) * attention_mask.to(scores.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(MASKED_ATTENTION, masked_attention)


def _ranked_pairs(saliency: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign(π̂_i − π̂_j), the pairs i<j of valid tokens with different saliency) as [batch, N, N] tensors."""
    sign = torch.sign(saliency[:, :, None] - saliency[:, None, :])
    n = saliency.shape[1]
    pairs = (sign != 0) & torch.ones(n, n, dtype=torch.bool, device=saliency.device).triu(1)
    if valid is not None:
        pairs &= valid[:, :, None] & valid[:, None, :]
    return sign, pairs


def ranking_loss(scores: torch.Tensor, saliency: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise logistic ranking loss: mean over pairs i<j with different saliency of
    log(1 + exp(−(π_i − π_j)·sign(π̂_i − π̂_j))). Zero only in the limit of an infinite margin."""
    diff = scores[:, :, None] - scores[:, None, :]
    sign, pairs = _ranked_pairs(saliency, valid)
    if not bool(pairs.any()):
        return scores.sum() * 0.0
    return F.softplus(-diff * sign)[pairs].mean()


class HandRun:
    """The decoder run layer by hand over a full sequence (no padding), as the model's own forward would: embeddings
    (Gemma's scaled ones included), each layer's RoPE table and sliding window (methods.token_subsets). Masks are
    the multiplicative keep matrices `masked_attention` takes (None: plain causal); under another attention kernel
    a hard keep matrix becomes the additive mask that kernel takes."""

    def __init__(self, model, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> None:
        self.model = model
        self.hidden = model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        self.positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        self.tables = rotary_tables(model, self.hidden, self.positions)
        self._windows: dict[int, torch.Tensor] = {}

    def layer(self, index: int, hidden: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Layer `index` on `hidden`, with key-keep matrix `keep` [B, 1, N, N] (None: every key)."""
        layer = self.model.model.layers[index]
        window = sliding_window(layer)
        if window is not None:
            if window not in self._windows:
                self._windows[window] = visible_keys(self.positions, self.positions, window)[:, None]
            inside = self._windows[window].to(hidden.dtype)
            keep = inside if keep is None else keep * inside
        if keep is not None and self.model.config._attn_implementation != MASKED_ATTENTION:
            # another kernel takes additive masks: only hard keep matrices have one
            keep = additive_mask(keep[:, 0] > 0, hidden.dtype)
        return layer(hidden, attention_mask=keep, position_ids=self.positions,
                     position_embeddings=self.tables[layer_type(self.model, index)])


def token_saliency(model, input_ids: torch.Tensor, stage_layers: list[int]) -> torch.Tensor:
    """The marking pass: [stages, batch, N] normalised |(∂T/∂h_ℓ)·h_ℓ| on the full frozen model."""
    with torch.enable_grad():
        embeds = model.model.embed_tokens(input_ids).detach().requires_grad_(True)
        run = HandRun(model, input_ids, embeds)
        hidden = run.hidden
        captured = []
        for index in range(len(model.model.layers)):
            if index in stage_layers:
                captured.append(hidden)
            hidden = run.layer(index, hidden)
        logits = model.lm_head(model.model.norm(hidden[:, :-1]))
        log_likelihood = F.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).sum()
        grads = torch.autograd.grad(log_likelihood, captured)
    saliency = torch.stack([(g * h).sum(-1).abs().float() for g, h in zip(grads, captured, strict=True)]).detach()
    return saliency / saliency.amax(-1, keepdim=True).clamp_min(torch.finfo(saliency.dtype).tiny)


@dataclass(frozen=True)
class PruningPlan:
    """Stage layout and selection rule shared by training and the simulated forward."""

    stage_layers: tuple[int, ...]
    keep_ratio: float
    protect_first: int
    protect_last_fraction: float


@dataclass
class SimulatedForward:
    hidden: torch.Tensor  # final hidden state before the norm, [batch, N, d]
    survivors: torch.Tensor  # [batch, N] bool, kept by every stage
    stage_scores: list[torch.Tensor]  # keep logits per stage, [batch, N]
    stage_eligible: list[torch.Tensor]  # tokens present before each stage, [batch, N] bool


def simulated_forward(model, predictors: dict[int, SaliencyPredictor], input_ids: torch.Tensor,
                      plan: PruningPlan, generator: torch.Generator | None = None,
                      tau: float = 1.0, scored: torch.Tensor | None = None) -> SimulatedForward:
    """The pruned forward with masks instead of gathers. Without `generator` there is no Gumbel noise and the
    decisions are exactly those of inference. Needs the model's attention set to MASKED_ATTENTION."""
    batch, seq_len = input_ids.shape
    layers = model.model.layers
    first = plan.stage_layers[0]
    with torch.no_grad():
        run = HandRun(model, input_ids)
        hidden = run.hidden
        for index in range(first):
            hidden = run.layer(index, hidden)
    protected = protected_positions(batch, seq_len, seq_len, plan.protect_first, plan.protect_last_fraction,
                                    scored, input_ids.device)
    present = torch.ones(batch, seq_len, dtype=torch.bool, device=input_ids.device)
    keep = torch.ones(batch, seq_len, dtype=hidden.dtype, device=input_ids.device)
    diagonal = torch.eye(seq_len, dtype=torch.bool, device=input_ids.device)
    causal = torch.ones(seq_len, seq_len, dtype=hidden.dtype, device=input_ids.device).tril()
    mask = None
    stage_scores, stage_eligible = [], []
    for index in range(first, len(layers)):
        if index in predictors:
            stage = plan.stage_layers.index(index) + 1
            scores = keep_logit(predictors[index](hidden.detach()))
            stage_scores.append(scores)
            stage_eligible.append(present)
            perturbed = scores
            if generator is not None:
                uniform = torch.rand(scores.shape, generator=generator, device=generator.device)
                uniform = uniform.to(scores.device).clamp(1e-6, 1 - 1e-6)
                perturbed = scores + torch.log(uniform) - torch.log1p(-uniform)  # logistic = Gumbel − Gumbel
            kept = select_kept(perturbed, protected, stage_budget(plan.keep_ratio, stage, seq_len), present)
            hard = torch.zeros_like(keep).scatter_(1, kept, 1.0)
            soft = torch.sigmoid(perturbed / tau).to(keep.dtype)
            decision = torch.where(protected, torch.ones_like(hard), hard + soft - soft.detach())
            keep = keep * decision
            present = hard.bool()
            mask = torch.where(diagonal, torch.ones_like(causal), causal * keep[:, None, :])[:, None]
        hidden = run.layer(index, hidden, mask)
    return SimulatedForward(hidden=hidden, survivors=present, stage_scores=stage_scores,
                            stage_eligible=stage_eligible)


@dataclass(frozen=True)
class TrainingSettings:
    epochs: int
    learning_rate: float
    weight_decay: float
    tau: float
    seed: int
    progress: bool = True


def train_predictors(model, predictors: dict[int, SaliencyPredictor], input_ids: torch.Tensor,
                     plan: PruningPlan, settings: TrainingSettings) -> dict[str, float]:
    """AdamW on the predictors only, batch 1; saliencies are computed once and reused in later epochs.
    Returns the mean losses over the last 10% of steps (at least 10) and the step count."""
    device = next(model.parameters()).device
    params = [p for predictor in predictors.values() for p in predictor.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    saliency_cache: dict[int, torch.Tensor] = {}
    history: list[tuple[float, float, float, float]] = []
    original_attention = model.config._attn_implementation
    total_steps = settings.epochs * len(input_ids)
    start = time.perf_counter()
    model.set_attn_implementation(MASKED_ATTENTION)
    try:
        bar = tqdm(total=total_steps, desc="sdtp: predictor training", disable=not settings.progress)
        for _epoch in range(settings.epochs):
            for row in torch.randperm(len(input_ids), generator=generator).tolist():
                ids = input_ids[row: row + 1].to(device)
                if row not in saliency_cache:
                    saliency_cache[row] = token_saliency(model, ids, list(plan.stage_layers)).cpu()
                saliency = saliency_cache[row].to(device)
                with torch.enable_grad():
                    losses = _step_losses(model, predictors, ids, saliency, plan, generator, settings.tau)
                    total = losses[0] + losses[1] + losses[2]
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                optimizer.step()
                history.append((float(total.detach()), *(float(x.detach()) for x in losses)))
                recent = history[-20:]
                bar.set_postfix(loss=f"{sum(h[0] for h in recent) / len(recent):.3f}",
                                cls=f"{sum(h[1] for h in recent) / len(recent):.3f}",
                                mse=f"{sum(h[2] for h in recent) / len(recent):.4f}",
                                rank=f"{sum(h[3] for h in recent) / len(recent):.3f}")
                bar.update(1)
        bar.close()
    finally:
        model.set_attn_implementation(original_attention)
    tail = history[-max(10, len(history) // 10):]
    first = history[: max(10, len(history) // 10)]
    summary = {f"final_{name}": sum(h[i] for h in tail) / len(tail)
               for i, name in enumerate(("loss", "cls_loss", "mse_loss", "rank_loss"))}
    summary.update({f"initial_{name}": sum(h[i] for h in first) / len(first)
                    for i, name in enumerate(("loss", "cls_loss", "mse_loss", "rank_loss"))})
    summary["steps"] = len(history)
    summary["seconds"] = time.perf_counter() - start
    return summary


def _step_losses(model, predictors, ids, saliency, plan, generator, tau) -> tuple[torch.Tensor, ...]:
    """(L_cls, Σ_stages L_mse, Σ_stages L_r) of one sequence."""
    sim = simulated_forward(model, predictors, ids, plan, generator=generator, tau=tau)
    mse = ranking = sim.hidden.new_zeros(())
    for stage, (scores, present) in enumerate(zip(sim.stage_scores, sim.stage_eligible, strict=True)):
        mse = mse + F.mse_loss(torch.sigmoid(scores)[present], saliency[stage][present])
        ranking = ranking + ranking_loss(scores, saliency[stage], present)
    predicting = sim.survivors[:, :-1]
    hidden = model.model.norm(sim.hidden[:, :-1][predicting])
    logits = model.lm_head(hidden).float()
    cls = F.cross_entropy(logits, ids[:, 1:][predicting])
    return cls, mse, ranking


def pairwise_agreement(scores: torch.Tensor, saliency: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """(share of token pairs the scores order as the saliency does, number of pairs): over pairs i<j of valid
    tokens with different saliency; a tie in the scores counts one half. 0.5 is a random ranking."""
    sign_true, pairs = _ranked_pairs(saliency, valid)
    sign_pred = torch.sign(scores[:, :, None] - scores[:, None, :])
    agree = (sign_pred == sign_true).float() + 0.5 * (sign_pred == 0).float()
    count = int(pairs.sum())
    return (float(agree[pairs].sum()) / count if count else float("nan")), count


def ranking_accuracy(model, predictors: dict[int, SaliencyPredictor], input_ids: torch.Tensor,
                     plan: PruningPlan) -> list[float]:
    """Per stage, the predictor's pairwise order agreement with the gradient saliency (`token_saliency`, the
    training target) over the tokens present at that stage, pooled over the rows of `input_ids` (rows the
    predictors were not trained on), in the decisions of inference (no Gumbel noise)."""
    device = next(model.parameters()).device
    agreed = [0.0] * len(plan.stage_layers)
    counted = [0] * len(plan.stage_layers)
    original_attention = model.config._attn_implementation
    model.set_attn_implementation(MASKED_ATTENTION)
    try:
        for row in range(len(input_ids)):
            ids = input_ids[row: row + 1].to(device)
            saliency = token_saliency(model, ids, list(plan.stage_layers))
            with torch.no_grad():
                sim = simulated_forward(model, predictors, ids, plan)
            for stage, (scores, present) in enumerate(zip(sim.stage_scores, sim.stage_eligible, strict=True)):
                share, count = pairwise_agreement(scores.float(), saliency[stage], present)
                if count:
                    agreed[stage] += share * count
                    counted[stage] += count
    finally:
        model.set_attn_implementation(original_attention)
    return [a / c if c else float("nan") for a, c in zip(agreed, counted, strict=True)]
