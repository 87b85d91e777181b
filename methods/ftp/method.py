"""FTP — "A Fine-grained Token-wise Pruner for Large Language Models via Token Routing" (arXiv 2412.11494).

Before every decoder block a router decides per token compute or skip (methods.md §3). Calibration has three steps:
a genetic-algorithm search of the per-block sparsity schedule with the static router, router training with the
frozen LLM (guide + sparsity-constraint + distillation losses), and a GA fine-tune of the schedule with the trained
router. The artifact is the schedule, the router weights and the search/training history.

Budgets (`preset`):
- "paper": methods.md's defaults — GA population 32 × 30 generations, router trained on 2,000 sequences of 512
  tokens, schedule fine-tuned for 10 generations; fitness on 8 held-out 512-token windows, rescale measured on 16
  others. Hours on a CPU.
- "cpu": about 15 minutes on 2 cores for SmolLM2-135M — population 16 × 10 generations scored on 4 held-out
  windows of 256 tokens, a warm start on 64 teacher-routed windows, 240 joint-training sequences of 256 tokens,
  3 fine-tune generations, model selection on the 4 fitness windows at 512 tokens, rescale measured on 12 held-out
  512-token windows. It gives up search breadth (a
  schedule that beats uniform but is not converged), a router trained on an eighth of the paper's sequences at half
  the length (its position and rank inputs are normalised, so it transfers to 512-token inputs), and a noisier
  fitness.
Each budget field can still be set by hand; the preset only fills the ones left at None.

Variants (registry): ftp-static (static router only), ftp-uniform (uniform schedule, no search), ftp-random
(random skipping at the searched schedule), ftp-nopos / ftp-nosparsity (router without that input; ftp-nosparsity
uses top-k budgets, since without the sparsity input rescaling the schedule cannot move an argmax router), ftp-topk
(the learned router with exact top-k budgets instead of argmax).

Evaluation: routing depends on the whole sequence, so each request is its own row (`sequence_dependent`); padded rows carry their mask.
Padding, if present, is never computed in blocks 1..L-1 and never counts toward a budget. Cached generation works
for batch size 1: each block's cache holds only its computed tokens and each new token is routed per block by the
same argmax rule, on features kept incrementally (O(log N) router work per block and step); its quality differs
from prefill routing (the paper's LLaMA2-7B WikiText-2 perplexity rose from 5.47 to 11.12), so `stats()` reports
decoding separately (`experiments/ftp/decode_quality.py` measures it). `output_hidden_states` is not supported while
applied (the wrapped layers run on gathered rows).

Router inputs: position on a log scale, log(1 + j)/log(1 + N) (methods.md's default j/N left the 4→64→2 router unable
to single out the first token, see `methods.ftp.router.token_positions`), attention received (uniform = 1), its
rank / N, and s_i.

Matching the target (methods.md §5): the GA runs at the schedule mean S for the target c; then the schedule is
scaled until c measured on held-out calibration windows is within `rescale_tolerance`. The decision rule is always
the paper's argmax (or top-k for the exact-budget variants): no threshold is moved. A router that does not respond
to its sparsity input stays where it lands, and the harness reports the cell unmatched.

Router training recipe (`methods.ftp.training`): a guide-only warm start on the static teacher at sampled schedule
scales (attention-weighted, smoothed BCE on standardised inputs; a DAgger round on the router's own states), joint
training with the three losses (hard straight-through ŝ_i, L_d as KL(dense ‖ routed) on the logits, sampled
scales, gated keys, standardised router inputs), and model selection by held-out LM loss at the target c on the
fitness windows at `selection_seq_len` tokens (512: the length inference sees). After calibration the artifact records, on the held-out
rescale windows at the learned router's measured c, the learned router's LM loss, the static router's (same
schedule shape, scaled to the same measured c) and the fraction of routed (block, row) pairs that computed the
first token.

Artifact: schedule (searched), searched_schedule (before fine-tuning), inference_schedule (rescaled),
schedule_scale, schedule_mean, target/measured compute and token sparsity, rescale_history, GA histories (ga_/
finetune_ best/mean fitness per generation), warm_start_loss, per-step losses (loss_total, loss_guide,
loss_sparsity, loss_distill, guide_weight, achieved_skip), selection (held-out checks), heldout_* and
first_token_computed_fraction, and the router weights as tensors "router.net.*"."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from methods.base import CalibrationSet, Knob, Method, MethodConfigError, MethodStats
from methods.flop_coefficients import LayerFlopCoefficients
from methods.ftp.block import ROUTERS, SELECTIONS, RoutingController, RoutingPolicy, routed_model
from methods.ftp.measure import routing_summary, solve_scale
from methods.ftp.router import TokenRouter, keep_count
from methods.ftp.schedule import (
    GAConfig,
    genetic_search,
    scaled_schedule,
    token_sparsity_for_compute,
    uniform_schedule,
)
from methods.ftp.training import TrainConfig, imitate_teacher, lm_loss, train_router

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"elites": 4, "holdout_windows": 24, "population": 32, "generations": 30, "finetune_generations": 10,
              "warm_start_sequences": 256, "warm_start_steps": 3000, "train_sequences": 2000, "train_seq_len": 512,
              "train_min_seq_len": 64, "select_every": 200, "selection_seq_len": 512,
              "learning_rate": 1e-3, "fitness_windows": 8, "fitness_seq_len": 512, "rescale_windows": 16},
    "cpu": {"elites": 4, "holdout_windows": 16, "population": 16, "generations": 10, "finetune_generations": 3,
            "warm_start_sequences": 64, "warm_start_steps": 3000, "train_sequences": 240, "train_seq_len": 512,
            "train_min_seq_len": 16, "select_every": 20, "selection_seq_len": 512,
            "learning_rate": 3e-4, "fitness_windows": 4, "fitness_seq_len": 256, "rescale_windows": 12},
    # models under 20M decoder parameters (bench.budgets): a user's small model calibrates in seconds, not minutes.
    # "small" and "test" keep full-length training windows: on a tiny random model (12 layers, hidden 64),
    # length-mixed windows (train_min_seq_len 32 or 16) left ftp-uniform unable to reach c = 0.25 on 18-34-token
    # items (0.225 and 0.161; test_matching), where full windows match
    "small": {"elites": 2, "holdout_windows": 8, "population": 8, "generations": 5, "finetune_generations": 2,
              "warm_start_sequences": 16, "warm_start_steps": 500, "train_sequences": 60, "train_seq_len": 256,
              "train_min_seq_len": 0, "select_every": 20, "selection_seq_len": 256,
              "learning_rate": 1e-3, "fitness_windows": 2, "fitness_seq_len": 256, "rescale_windows": 6},
    # seconds on the tiny test model (tests only)
    "test": {"elites": 2, "learning_rate": 1e-3, "population": 4, "generations": 2, "finetune_generations": 1,
             "warm_start_sequences": 2, "warm_start_steps": 50, "train_sequences": 4, "train_seq_len": 32,
             "train_min_seq_len": 0, "select_every": 2,
             "selection_seq_len": 32,
             "fitness_windows": 1, "fitness_seq_len": 32, "rescale_windows": 1, "holdout_windows": 2},
}
ROUTER_PREFIX = "router."


@dataclass(frozen=True)
class CalibrationWindows:
    """FTP's calibration windows by use (`FTP.calibration_windows`)."""

    train: torch.Tensor  # router training, [n, train_seq_len]
    fitness: torch.Tensor  # GA fitness, [fitness_windows, fitness_seq_len]
    selection: torch.Tensor  # model selection, [fitness_windows, selection_seq_len]
    rescale: torch.Tensor  # target matching and the held-out report, [rescale_windows, seq_len]


ROUTER_TRAINING_FIELDS = (
    "position_input", "sparsity_input", "router_hidden", "gumbel_tau", "warm_start_sequences",
    "warm_start_steps", "warm_start_lr", "warm_start_batch", "warm_start_weighted", "warm_start_smoothing",
    "warm_start_rounds", "train_sequences", "train_seq_len",
    "train_min_seq_len", "learning_rate", "select_every", "selection_seq_len",
    "train_scale_low", "train_scale_high", "guide_weight_start", "guide_decay_fraction",
    "sparsity_loss_weight", "distill_loss_weight")
# The learned router's fixed recipe choices (methods.ftp.training), which were fields while other values were tried
# (docs/experiments/ftp-router.md): the log position scale, the warm start's BCE from logits, ŝ_i on the hard gates,
# L_d as KL on the logits, joint training on standardised inputs, model selection at c within ±0.002 of the target,
# no guide-weighted warm start. The committed artifacts and result cells were made with exactly these and recorded
# them, so `FTP.config()` (each row's method_params and cell identity) still records them, and a learned router's
# artifact key all but `guide_like_warm_start` (which no key ever held).
FIXED_RECIPE: dict[str, Any] = {"position_scale": "log", "warm_start_logit_bce": True, "hard_sparsity": True,
                                "distill_target": "logits", "distill_normalised": True, "joint_standardised": True,
                                "selection_tolerance": 0.002, "guide_like_warm_start": False}
NOT_IN_KEY = ("guide_like_warm_start",)
SELECTION_TOLERANCE = FIXED_RECIPE["selection_tolerance"]
SELECTION_ITERATIONS = 12  # solver steps per model-selection check


def recorded_fields(recorded: dict[str, Any]) -> dict[str, Any]:
    """FTP's fields from a recorded config (an artifact key's fields, a cell's params): the fixed recipe taken out,
    after checking it is the one this code runs."""
    other = {k: v for k, v in recorded.items() if k in FIXED_RECIPE and v != FIXED_RECIPE[k]}
    if other:
        raise MethodConfigError(f"ftp: recorded with another recipe ({other}); that recipe runs at commit c9043ab")
    return {k: v for k, v in recorded.items() if k not in FIXED_RECIPE}


@dataclass
class FTP(Method):
    """`sparsity` is the target compute sparsity c; the GA runs at the schedule mean S given by methods.md §5 at
    `reference_seq_len`, and the final schedule is rescaled until c measured on held-out calibration windows is
    within `rescale_tolerance` of the target."""

    preset: str = "cpu"
    router: str = "learned"  # "learned" (FTP), "static" (first token + most recent), "random"
    schedule: str = "searched"  # "searched" (GA) or "uniform"
    selection: str = "argmax"  # "argmax" (the paper's rule) or "topk" (exact budgets ⌈(1 - s_i)·N⌉)
    position_input: bool = True  # log(1 + j)/log(1 + N) (methods.ftp.router.token_positions); False: the ablation
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
    # router training (methods.ftp.training: warm start, joint training, model selection)
    warm_start_sequences: int | None = None
    warm_start_steps: int | None = None
    warm_start_lr: float = 1e-2
    warm_start_batch: int = 8192
    warm_start_weighted: bool = True
    warm_start_smoothing: float = 0.05
    warm_start_rounds: int = 2
    train_sequences: int | None = None
    train_seq_len: int | None = None
    # each training window is cut to a length drawn from [train_min_seq_len, train_seq_len]
    # (methods.ftp.training.training_window), so the router meets the attention scores of every length it routes;
    # None: from the preset; 0: every window full length
    train_min_seq_len: int | None = None
    learning_rate: float | None = None
    select_every: int | None = None
    train_scale_low: float = 0.6
    train_scale_high: float = 1.4
    gumbel_tau: float = 1.0
    guide_weight_start: float = 1.0
    guide_decay_fraction: float = 0.5
    sparsity_loss_weight: float = 1.0
    distill_loss_weight: float = 1.0
    selection_seq_len: int | None = None  # model-selection window length (None: fitness_seq_len)
    # matching the target
    rescale_windows: int | None = None
    rescale_tolerance: float = 0.005
    rescale_iterations: int = 12
    progress: bool = True

    name: ClassVar[str] = "ftp"
    version: ClassVar[str] = "4"
    needs_calibration: ClassVar[bool] = True
    calibration_ignores: ClassVar[tuple[str, ...]] = ("progress",)
    sequence_dependent: ClassVar[bool] = True
    batched_decode: ClassVar[bool] = False  # a cached forward decodes one sequence (block.py: begin_forward)
    # Enough windows for the paper preset's 2,000 training sequences plus the held-out rows; "cpu" uses a subset.
    default_calibration: ClassVar[dict] = {"n_samples": 2048, "seq_len": 512, "source": "c4-all"}
    small_preset: ClassVar[str | None] = "small"

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
                    "fitness_seq_len", "train_sequences", "train_seq_len", "rescale_windows", "rescale_iterations",
                    "warm_start_sequences")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise MethodConfigError(f"ftp: {key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("generations", "finetune_generations", "elites", "warm_start_steps", "select_every",
                    "warm_start_batch"):
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
        for key in ("mutation_delta", "mutation_prob", "learning_rate", "gumbel_tau", "guide_decay_fraction",
                    "warm_start_lr"):
            if not float(getattr(self, key)) > 0:
                raise MethodConfigError(f"ftp: {key} must be > 0, got {getattr(self, key)!r}")
        for key in ("guide_weight_start", "sparsity_loss_weight", "distill_loss_weight"):
            if float(getattr(self, key)) < 0:
                raise MethodConfigError(f"ftp: {key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 < self.train_scale_low <= self.train_scale_high:
            raise MethodConfigError("ftp: need 0 < train_scale_low <= train_scale_high, e.g. 0.6 and 1.4")
        if isinstance(self.train_min_seq_len, bool) or not 0 <= int(self.train_min_seq_len) <= self.train_seq_len:
            raise MethodConfigError(f"ftp: train_min_seq_len must be in [1, train_seq_len={self.train_seq_len}], "
                                    f"or 0 for full-length windows, got {self.train_min_seq_len!r}")
        if not 0.0 < self.rescale_tolerance <= 0.02:
            raise MethodConfigError("ftp: rescale_tolerance must be in (0, 0.02] (the benchmark's matching band)")

    def config(self) -> dict[str, Any]:
        """The fields and the recipe's fixed choices (`FIXED_RECIPE`), as every result row records them."""
        return {**super().config(), **FIXED_RECIPE}

    # -- calibration ------------------------------------------------------------------------------------------
    def calibration_config(self) -> dict[str, Any]:
        """Without a learned router (ftp-static, ftp-random) the router and its training recipe play no part in the
        artifact, so they stay out of its key."""
        config = {k: v for k, v in super().calibration_config().items() if k not in NOT_IN_KEY}
        if self.router != "learned":
            return {k: v for k, v in config.items() if k not in ROUTER_TRAINING_FIELDS and k not in FIXED_RECIPE}
        return config

    def schedule_mean(self, config) -> float:
        """Mean token sparsity S for the target compute sparsity (methods.md §5)."""
        return token_sparsity_for_compute(self.sparsity, config, self.reference_seq_len)

    def ga_config(self, generations: int) -> GAConfig:
        return GAConfig(population=self.population, generations=generations, elites=self.elites,
                        tournament_size=self.tournament_size, mutation_delta=self.mutation_delta,
                        mutation_prob=self.mutation_prob, max_sparsity=self.max_block_sparsity)

    def policy(self, schedule, kind: str | None = None) -> RoutingPolicy:
        return RoutingPolicy(schedule=tuple(schedule), kind=kind or self.router, selection=self.selection,
                             use_position=self.position_input, use_sparsity=self.sparsity_input)

    def controller(self, config, schedule, router: TokenRouter | None) -> RoutingController:
        return RoutingController(config, self.policy(schedule), router, gumbel_tau=self.gumbel_tau, seed=self.seed)

    def train_config(self) -> TrainConfig:
        return TrainConfig(learning_rate=self.learning_rate, guide_weight_start=self.guide_weight_start,
                           guide_decay_fraction=self.guide_decay_fraction, sparsity_weight=self.sparsity_loss_weight,
                           distill_weight=self.distill_loss_weight,
                           scale_low=self.train_scale_low, scale_high=self.train_scale_high,
                           max_sparsity=self.max_block_sparsity, warm_start_steps=self.warm_start_steps,
                           warm_start_lr=self.warm_start_lr, warm_start_batch=self.warm_start_batch,
                           warm_start_weighted=self.warm_start_weighted,
                           warm_start_smoothing=self.warm_start_smoothing, warm_start_rounds=self.warm_start_rounds,
                           select_every=self.select_every, min_window=self.train_min_seq_len)

    def calibrate(self, model, tokenizer, calibration: CalibrationSet) -> dict[str, Any]:
        torch.manual_seed(self.seed)  # router init
        rng = random.Random(self.seed)  # training order and sampled schedule scales
        config = model.config
        num_blocks = config.num_hidden_layers
        mean = self.schedule_mean(config)
        if mean * num_blocks / max(1, num_blocks - 1) > self.max_block_sparsity:
            raise MethodConfigError(f"ftp: sparsity {self.sparsity} needs more than max_block_sparsity "
                                    f"{self.max_block_sparsity} per block; lower the sparsity")
        device = next(model.parameters()).device
        windows = self.calibration_windows(calibration, rng, device)
        fitness_ids, rescale_ids = windows.fitness, windows.rescale
        router = TokenRouter(self.router_hidden).to(device)
        schedule = uniform_schedule(num_blocks, mean)
        ctl = self.controller(config, schedule, router if self.router == "learned" else None)
        artifact: dict[str, Any] = {"schedule_mean": mean, "target_compute_sparsity": self.sparsity,
                                    "ga_best_fitness": [], "ga_mean_fitness": [], "finetune_best_fitness": [],
                                    "finetune_mean_fitness": []}

        def fitness(candidate: list[float]) -> float:
            ctl.with_schedule(candidate)
            return -lm_loss(model, fitness_ids)

        with routed_model(model, ctl):
            if mean > 0 and self.schedule == "searched":
                ctl.policy = self.policy(schedule, kind="static")  # the search runs with the static router
                searched = genetic_search(fitness, num_blocks, mean, self.ga_config(self.generations), self.seed,
                                          progress=self.progress, desc="ftp: schedule search (static router)")
                schedule = searched.best
                artifact["searched_schedule"] = list(searched.best)
                artifact["ga_best_fitness"] = searched.best_fitness
                artifact["ga_mean_fitness"] = searched.mean_fitness
            ctl.policy = self.policy(schedule)
            if mean > 0 and self.router == "learned":
                artifact.update(self.fit_router(model, ctl, schedule, windows, rng))
                if self.schedule == "searched" and self.finetune_generations > 0:
                    # Fine-tune with exact budgets so the schedule's mean stays the token sparsity (an argmax router
                    # would let the search buy loss with less skipping); the final rescale matches argmax.
                    ctl.policy = replace(self.policy(schedule), selection="topk")
                    tuned = genetic_search(fitness, num_blocks, mean, self.ga_config(self.finetune_generations),
                                           self.seed + 1, initial_population=searched.population,
                                           progress=self.progress, desc="ftp: schedule fine-tune (trained router)")
                    schedule = tuned.best
                    artifact["finetune_best_fitness"] = tuned.best_fitness
                    artifact["finetune_mean_fitness"] = tuned.mean_fitness
                ctl.policy = self.policy(schedule)
            if mean > 0:
                fit = solve_scale(model, ctl, schedule, rescale_ids, self.sparsity, self.rescale_tolerance,
                                  self.rescale_iterations, self.max_block_sparsity, with_loss=True)
                artifact.update(self.heldout_report(model, ctl, schedule, rescale_ids, fit.measured))
                scale, measured, history = fit.scale, fit.measured, fit.history
            else:
                scale, measured, history = 1.0, {}, []
        artifact.update({"schedule": [float(s) for s in schedule], "schedule_scale": scale,
                         "rescale_history": history,
                         "inference_schedule": scaled_schedule(schedule, scale, self.max_block_sparsity),
                         "measured_compute_sparsity": measured.get("compute_sparsity", 0.0),
                         "measured_token_sparsity": measured.get("token_sparsity", 0.0)})
        if self.router == "learned":
            for key, tensor in router.state_dict().items():
                artifact[ROUTER_PREFIX + key] = tensor.detach().cpu().clone()
        return artifact

    def calibration_windows(self, calibration: CalibrationSet, rng: random.Random, device) -> CalibrationWindows:
        """Split the calibration windows: the last `holdout_windows` rows are held out (the first `fitness_windows`
        score the GA at `fitness_seq_len` tokens and model selection at `selection_seq_len`; the next
        `rescale_windows` match the target and carry the held-out report); the rest, in an order drawn from `rng`,
        cut to `train_seq_len`, train the router."""
        train_set, holdout = calibration.split(self.holdout_windows)
        fitness = holdout.input_ids[: self.fitness_windows]
        order = list(range(len(train_set.input_ids)))
        rng.shuffle(order)
        return CalibrationWindows(
            train=train_set.input_ids[order][:, : self.train_seq_len],
            fitness=fitness[:, : self.fitness_seq_len].to(device),
            selection=fitness[:, : self.selection_seq_len or self.fitness_seq_len].to(device),
            rescale=holdout.input_ids[self.fitness_windows: self.fitness_windows + self.rescale_windows].to(device))

    def fit_router(self, model, ctl: RoutingController, schedule, windows: CalibrationWindows,
                   rng: random.Random) -> dict[str, Any]:
        """Warm start on the static teacher, then joint training with model selection on `windows.selection`
        (methods.ftp.training). Returns the training histories for the artifact."""
        config = self.train_config()
        train_rows, selection_ids = windows.train, windows.selection
        warm, moments = imitate_teacher(model, ctl, train_rows[: self.warm_start_sequences], rng, config,
                                        seed=self.seed, progress=self.progress)

        def select() -> dict[str, float]:
            fit = solve_scale(model, ctl, schedule, selection_ids, self.sparsity, SELECTION_TOLERANCE,
                              SELECTION_ITERATIONS, self.max_block_sparsity, with_loss=True)
            ctl.policy = self.policy(schedule)
            return {"loss": fit.measured["lm_loss"], "scale": fit.scale,
                    "compute_sparsity": fit.measured["compute_sparsity"],
                    "first_token_computed_fraction": fit.measured["first_token_computed_fraction"]}

        joint = train_router(model, ctl, train_rows[: self.train_sequences], config,
                             select=select, rng=rng, progress=self.progress, moments=moments)
        return {"warm_start_loss": warm, **joint}

    def heldout_report(self, model, ctl: RoutingController, schedule, windows: torch.Tensor,
                        measured: dict[str, Any]) -> dict[str, Any]:
        """On the held-out rescale windows at the measured c: LM loss of this router and of the static router with the
        same schedule shape scaled to the same measured c, and how often the first token is computed."""
        report = {"heldout_compute_sparsity": measured["compute_sparsity"], "heldout_lm_loss": measured["lm_loss"],
                  "first_token_computed_fraction": measured["first_token_computed_fraction"]}
        if self.router == "static":
            return report
        learned_policy = ctl.policy
        ctl.policy = self.policy(schedule, kind="static")
        # matched to ±0.0005: near c = 0.25 the static router's loss moves ~9-12 nats per unit c, so the ±0.002
        # the committed artifacts used could move the difference by up to ~0.02 (docs/experiments/ftp-router.md)
        static = solve_scale(model, ctl, schedule, windows, measured["compute_sparsity"], 0.0005,
                             max(20, self.rescale_iterations), self.max_block_sparsity, with_loss=True)
        ctl.policy = learned_policy
        return {**report, "heldout_static_lm_loss": static.measured["lm_loss"],
                "heldout_static_compute_sparsity": static.measured["compute_sparsity"]}

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
        router = self.build_router()
        if router is not None:
            router.to(next(model.parameters()).device)
        self._controller = self.controller(model.config, self.artifact["inference_schedule"], router)
        self._model_config = model.config
        self._apply_knob()
        with routed_model(model, self._controller) as routed:
            yield routed

    # -- matching knob ----------------------------------------------------------------------------------------
    def knob(self, config) -> Knob | None:
        """The schedule scale: exact budgets (top-k, static, random) follow it by construction, and the learned
        argmax router follows it through its sparsity input. At scale 0 every s_i is 0: no block is routed, no
        router or attention table runs, so c = 0 (`dense_at`)."""
        schedule = [float(s) for s in self.artifact["schedule"]]
        if not any(s > 0 for s in schedule):
            return None
        saturated = self.max_block_sparsity / min(s for s in schedule if s > 0)
        return Knob("schedule_scale", float(self.artifact.get("schedule_scale", 1.0)), low=0.0, high=saturated,
                    increasing=True, dense_at=0.0)

    def set_knob(self, value: float | None) -> None:
        self._knob_value = value
        if getattr(self, "_controller", None) is not None:
            self._apply_knob()

    def row_flops(self, config, width: int, scored: torch.Tensor | None) -> int | None:
        """Exact budgets (top-k, static, random): block i computes ⌈(1 − s_i)·N⌉ tokens (block 0 and s_i = 0: all);
        the learned router adds its MLP on every token of a routed block and the attention-table column sums
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
        value = self.knob_in_force(self._model_config)
        if value is not None:
            self._controller.with_schedule(scaled_schedule(self.artifact["schedule"], value, self.max_block_sparsity))

    def executed_flops(self) -> int | None:
        ctl = getattr(self, "_controller", None)
        return None if ctl is None else ctl.stats.executed_flops + ctl.stats.router_flops

    def reset_stats(self) -> None:
        if getattr(self, "_controller", None) is not None:
            self._controller.reset_stats()

    def measured_stats(self) -> MethodStats:
        ctl = getattr(self, "_controller", None)
        if ctl is None:
            return MethodStats(None, None, [], [])
        knob = self.knob(self._model_config)
        summary = routing_summary(ctl)
        ran = bool(ctl.stats.forwards)
        details = {k: v for k, v in summary.items() if k not in ("compute_sparsity", "per_block_computed_fraction")}
        return MethodStats(
            compute_sparsity=summary["compute_sparsity"] if ran else None,
            token_layer_sparsity=summary["token_sparsity"] if ran else None,
            per_layer_computed_fraction=summary["per_block_computed_fraction"], removed_units=[],
            knob=None if knob is None else knob.name, knob_value=self.knob_in_force(self._model_config),
            details={**details, "per_block_computed_fraction": summary["per_block_computed_fraction"],
                     "inference_schedule": list(ctl.policy.schedule), "router": ctl.policy.kind,
                     "selection": ctl.policy.selection})
