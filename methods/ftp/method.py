"""FTP — "A Fine-grained Token-wise Pruner for Large Language Models via Token Routing" (arXiv 2412.11494).

Before every decoder block a router decides per token compute or skip (methods.md §3). Calibration has three steps:
a genetic-algorithm search of the per-block sparsity schedule with the static router, router training with the
frozen LLM (guide + sparsity-constraint + distillation losses), and a GA fine-tune of the schedule with the trained
router. The artifact is the schedule, the router weights and the search/training history.

Budgets (`preset`):
- "paper": methods.md's defaults — GA population 32 × 30 generations, router trained on 2,000 sequences of 512
  tokens, schedule fine-tuned for 10 generations; fitness on 8 held-out 512-token windows, rescale measured on 16
  others. Hours on a CPU.
- "cpu": about 20 minutes on 2 cores for SmolLM2-135M — population 16 × 10 generations scored on 4 held-out
  windows of 256 tokens, 480 training sequences of 256 tokens at lr 5e-3 (fewer steps, larger steps), 3 fine-tune
  generations, rescale measured on 12 held-out 512-token windows. It gives up search breadth (a schedule that beats
  uniform but is not converged), a router trained on a quarter of the paper's sequences at half the length (its
  position and rank inputs are normalised, so it transfers to 512-token inputs), and a noisier fitness.
Each budget field can still be set by hand; the preset only fills the ones left at None.

Variants (registry): ftp-static (static router only), ftp-uniform (uniform schedule, no search), ftp-random
(random skipping at the searched schedule), ftp-nopos / ftp-nosparsity (router without that input; ftp-nosparsity
uses top-k budgets, since without the sparsity input rescaling the schedule cannot move an argmax router), ftp-topk
(the learned router with exact top-k budgets instead of argmax: the matched-sparsity reading on any text), ftp-sink
(ftp-topk's artifact with the first token always computed inside the budget: `keep_first_token`, an inference-time
rule outside the paper).

Evaluation: routing depends on the whole sequence, so the evaluator must send unpadded rows (`sequence_dependent`).
Padding, if present, is never computed in blocks 1..L-1 and never counts toward a budget. Cached generation works
for batch size 1: each block's cache holds only its computed tokens and each new token is routed per block with
P(compute) >= `decode_threshold`; its quality differs from prefill routing (the paper's LLaMA2-7B WikiText-2
perplexity rose from 5.47 to 11.12), so `stats()` reports decoding separately. `output_hidden_states` is not
supported while applied (the wrapped layers run on gathered rows).

Matching the target (methods.md §5): the GA runs at the schedule mean S for the target c; then the schedule is
scaled until c measured on held-out calibration windows is within `rescale_tolerance`. Should no scale bring an
argmax router there, the P(compute) threshold is moved from 0.5 instead (outside the paper; recorded as
`compute_threshold` in the artifact and in `stats()`).

Artifact: schedule (searched), searched_schedule (before fine-tuning), inference_schedule (rescaled),
schedule_scale, compute_threshold, schedule_mean, target/measured compute and token sparsity, rescale_history,
GA histories (ga_/finetune_ best/mean fitness per generation), per-step losses (loss_total, loss_guide,
loss_sparsity, loss_distill, guide_weight) and the router weights as tensors "router.net.*"."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from bench.flops import LayerFlopCoefficients
from methods.base import CalibrationSet, Knob, Method, MethodConfigError, MethodStats
from methods.ftp.block import ROUTERS, SELECTIONS, RoutingController, routed_model
from methods.ftp.router import TokenRouter, keep_count
from methods.ftp.schedule import (
    GAConfig,
    genetic_search,
    scaled_schedule,
    token_sparsity_for_compute,
    uniform_schedule,
)
from methods.ftp.training import TrainConfig, lm_loss, train_router

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"elites": 4, "holdout_windows": 24, "population": 32, "generations": 30, "finetune_generations": 10,
              "train_sequences": 2000, "train_seq_len": 512, "learning_rate": 1e-3, "fitness_windows": 8,
              "fitness_seq_len": 512, "rescale_windows": 16},
    "cpu": {"elites": 4, "holdout_windows": 16, "population": 16, "generations": 10, "finetune_generations": 3,
            "train_sequences": 480, "train_seq_len": 256, "learning_rate": 5e-3, "fitness_windows": 4,
            "fitness_seq_len": 256, "rescale_windows": 12},
    # seconds on the tiny test model (tests only)
    "test": {"elites": 2, "learning_rate": 1e-3, "population": 4, "generations": 2, "finetune_generations": 1, "train_sequences": 4,
             "train_seq_len": 32, "fitness_windows": 1, "fitness_seq_len": 32, "rescale_windows": 1,
             "holdout_windows": 2},
}
ROUTER_PREFIX = "router."


@dataclass
class RescaleResult:
    """The schedule scale (and, as a fallback, the P(compute) threshold) that best fits the target."""

    scale: float = 1.0
    threshold: float = 0.5
    measured: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def error(self, target: float) -> float:
        return self.measured["compute_sparsity"] - target if self.measured else math.inf


@dataclass
class FTP(Method):
    """`sparsity` is the target compute sparsity c; the GA runs at the schedule mean S given by methods.md §5 at
    `reference_seq_len`, and the final schedule is rescaled until c measured on held-out calibration windows is
    within `rescale_tolerance` of the target."""

    preset: str = "cpu"
    router: str = "learned"  # "learned" (FTP), "static" (first token + most recent), "random"
    schedule: str = "searched"  # "searched" (GA) or "uniform"
    selection: str = "argmax"  # "argmax" (the paper's rule) or "topk" (exact budgets ⌈(1 - s_i)·N⌉)
    position_input: bool = True
    sparsity_input: bool = True
    router_hidden: int = 64
    reference_seq_len: int = 512
    max_block_sparsity: float = 0.9
    # genetic algorithm (None: from the preset)
    population: int | None = None
    generations: int | None = None
    finetune_generations: int | None = None
    elites: int | None = None
    tournament_size: int = 3
    mutation_delta: float = 0.1
    mutation_prob: float = 0.8
    holdout_windows: int | None = None
    fitness_windows: int | None = None
    fitness_seq_len: int | None = None
    # router training
    train_sequences: int | None = None
    train_seq_len: int | None = None
    learning_rate: float | None = None
    gumbel_tau: float = 1.0
    guide_weight_start: float = 1.0
    guide_decay_fraction: float = 0.5
    sparsity_loss_weight: float = 1.0
    distill_loss_weight: float = 1.0
    distill_target: str = "final_norm"  # "final_norm" (last_hidden_state) or "block_output" (raw residual stream)
    # matching the target and inference
    rescale_windows: int | None = None
    rescale_tolerance: float = 0.005
    rescale_iterations: int = 12
    decode_threshold: float = 0.5
    # Inference only, outside the paper: the learned router also computes each row's first token (the attention
    # sink) in every block, inside the top-k budget. Calibration ignores it, so `ftp-sink` (top-k) runs ftp-topk's
    # artifact: the committed router, trained by the paper's losses, skips the first token in all 29 routed blocks
    # (the static router keeps it by rule). With argmax the extra token changes later blocks' attention table and
    # the router then computes more (c 0.20 instead of 0.25 on the probe): the target is no longer matched.
    keep_first_token: bool = False
    progress: bool = True

    name: ClassVar[str] = "ftp"
    version: ClassVar[str] = "1"
    needs_calibration: ClassVar[bool] = True
    calibration_ignores: ClassVar[tuple[str, ...]] = ("decode_threshold", "keep_first_token", "progress")
    sequence_dependent: ClassVar[bool] = True
    # Enough windows for the paper preset's 2,000 training sequences plus the held-out rows; "cpu" uses a subset.
    default_calibration: ClassVar[dict] = {"n_samples": 2048, "seq_len": 512, "source": "c4-all"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise MethodConfigError(f"ftp: preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.router not in ROUTERS:
            raise MethodConfigError(f"ftp: router must be one of {ROUTERS}, got {self.router!r}")
        if self.schedule not in ("searched", "uniform"):
            raise MethodConfigError(f"ftp: schedule must be 'searched' or 'uniform', got {self.schedule!r}")
        if self.selection not in SELECTIONS:
            raise MethodConfigError(f"ftp: selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0.0 < self.max_block_sparsity < 1.0:
            raise MethodConfigError("ftp: max_block_sparsity must be in (0, 1), e.g. 0.9")
        positive = ("router_hidden", "reference_seq_len", "population", "holdout_windows", "fitness_windows",
                    "fitness_seq_len", "train_sequences", "train_seq_len", "rescale_windows", "rescale_iterations")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise MethodConfigError(f"ftp: {key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("generations", "finetune_generations", "elites"):
            if int(getattr(self, key)) < 0:
                raise MethodConfigError(f"ftp: {key} must be >= 0, got {getattr(self, key)!r}")
        if self.elites >= self.population:
            raise MethodConfigError(f"ftp: elites ({self.elites}) must be fewer than population ({self.population})")
        if self.tournament_size < 1:
            raise MethodConfigError("ftp: tournament_size must be >= 1, e.g. 3")
        if self.fitness_windows + self.rescale_windows > self.holdout_windows:
            raise MethodConfigError(
                f"ftp: holdout_windows ({self.holdout_windows}) must cover fitness_windows ({self.fitness_windows}) "
                f"+ rescale_windows ({self.rescale_windows}); raise holdout_windows")
        for key in ("mutation_delta", "mutation_prob", "learning_rate", "gumbel_tau", "guide_decay_fraction"):
            if not float(getattr(self, key)) > 0:
                raise MethodConfigError(f"ftp: {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("guide_weight_start", "sparsity_loss_weight", "distill_loss_weight"):
            if float(getattr(self, key)) < 0:
                raise MethodConfigError(f"ftp: {key} must be >= 0, got {getattr(self, key)!r}")
        if self.distill_target not in ("final_norm", "block_output"):
            raise MethodConfigError(f"ftp: distill_target must be 'final_norm' or 'block_output', "
                                    f"got {self.distill_target!r}")
        if not 0.0 < self.rescale_tolerance <= 0.02:
            raise MethodConfigError("ftp: rescale_tolerance must be in (0, 0.02] (the benchmark's matching band)")
        if self.keep_first_token and self.router != "learned":
            raise MethodConfigError("ftp: keep_first_token applies to the learned router only (the static router "
                                    "keeps the first token by rule); drop it or use router='learned'")
        if not 0.0 < self.decode_threshold < 1.0:
            raise MethodConfigError("ftp: decode_threshold must be in (0, 1), e.g. 0.5")

    # -- calibration ------------------------------------------------------------------------------------------
    def schedule_mean(self, config) -> float:
        """Mean token sparsity S for the target compute sparsity (methods.md §5)."""
        return token_sparsity_for_compute(self.sparsity, config, self.reference_seq_len)

    def ga_config(self, generations: int) -> GAConfig:
        return GAConfig(population=self.population, generations=generations, elites=self.elites,
                        tournament_size=self.tournament_size, mutation_delta=self.mutation_delta,
                        mutation_prob=self.mutation_prob, max_sparsity=self.max_block_sparsity)

    def controller(self, config, schedule: list[float], router: TokenRouter | None) -> RoutingController:
        return RoutingController(config, schedule, router, kind=self.router, selection=self.selection,
                                 use_position=self.position_input, use_sparsity=self.sparsity_input,
                                 decode_threshold=self.decode_threshold, gumbel_tau=self.gumbel_tau, seed=self.seed)

    def calibrate(self, model, tokenizer, calibration: CalibrationSet) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        config = model.config
        num_blocks = config.num_hidden_layers
        mean = self.schedule_mean(config)
        if mean * num_blocks / max(1, num_blocks - 1) > self.max_block_sparsity:
            raise MethodConfigError(f"ftp: sparsity {self.sparsity} needs more than max_block_sparsity "
                                    f"{self.max_block_sparsity} per block; lower the sparsity")
        train_set, holdout = calibration.split(self.holdout_windows)
        device = next(model.parameters()).device
        fitness_ids = holdout.input_ids[: self.fitness_windows, : self.fitness_seq_len].to(device)
        rescale_ids = holdout.input_ids[self.fitness_windows: self.fitness_windows + self.rescale_windows].to(device)
        train_ids = train_set.input_ids[: self.train_sequences, : self.train_seq_len]
        router = TokenRouter(self.router_hidden).to(device)
        schedule = uniform_schedule(num_blocks, mean)
        ctl = self.controller(config, schedule, router if self.router == "learned" else None)
        artifact: dict[str, Any] = {"schedule_mean": mean, "target_compute_sparsity": self.sparsity,
                                    "ga_best_fitness": [], "ga_mean_fitness": [], "finetune_best_fitness": [],
                                    "finetune_mean_fitness": []}

        def fitness(candidate: list[float]) -> float:
            ctl.schedule = candidate
            return -lm_loss(model, fitness_ids)

        with routed_model(model, ctl):
            if mean > 0 and self.schedule == "searched":
                ctl.kind = "static"  # the search runs with the static router (no attention probabilities needed)
                searched = genetic_search(fitness, num_blocks, mean, self.ga_config(self.generations), self.seed,
                                          progress=self.progress, desc="ftp: schedule search (static router)")
                schedule = searched.best
                artifact["searched_schedule"] = list(searched.best)
                artifact["ga_best_fitness"] = searched.best_fitness
                artifact["ga_mean_fitness"] = searched.mean_fitness
            ctl.kind, ctl.schedule = self.router, list(schedule)
            if mean > 0 and self.router == "learned":
                history = train_router(model, ctl, train_ids, self._train_config(), progress=self.progress)
                artifact.update(history)
                if self.schedule == "searched" and self.finetune_generations > 0:
                    # Fine-tune with exact budgets so the schedule's mean stays the token sparsity (an argmax router
                    # would let the search buy loss with less skipping); the final rescale matches argmax.
                    ctl.selection = "topk"
                    tuned = genetic_search(fitness, num_blocks, mean, self.ga_config(self.finetune_generations),
                                           self.seed + 1, initial_population=searched.population,
                                           progress=self.progress, desc="ftp: schedule fine-tune (trained router)")
                    ctl.selection = self.selection
                    schedule = tuned.best
                    artifact["finetune_best_fitness"] = tuned.best_fitness
                    artifact["finetune_mean_fitness"] = tuned.mean_fitness
            fit = self._rescale(model, ctl, schedule, rescale_ids) if mean > 0 else RescaleResult()
        artifact.update({"schedule": [float(s) for s in schedule], "schedule_scale": fit.scale,
                         "compute_threshold": fit.threshold, "rescale_history": fit.history,
                         "inference_schedule": scaled_schedule(schedule, fit.scale, self.max_block_sparsity),
                         "measured_compute_sparsity": fit.measured.get("compute_sparsity", 0.0),
                         "measured_token_sparsity": fit.measured.get("token_sparsity", 0.0)})
        if self.router == "learned":
            for key, tensor in router.state_dict().items():
                artifact[ROUTER_PREFIX + key] = tensor.detach().cpu().clone()
        return artifact

    def _train_config(self) -> TrainConfig:
        return TrainConfig(learning_rate=self.learning_rate, guide_weight_start=self.guide_weight_start,
                           guide_decay_fraction=self.guide_decay_fraction, sparsity_weight=self.sparsity_loss_weight,
                           distill_weight=self.distill_loss_weight,
                           distill_target=self.distill_target)

    def _rescale(self, model, ctl: RoutingController, schedule: list[float],
                 windows: torch.Tensor) -> RescaleResult:
        """Scale the schedule until the compute sparsity measured on `windows` is within `rescale_tolerance` of the
        target (bisection on the scale; measured c grows with it).

        Fallback, outside the paper: if no scale brings an argmax router within tolerance (its P(compute) barely
        depends on the sparsity input, e.g. a router trained on a uniform schedule never saw s_i vary), the
        threshold on P(compute) is moved from 0.5 by bisection at the searched schedule (raised when it skips too
        little, lowered when it skips too much) and recorded in the artifact."""
        result = RescaleResult()

        def error(scale: float, threshold: float) -> float:
            ctl.schedule = scaled_schedule(schedule, scale, self.max_block_sparsity)
            ctl.compute_threshold = threshold
            measured = measure_routing(model, ctl, windows)
            result.history.append({"scale": scale, "threshold": threshold,
                                   "compute_sparsity": measured["compute_sparsity"]})
            if abs(measured["compute_sparsity"] - self.sparsity) < abs(result.error(self.sparsity)):
                result.scale, result.threshold, result.measured = scale, threshold, measured
            bar.set_postfix(scale=f"{scale:.3f}", threshold=f"{threshold:.4f}",
                            measured=f"{measured['compute_sparsity']:.4f}")
            return measured["compute_sparsity"] - self.sparsity

        saturated = self.max_block_sparsity / min(s for s in schedule if s > 0)  # every block at the cap
        bar = tqdm(total=self.rescale_iterations, desc="ftp: rescale schedule", disable=not self.progress)
        low, high, scale = 0.0, None, 1.0
        for _ in range(self.rescale_iterations):
            bar.update()
            gap = error(scale, 0.5)
            if abs(gap) <= self.rescale_tolerance or (gap < 0 and scale >= saturated):
                break
            if gap < 0:
                low = scale
                scale = min(2.0 * scale, saturated) if high is None else (low + high) / 2
            else:
                high = scale
                scale = (low + high) / 2
        if abs(result.error(self.sparsity)) > self.rescale_tolerance and self.router == "learned" \
                and self.selection == "argmax":
            low_t, high_t = (0.5, 1.0) if result.error(self.sparsity) < 0 else (0.0, 0.5)
            for _ in range(self.rescale_iterations):
                bar.update()
                threshold = (low_t + high_t) / 2
                gap = error(1.0, threshold)
                if abs(gap) <= self.rescale_tolerance:
                    break
                low_t, high_t = (threshold, high_t) if gap < 0 else (low_t, threshold)
        bar.close()
        ctl.schedule = scaled_schedule(schedule, result.scale, self.max_block_sparsity)
        ctl.compute_threshold = result.threshold
        return result

    # -- inference --------------------------------------------------------------------------------------------
    def load_artifact(self, artifact: dict[str, Any]) -> None:
        missing = [k for k in ("schedule", "inference_schedule") if k not in artifact]
        if self.router == "learned" and not any(k.startswith(ROUTER_PREFIX) for k in artifact):
            missing.append(ROUTER_PREFIX + "*")
        if missing:
            raise MethodConfigError(f"ftp: artifact lacks {missing}; recalibrate (calibrate --force)")
        super().load_artifact(artifact)

    def build_router(self) -> TokenRouter | None:
        if self.router != "learned":
            return None
        router = TokenRouter(self.router_hidden)
        state = {k[len(ROUTER_PREFIX):]: v for k, v in self.artifact.items() if k.startswith(ROUTER_PREFIX)}
        router.load_state_dict(state)
        return router.eval().requires_grad_(False)

    @contextmanager
    def apply(self, model) -> Iterator[object]:
        schedule = list(self.artifact["inference_schedule"])
        if len(schedule) != model.config.num_hidden_layers:
            raise MethodConfigError(f"ftp: the artifact's schedule has {len(schedule)} blocks, the model "
                                    f"{model.config.num_hidden_layers}; recalibrate for this model")
        router = self.build_router()
        if router is not None:
            router.to(next(model.parameters()).device)
        self._controller = self.controller(model.config, schedule, router)
        self._controller.compute_threshold = float(self.artifact.get("compute_threshold", 0.5))
        self._controller.keep_first = self.keep_first_token
        self._model_config = model.config
        self._apply_knob()
        with routed_model(model, self._controller) as routed:
            yield routed

    # -- matching knob ----------------------------------------------------------------------------------------
    def knob(self, config) -> Knob | None:
        """The learned argmax router whose calibration had to move the P(compute) threshold (its P hardly responds
        to the schedule) is matched by that threshold; every other variant by the schedule scale (top-k, static
        and random routers have exact budgets; an argmax router that follows s_i moves with the scale)."""
        schedule = [float(s) for s in self.artifact["schedule"]]
        if not any(s > 0 for s in schedule):
            return None
        threshold = float(self.artifact.get("compute_threshold", 0.5))
        if self.router == "learned" and self.selection == "argmax" and threshold != 0.5:
            return Knob("compute_threshold", threshold, low=0.0, high=1.0, increasing=True)
        saturated = self.max_block_sparsity / min(s for s in schedule if s > 0)
        return Knob("schedule_scale", float(self.artifact.get("schedule_scale", 1.0)), low=0.0, high=saturated,
                    increasing=True)

    def set_knob(self, value: float | None) -> None:
        self._knob_value = value
        if getattr(self, "_controller", None) is not None:
            self._apply_knob()

    def row_flops(self, config, width: int, scored: torch.Tensor | None) -> int | None:
        """Exact budgets (top-k, static, random): block i computes ⌈(1 − s_i)·N⌉ tokens (block 0 and s_i = 0: all);
        the learned router adds its MLP on every token of a routed block and the attention-table refresh
        (2·H·n_i² for the n_i computed tokens) in every block a later routed block reads. Argmax: None."""
        if self.router == "learned" and self.selection == "argmax":
            return None
        scale = self.knob_in_force(config)  # None: an all-zero schedule, which scaling leaves as it is
        schedule = scaled_schedule(self.artifact["schedule"], 1.0 if scale is None else scale, self.max_block_sparsity)
        coeff = LayerFlopCoefficients.from_config(config)
        counts = [width if i == 0 or s <= 0 else keep_count(s, width) for i, s in enumerate(schedule)]
        flops = sum(coeff.layer(n) for n in counts)
        if self.router == "learned":
            routed = sum(1 for i, s in enumerate(schedule) if i > 0 and s > 0)
            flops += routed * width * TokenRouter(self.router_hidden).flops_per_token
            flops += sum(2 * config.num_attention_heads * n * n for i, n in enumerate(counts)
                         if any(s > 0 for s in schedule[i + 1:]))
        return flops

    def _apply_knob(self) -> None:
        ctl = self._controller
        knob = self.knob(self._model_config)
        if knob is None:
            return
        value = self.knob_in_force(self._model_config)
        if knob.name == "compute_threshold":
            ctl.compute_threshold = value
        else:
            ctl.schedule = scaled_schedule(self.artifact["schedule"], value, self.max_block_sparsity)

    def reset_stats(self) -> None:
        if getattr(self, "_controller", None) is not None:
            self._controller.reset_stats()

    def measured_stats(self) -> MethodStats:
        ctl = getattr(self, "_controller", None)
        knob = self.knob(self._model_config) if ctl is not None else None
        if ctl is None:
            return MethodStats(None, None, [], [])
        summary = routing_summary(ctl)
        value = self.knob_in_force(self._model_config)
        details = {k: v for k, v in summary.items() if k not in ("compute_sparsity", "per_block_computed_fraction")}
        return MethodStats(
            compute_sparsity=summary["compute_sparsity"] if ctl.stats.forwards else None,
            token_layer_sparsity=summary["token_sparsity"] if ctl.stats.forwards else None,
            per_layer_computed_fraction=summary["per_block_computed_fraction"], removed_units=[],
            knob=None if knob is None else knob.name, knob_value=value,
            details={**details, "per_block_computed_fraction": summary["per_block_computed_fraction"],
                     "inference_schedule": list(ctl.schedule), "router": ctl.kind, "selection": ctl.selection,
                     "compute_threshold": ctl.compute_threshold})


def routing_summary(ctl: RoutingController) -> dict[str, Any]:
    """Per-block computed fractions, token and compute sparsity of the prefill forwards; decoding separately."""
    st = ctl.stats
    per_block = [c / t if t else 1.0 for c, t in zip(st.prefill_computed, st.prefill_tokens, strict=True)]
    tokens = sum(st.prefill_tokens)
    executed = st.executed_flops + st.router_flops
    summary: dict[str, Any] = {
        "per_block_computed_fraction": per_block,
        "token_sparsity": 1.0 - sum(st.prefill_computed) / tokens if tokens else 0.0,
        "compute_sparsity": 1.0 - executed / st.dense_flops if st.dense_flops else 0.0,
        "executed_flops": executed, "dense_flops": st.dense_flops, "router_flops": st.router_flops,
        "forwards": st.forwards, "decode_steps": st.decode_steps,
    }
    if st.decode_steps:
        decode = [c / st.decode_steps for c in st.decode_computed]
        summary["decode_per_block_computed_fraction"] = decode
        summary["decode_token_sparsity"] = 1.0 - sum(decode) / len(decode)
    return summary


def measure_routing(model, ctl: RoutingController, windows: torch.Tensor) -> dict[str, Any]:
    """Route `windows` (one row at a time, as the evaluator does) and return the routing summary."""
    ctl.reset_stats()
    with torch.inference_mode():
        for row in windows:
            model.model(input_ids=row[None], use_cache=False)
    summary = routing_summary(ctl)
    ctl.reset_stats()
    return summary
