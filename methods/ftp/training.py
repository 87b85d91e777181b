"""FTP's router training (methods.md §3 step 2) and the measurements calibration makes with a routed model.

The paper's loss is kept, L = λ_g·L_g + λ_s·L_s + λ_d·L_d with the LLM frozen, straight-through Gumbel gates and
the skip simulated by gating (h + g·Δ) with skipped keys masked. The paper leaves the recipe open; ours
(`TrainConfig`) is:

1. **Warm start on the teacher, guide loss only.** The static router routes training windows, each at a schedule
   scaled by a factor drawn from [scale_low, scale_high]; the router's four features and the static decision are
   logged per (token, routed block), and the router is fitted to them by BCE (L_g alone), each example weighted by
   1 + the attention its token receives, targets smoothed to 0.05/0.95, by minibatch Adam on standardised inputs
   (folded back into the first layer, so the router is unchanged in form); the BCE is computed from the logit
   difference, which cannot saturate (`weighted_bce`). A second round adds the static rule's
   labels in the states the fitted router's own routing produces and refits (DAgger). It starts as an imitation of
   its teacher that reads the sparsity input
   (the teacher's budget follows s_i) and computes the first token (the teacher always does; unweighted, that one
   example per row and block was lost among the others and the router skipped the attention sink).
2. **Joint training** with the three losses, again at a sampled schedule scale per window, so the sparsity input
   keeps carrying information. The simulation gates keys instead of masking them (each key's attention
   probabilities times its gate, renormalised: with hard gates exactly the mask), so L_d's gradient also sees what
   a skipped key was worth to the tokens attending to it. Three choices differ from a literal reading: ŝ_i is
   measured on the hard (straight-through) gates, so P ≈ 0.5 everywhere cannot satisfy L_s; L_d is KL(dense ‖
   routed) of the next-token distributions (nats per position, the scale of the LM loss; the MSE on SmolLM2's
   hidden states, even ÷ the dense variance, sat at 0.6-0.7 and joint training drifted from the warm start); and
   the optimiser works on standardised router inputs like the warm start (Adam's per-weight steps would otherwise
   be ~70× larger on the attention-score input than on the others), folded back afterwards.
3. **Model selection on held-out calibration text** (windows of the length inference sees): the router after the
   warm start and every `select_every` steps is scored by its LM loss at the target compute sparsity (schedule
   scale solved per candidate), and the best is kept, so the kept router is never worse than the warm start on that text.

In steps 1 and 2 each window is cut to a length drawn from [min_window, full] (`training_window`; `FTP`'s presets set
`train_min_seq_len`), so the router meets the range of attention scores that inference shows: the attention-score
input is a sum over queries and grows with the length, and a router fitted on one length skipped the attention
sink at longer ones (docs/experiments/ftp-router.md)."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from methods.ftp.block import RoutingController
from methods.ftp.router import TokenRouter


def guide_loss(p_compute: dict[int, torch.Tensor], static_compute: dict[int, torch.Tensor],
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_g: BCE between P(compute) and the static router's decision, averaged over tokens and routed blocks."""
    losses = []
    for i, p in p_compute.items():
        target = static_compute[i].to(p.dtype)
        losses.append(F.binary_cross_entropy(p[valid], target[valid]) if valid is not None
                      else F.binary_cross_entropy(p, target))
    return torch.stack(losses).mean() if losses else torch.zeros(())


def imitation_targets(decisions: torch.Tensor, scores: torch.Tensor,
                      config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed targets, weights ÷ their mean) of the warm start's BCE: each example weighted by 1 + the attention
    its token receives (its score input) when `warm_start_weighted`."""
    weights = 1.0 + scores.clamp(min=0) if config.warm_start_weighted else torch.ones_like(decisions)
    targets = decisions * (1 - 2 * config.warm_start_smoothing) + config.warm_start_smoothing
    return targets, weights / weights.mean()


def sparsity_loss(computed: dict[int, torch.Tensor], schedule, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_s = Σ_i max(0, s_i - ŝ_i), ŝ_i = 1 - mean of block i's compute gates (the straight-through
    hard gates in training): only under-skipping is penalised."""
    terms = []
    for i, gate in computed.items():
        skip = 1.0 - gate
        achieved = skip[valid].mean() if valid is not None else skip.mean()
        terms.append(torch.relu(schedule[i] - achieved))
    return torch.stack(terms).sum() if terms else torch.zeros(())


def distillation_loss(logits: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
    """L_d: KL(dense ‖ routed) of the next-token distributions, in nats per position (already on the scale of the LM
    loss the selection measures). The paper's MSE on the final hidden states sat at 0.6-0.7 on SmolLM2 even ÷ the
    dense variance, and joint training drifted from the warm start (docs/experiments/ftp-router.md)."""
    return F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, -2),
                    F.log_softmax(dense_logits.float(), -1).flatten(0, -2), log_target=True, reduction="batchmean")


def guide_weight(step: int, total_steps: int, start: float = 1.0, decay_fraction: float = 0.5) -> float:
    """λ_g: linear from `start` to 0 over the first `decay_fraction` of training, then 0."""
    horizon = max(1.0, decay_fraction * total_steps)
    return start * max(0.0, 1.0 - step / horizon)


@dataclass(frozen=True)
class TrainConfig:
    """The router-training recipe, as `methods.ftp.FTP.train_config` resolves it from FTP's fields and preset (the
    one source of its values: no defaults here)."""

    learning_rate: float
    guide_weight_start: float
    guide_decay_fraction: float
    sparsity_weight: float
    distill_weight: float
    scale_low: float  # schedule scale drawn per training window from [scale_low, scale_high]
    scale_high: float
    max_sparsity: float
    warm_start_steps: int  # minibatch Adam steps of the guide-only warm start
    warm_start_lr: float
    warm_start_batch: int
    warm_start_weighted: bool  # BCE weights 1 + attention received
    warm_start_smoothing: float  # teacher targets 0.05 / 0.95: logits stay where Gumbel gradients live
    warm_start_rounds: int  # 1 + rounds of labels collected while the learned router routes (DAgger)
    select_every: int  # joint-training steps between held-out model-selection checks
    min_window: int  # 0: every training window at full length; else cut to a length drawn from [min_window, full]


def sampled_schedule(schedule, rng: random.Random, config: TrainConfig) -> tuple[float, ...]:
    """The schedule scaled by a factor drawn uniformly from [scale_low, scale_high], clipped to [0, max]."""
    scale = rng.uniform(config.scale_low, config.scale_high)
    return tuple(min(config.max_sparsity, max(0.0, s * scale)) for s in schedule)


def training_window(row: torch.Tensor, rng: random.Random, config: TrainConfig) -> torch.Tensor:
    """A training row as the router meets it: whole, or (`config.min_window`) its first L tokens, L drawn uniformly
    from [min_window, len(row)], so the router trains on the range of lengths, and so of attention scores, it routes
    at inference: the score input is a sum over the queries that see a token and grows with N (the attention sink's
    reads up to 120-160 at 512 tokens, about twice what 256-token windows show; experiments/ftp/sink_scores.py)."""
    if not config.min_window:
        return row
    return row[: rng.randint(min(config.min_window, len(row)), len(row))]


def teacher_features(model, controller: RoutingController, windows: torch.Tensor, rng: random.Random,
                     config: TrainConfig, progress: bool = True,
                     kind: str = "static") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [M, 4], static decisions [M]) over every (valid token, routed block) of `windows`, each window at
    a sampled schedule scale, routed by the static router (`kind="static"`) or by the learned router itself
    (`kind="learned"`: its own states, the static rule's labels)."""
    base = controller.policy
    controller.feature_log = []
    device = next(model.parameters()).device
    try:
        for row in tqdm(windows, desc=f"ftp: teacher labels ({kind} routing)", disable=not progress):
            controller.policy = replace(base, kind=kind, log_features=True,
                                        schedule=sampled_schedule(base.schedule, rng, config))
            with torch.inference_mode():
                model.model(input_ids=training_window(row, rng, config)[None].to(device), use_cache=False)
        features = torch.cat([f for f, _ in controller.feature_log])
        decisions = torch.cat([d for _, d in controller.feature_log]).float()
    finally:
        controller.policy, controller.feature_log = base, []
        controller.reset_stats()
    return features, decisions


@contextmanager
def standardised_inputs(router: TokenRouter, mean: torch.Tensor, std: torch.Tensor) -> Iterator[None]:
    """Train the router in standardised input coordinates (the attention score runs to ~70 where the other inputs
    stay in [0, 1], so Adam's per-weight steps would be ~70× larger on that input): the first layer is re-expressed
    for (x − μ)/σ and the router standardises its inputs while inside; on exit the standardisation is folded back
    into the first layer, so the router is unchanged in form (w·(x − μ)/σ + b = (w/σ)·x + b − (w/σ)·μ)."""
    first = router.net[0]
    mean, std = mean.to(first.weight), std.to(first.weight)
    with torch.no_grad():
        first.bias += first.weight @ mean
        first.weight *= std
    handle = router.register_forward_pre_hook(lambda _module, args: ((args[0] - mean) / std,))
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            first.weight /= std
            first.bias -= first.weight @ mean


def feature_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input mean and standard deviation (1 where an input is constant)."""
    std = features.std(0)
    return features.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std))


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted BCE of P(compute) = softmax(logits)[..., 0] = sigmoid(l_compute − l_skip) against `targets`, computed
    from the logit difference (log-sum-exp form), so its gradient is the true ±(1 − smoothing)·weight even on
    saturated wrong predictions, where the probability form's vanishes or explodes (PyTorch clamps P(1 − P) at
    1e-12; docs/experiments/ftp-router.md)."""
    return F.binary_cross_entropy_with_logits(logits[..., 0] - logits[..., 1], targets, weight=weights)


def warm_start(router: TokenRouter, features: torch.Tensor, decisions: torch.Tensor, config: TrainConfig,
               seed: int = 0, progress: bool = True) -> list[float]:
    """Fit the router to the teacher's decisions by BCE alone: Adam on random minibatches, cosine-decayed learning
    rate. Each example is weighted by 1 + the attention its token receives (its score input), so a mistake on a
    token other tokens attend to (above all the first one, the attention sink: one example per row and block)
    costs what skipping its key would. Returns the minibatch loss per step."""
    device = next(router.parameters()).device
    features, decisions = features.to(device), decisions.to(device)
    targets, weights = imitation_targets(decisions, features[:, 1], config)
    optimizer = torch.optim.Adam(router.parameters(), lr=config.warm_start_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, config.warm_start_steps))
    generator = torch.Generator().manual_seed(seed)
    batch = min(config.warm_start_batch, len(features))
    history = []
    router.train()
    # A better-conditioned fit on standardised inputs, folded back afterwards (same router).
    with torch.enable_grad(), standardised_inputs(router, *feature_moments(features)):
        for _ in tqdm(range(config.warm_start_steps), desc="ftp: warm start (guide loss)", disable=not progress):
            index = torch.randint(0, len(features), (batch,), generator=generator).to(device)
            loss = weighted_bce(router(features[index]).float(), targets[index], weights[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(float(loss.detach()))
    router.eval()
    return history


def imitate_teacher(model, controller: RoutingController, windows: torch.Tensor, rng: random.Random,
                    config: TrainConfig, seed: int = 0,
                    progress: bool = True) -> tuple[list[float], tuple[torch.Tensor, torch.Tensor]]:
    """The warm start: fit the router to the static router's decisions in the states the static router produces,
    then, for `warm_start_rounds - 1` more rounds, add the static rule's labels in the states the fitted router's
    own routing produces and refit on everything (DAgger). One round alone leaves a feedback loop: a token the
    router skips in one block keeps a stale attention score in the next, a state the teacher never shows it (the
    first token, skipped at block 1 while its score is still block 0's, was then skipped everywhere). Returns the
    minibatch losses of all rounds and the inputs' moments (mean, std) over everything fitted."""
    features, decisions = teacher_features(model, controller, windows, rng, config, progress)
    history = warm_start(controller.router, features, decisions, config, seed, progress)
    for round_ in range(1, config.warm_start_rounds):
        own_features, own_decisions = teacher_features(model, controller, windows, rng, config, progress,
                                                       kind="learned")
        features, decisions = torch.cat([features, own_features]), torch.cat([decisions, own_decisions])
        history += warm_start(controller.router, features, decisions, config, seed + round_, progress)
    return history, feature_moments(features)


def train_router(model, controller: RoutingController, windows: torch.Tensor, config: TrainConfig,
                 moments: tuple[torch.Tensor, torch.Tensor],
                 select: Callable[[], dict[str, float]] | None = None, rng: random.Random | None = None,
                 progress: bool = True) -> dict[str, list]:
    """Joint training, one epoch over `windows` [n, T] at batch size 1; returns the per-step loss history and, with
    `select` (held-out score of the current router, lower is better, under "loss"), the selection history. The
    router ends holding the best-scored weights (the starting ones included). The optimiser works on inputs
    standardised by `moments` (the warm start's: `imitate_teacher` returns them)."""
    router = controller.router
    rng = rng or random.Random(0)
    optimizer = torch.optim.Adam(router.parameters(), lr=config.learning_rate)
    history: dict[str, list] = {"loss_total": [], "loss_guide": [], "loss_sparsity": [], "loss_distill": [],
                                "guide_weight": [], "achieved_skip": [], "selection": []}
    best: tuple[float, dict] | None = None

    def check(step: int) -> None:
        nonlocal best
        if select is None:
            return
        router.eval()
        score = select()
        router.train()
        history["selection"].append({"step": step, **score})
        if best is None or score["loss"] < best[0]:
            best = (score["loss"], copy.deepcopy(router.state_dict()))

    with standardised_inputs(router, *moments):  # the selection snapshots are taken and restored in these coordinates
        _joint_epoch(model, controller, windows, config, optimizer, history, check, rng, progress)
        if best is not None:
            router.load_state_dict(best[1])
    return history


def _joint_epoch(model, controller: RoutingController, windows: torch.Tensor, config: TrainConfig, optimizer,
                 history: dict[str, list], check: Callable[[int], None], rng: random.Random, progress: bool) -> None:
    router, base = controller.router, controller.policy
    device = next(model.parameters()).device
    check(0)
    bar = tqdm(range(len(windows)), desc="ftp: router training", disable=not progress)
    router.train()
    try:
        for step in bar:
            controller.policy = replace(base, schedule=sampled_schedule(base.schedule, rng, config))
            input_ids = training_window(windows[step], rng, config)[None].to(device)
            with torch.no_grad(), controller.dense():
                dense_logits = model(input_ids=input_ids, use_cache=False).logits.detach()
            with torch.enable_grad(), controller.simulating(sample_gates=True) as sim:
                logits = model(input_ids=input_ids, use_cache=False).logits
                valid = controller.state.valid
                l_guide = guide_loss(sim.p_compute, sim.static_compute, valid)
                l_sparsity = sparsity_loss(sim.gates, controller.policy.schedule, valid)
                l_distill = distillation_loss(logits, dense_logits)
                weight = guide_weight(step, len(windows), config.guide_weight_start, config.guide_decay_fraction)
                loss = weight * l_guide + config.sparsity_weight * l_sparsity + config.distill_weight * l_distill
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    optimizer.step()
                skip = [float(1 - g.detach()[valid].float().mean()) for g in sim.gates.values()]
            for key, value in (("loss_total", loss), ("loss_guide", l_guide), ("loss_sparsity", l_sparsity),
                               ("loss_distill", l_distill), ("guide_weight", weight),
                               ("achieved_skip", sum(skip) / max(1, len(skip)))):
                history[key].append(float(value.detach() if isinstance(value, torch.Tensor) else value))
            recent = {k: sum(v[-20:]) / len(v[-20:]) for k, v in history.items()
                      if k not in ("guide_weight", "selection")}
            bar.set_postfix(L_g=f"{recent['loss_guide']:.3f}", L_s=f"{recent['loss_sparsity']:.3f}",
                            L_d=f"{recent['loss_distill']:.3f}", skip=f"{recent['achieved_skip']:.3f}")
            if config.select_every and (step + 1) % config.select_every == 0 and step + 1 < len(windows):
                check(step + 1)
        check(len(windows))
    finally:
        controller.policy = base
        router.eval()


def lm_loss(model, input_ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every position of the windows (one batched forward)."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()))
