"""SDTP (arXiv 2504.04514): saliency-driven dynamic token pruning, methods.md §4.

Small predictors (hidden → d/4 → 2, GELU) before stage layers 3, 6, …, 27 score every remaining prompt token;
stage s keeps ⌈r^s·N₀⌉ of them (always the first 4, the last 10% and the positions the caller scores) and
every later layer runs on the gathered, shorter sequence at the tokens' original RoPE positions. Dropped tokens
are gone for good: no key/value, no hidden state, no logits (`current_scoring().logit_positions` says which
logits are real; the others are zeros). Decoding is never pruned; each layer's KV cache holds the prompt tokens
that reached it and generated tokens get positions N₀, N₀+1, …

"Uncached pruned forward" (what cached generation equals): one forward over prompt + generated tokens inside
`prompt_length(N₀)`, where only the first N₀ tokens are prompt (pruned, budgeted) and the generated ones are
protected at every stage. Because attention is causal, its prompt decisions are those of the cached prefill.

Presets (`preset`): training hyperparameters left at None take the preset's value.
- "paper": the paper's data amount (databricks-dolly-15k ≈ 2–3M tokens; here every calibration window the
  harness passes, ~3,000 × 512 tokens of C4), 2 epochs, AdamW lr 1e-4, batch 1. Meant for a GPU.
- "cpu" (default): about 15 minutes on 2 idle CPU cores for SmolLM2-135M (~1.8 s per step; 27 minutes were
  measured on a shared, loaded machine): the first 450 windows cut to 256 tokens,
  1 epoch, lr 1e-3 to make up for ~13× fewer steps. It gives up data (≈115k tokens instead of ~1.5M seen twice)
  and training length (predictors see 256-token contexts; they are per-token MLPs, the stage ratios are length
  free), so its rankings are noisier than the paper's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from methods.base import CalibrationSet, Knob, Method, MethodConfigError, MethodStats
from methods.flop_coefficients import LayerFlopCoefficients
from methods.sdtp.pruning import PruningRuntime, PruningStats, SaliencyPredictor, SDTPLayer

HELDOUT_ROWS = 32  # calibration rows (the last ones, never trained on) the predictors' ranking is checked on
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"train_sequences": 450, "train_seq_len": 256, "epochs": 1, "learning_rate": 1e-3},
    "paper": {"train_sequences": None, "train_seq_len": 512, "epochs": 2, "learning_rate": 1e-4},
    # models under 20M decoder parameters (bench.budgets)
    "small": {"train_sequences": 100, "train_seq_len": 256, "epochs": 1, "learning_rate": 1e-3},
}
# "saliency": the trained predictors rank the tokens (the paper); "random": seeded uniform scores at the same
# stages, budgets and protected positions (sdtp-random, the control for the predictors' ranking).
SCORES = ("saliency", "random")
_PRESET_FIELDS = ("train_sequences", "train_seq_len", "epochs", "learning_rate")


def stage_layers(num_layers: int, first_stage_layer: int, stage_interval: int, num_stages: int | None) -> list[int]:
    """Stage layers first, first + interval, … below num_layers (the first `num_stages` of them)."""
    layers = list(range(first_stage_layer, num_layers, stage_interval))
    return layers[:num_stages] if num_stages is not None else layers


def planned_compute_sparsity(keep_ratio: float, config, stages: list[int], seq_len: int,
                             predictor_flops_per_token: int = 0) -> float:
    """methods.md §5: c = 1 − Σ_ℓ F(k_ℓN, k_ℓN) / (L·F(N, N)), k_ℓ = r^(stages at or before ℓ), plus the
    predictors' FLOPs (which the measured c counts as executed) on the tokens each stage scores."""
    coeff = LayerFlopCoefficients.from_config(config)
    num_layers = config.num_hidden_layers
    executed = 0.0
    for layer in range(num_layers):
        n = keep_ratio ** sum(1 for s in stages if s <= layer) * seq_len
        executed += coeff.a * n + coeff.b * n * n + coeff.g * n
    for stage in range(len(stages)):
        executed += predictor_flops_per_token * keep_ratio ** stage * seq_len
    return 1.0 - executed / (num_layers * coeff.layer(seq_len))


def keep_ratio_for_sparsity(target: float, config, stages: list[int], seq_len: int,
                            predictor_flops_per_token: int = 0) -> float:
    """Solve planned_compute_sparsity(r) = target for r by bisection (c falls monotonically as r grows)."""
    if target == 0.0:
        return 1.0
    lo, hi = 1e-6, 1.0
    if planned_compute_sparsity(lo, config, stages, seq_len, predictor_flops_per_token) < target:
        raise MethodConfigError(f"sdtp: compute sparsity {target} is out of reach with {len(stages)} stages "
                                f"at {seq_len} tokens; lower --sparsity or add stages (first_stage_layer)")
    for _ in range(60):
        mid = (lo + hi) / 2
        if planned_compute_sparsity(mid, config, stages, seq_len, predictor_flops_per_token) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class SDTP(Method):
    """Fields ([default] = methods.md's choice where the paper is silent):

    keep_ratio: r per stage; None solves it from `sparsity` at `reference_seq_len` (§5); set it (e.g. 0.9, the
        paper's native setting) to override `sparsity`.
    first_stage_layer, stage_interval, num_stages: stages before layers 3, 6, … [0-based 3]; num_stages None =
        all that fit (9 on 30 layers), 5 = "SDTP-low".
    protect_first, protect_last_fraction: attention sinks and local window never dropped.
    predictor_width: [hidden // 4]; predictor_input_norm: [True] RMS-normalise the predictor input.
    preset: "cpu" or "paper" (module docstring); train_sequences (None = every calibration row),
        train_seq_len, epochs, learning_rate: None = the preset's value. weight_decay [AdamW default],
        gumbel_tau [1].
    """

    keep_ratio: float | None = None
    reference_seq_len: int = 512
    first_stage_layer: int = 3
    stage_interval: int = 3
    num_stages: int | None = None
    protect_first: int = 4
    protect_last_fraction: float = 0.1
    predictor_width: int | None = None
    predictor_input_norm: bool = True
    preset: str = "cpu"
    train_sequences: int | None = None
    train_seq_len: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    weight_decay: float = 0.01
    gumbel_tau: float = 1.0
    progress: bool = True
    scores: str = "saliency"

    name: ClassVar[str] = "sdtp"
    version: ClassVar[str] = "1"
    calibration_ignores: ClassVar[tuple[str, ...]] = ("progress", "scores")  # random scores use no artifact
    sequence_dependent: ClassVar[bool] = True
    # the paper preset's data amount; the cpu preset uses the first `train_sequences` rows of it
    default_calibration: ClassVar[dict] = {"n_samples": 3000, "seq_len": 512, "source": "c4-all"}
    small_preset: ClassVar[str | None] = "small"

    @property
    def needs_calibration(self) -> bool:
        """Saliency scores need trained predictors; sdtp-random's scores need nothing."""
        return self.scores == "saliency"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scores not in SCORES:
            raise MethodConfigError(f"sdtp: scores must be one of {SCORES}, got {self.scores!r}")
        if self.preset not in PRESETS:
            raise MethodConfigError(f"sdtp: unknown preset {self.preset!r}; use one of {sorted(PRESETS)}")
        explicit = {name for name in _PRESET_FIELDS if getattr(self, name) is not None}
        for name in _PRESET_FIELDS:
            if name not in explicit:
                setattr(self, name, PRESETS[self.preset][name])
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise MethodConfigError(f"sdtp: keep_ratio must be in (0, 1], got {self.keep_ratio}; e.g. 0.9")
        if self.first_stage_layer < 1:
            raise MethodConfigError("sdtp: first_stage_layer must be >= 1: layer 0's KV cache gives the next "
                                    "token its position, so it must hold every prompt token")
        if self.stage_interval < 1:
            raise MethodConfigError("sdtp: stage_interval must be >= 1 (default 3)")
        if self.num_stages is not None and self.num_stages < 1:
            raise MethodConfigError("sdtp: num_stages must be >= 1, or None for every stage that fits")
        if self.protect_first < 0 or not 0.0 <= self.protect_last_fraction <= 1.0:
            raise MethodConfigError("sdtp: protect_first must be >= 0 and protect_last_fraction in [0, 1]")
        if self.reference_seq_len < 8:
            raise MethodConfigError("sdtp: reference_seq_len must be >= 8 tokens (default 512)")
        if self.predictor_width is not None and self.predictor_width < 1:
            raise MethodConfigError("sdtp: predictor_width must be >= 1, or None for hidden_size // 4")
        if self.train_sequences is not None and self.train_sequences < 1:
            raise MethodConfigError("sdtp: train_sequences must be >= 1, or None for every calibration row")
        if self.train_seq_len < 16 or self.epochs < 1 or not self.learning_rate > 0 or self.gumbel_tau <= 0:
            raise MethodConfigError("sdtp: need train_seq_len >= 16, epochs >= 1, learning_rate > 0 and "
                                    "gumbel_tau > 0")

    # -- layout and knob -----------------------------------------------------------------------------------
    def stages(self, num_layers: int) -> list[int]:
        layers = stage_layers(num_layers, self.first_stage_layer, self.stage_interval, self.num_stages)
        if not layers:
            raise MethodConfigError(f"sdtp: no stage layer below {num_layers} layers with first_stage_layer="
                                    f"{self.first_stage_layer}; lower it")
        return layers

    def width(self, config) -> int:
        return self.predictor_width or max(1, config.hidden_size // 4)

    def predictor_flops(self, config) -> int:
        """FLOPs per scored token of a stage's scoring: a predictor's matmuls (random scores: none)."""
        if self.scores == "random":
            return 0
        return SaliencyPredictor(config.hidden_size, self.width(config)).flops_per_token()

    def resolved_keep_ratio(self, config) -> float:
        """r: the harness's solved knob if set, else the field if set, else the §5 formula solved at
        reference_seq_len (predictor FLOPs included)."""
        if getattr(self, "_knob_value", None) is not None:
            return float(self._knob_value)
        if self.keep_ratio is not None:
            return float(self.keep_ratio)
        stages = self.stages(config.num_hidden_layers)
        return keep_ratio_for_sparsity(self.sparsity, config, stages, self.reference_seq_len,
                                       self.predictor_flops(config))

    def knob(self, config) -> Knob:
        """r moves c down as it grows; the harness solves it on each unit's inputs (the predictors' training does
        not depend on r beyond the stage budgets, so one artifact serves the solved values)."""
        return Knob("keep_ratio", self.resolved_keep_ratio(config), low=0.01, high=1.0, increasing=False)

    def set_knob(self, value: float | None) -> None:
        self._knob_value = value
        runtime = getattr(self, "_runtime", None)
        if runtime is not None:
            runtime.keep_ratio = self.resolved_keep_ratio(self._model_config)

    def row_flops(self, config, width: int, scored: torch.Tensor | None) -> int:
        """Stage s keeps max(⌈r^s·N⌉, |protected|) of the tokens still present (never more), each predictor scores
        the tokens entering its stage: the FLOPs follow from N and the protected count alone."""
        from methods.sdtp.pruning import protected_positions, stage_budget

        coeff = LayerFlopCoefficients.from_config(config)
        stages = self.stages(config.num_hidden_layers)
        r = self.resolved_keep_ratio(config)
        protected = int(protected_positions(1, width, width, self.protect_first, self.protect_last_fraction,
                                            None if scored is None else scored[None], torch.device("cpu")).sum())
        per_token = self.predictor_flops(config)
        present, flops = width, 0
        for layer in range(config.num_hidden_layers):
            if layer in stages:
                flops += per_token * present
                budget = stage_budget(r, stages.index(layer) + 1, width)
                present = max(1, min(max(budget, protected), present))
            flops += coeff.layer(present)
        return flops

    # -- calibration ---------------------------------------------------------------------------------------
    def new_predictors(self, config) -> dict[int, SaliencyPredictor]:
        """Seeded initial predictors (what training starts from), keyed by stage layer."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return {layer: SaliencyPredictor(config.hidden_size, self.width(config), self.predictor_input_norm)
                    for layer in self.stages(config.num_hidden_layers)}

    def predictors_to_artifact(self, config, predictors: dict[int, SaliencyPredictor],
                               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        artifact: dict[str, Any] = {
            "stage_layers": sorted(predictors), "keep_ratio": self.resolved_keep_ratio(config),
            "hidden_size": config.hidden_size, "predictor_width": self.width(config),
            "predictor_input_norm": self.predictor_input_norm, "num_layers": config.num_hidden_layers,
            **(extra or {})}
        for layer, predictor in predictors.items():
            for key, tensor in predictor.state_dict().items():
                artifact[f"predictor.{layer}.{key}"] = tensor.detach().cpu().clone()
        return artifact

    def calibrate(self, model, tokenizer, calibration: CalibrationSet) -> dict[str, Any]:
        from methods.sdtp.training import TrainingSettings, train_predictors

        config = model.config
        device = next(model.parameters()).device
        predictors = {layer: p.to(device) for layer, p in self.new_predictors(config).items()}
        rows = calibration.input_ids[: self.train_sequences, : self.train_seq_len]
        plan = self.pruning_plan(config)
        settings = TrainingSettings(epochs=self.epochs, learning_rate=self.learning_rate,
                                    weight_decay=self.weight_decay, tau=self.gumbel_tau, seed=self.seed,
                                    progress=self.progress)
        summary = train_predictors(model, predictors, rows, plan, settings)
        self.training_summary = summary
        losses = {k: round(v, 6) for k, v in summary.items() if k.endswith("_loss")}
        return self.predictors_to_artifact(config, predictors, {
            "training_sequences": int(rows.shape[0]), "training_seq_len": int(rows.shape[1]),
            "training_steps": int(summary["steps"]), **losses,
            **self.heldout_ranking(model, predictors, calibration, len(rows))})

    def pruning_plan(self, config):
        """The stages, keep ratio and protected positions training and the held-out check share."""
        from methods.sdtp.training import PruningPlan

        return PruningPlan(tuple(self.stages(config.num_hidden_layers)), self.resolved_keep_ratio(config),
                           self.protect_first, self.protect_last_fraction)

    def heldout_ranking(self, model, predictors, calibration: CalibrationSet, trained_rows: int) -> dict[str, Any]:
        """The predictors' pairwise order agreement with the gradient saliency per stage (0.5: chance), on the
        last HELDOUT_ROWS calibration rows, which training did not see; empty when every row was trained on."""
        from methods.sdtp.training import ranking_accuracy

        held = min(HELDOUT_ROWS, len(calibration.input_ids) - trained_rows)
        if held < 1:
            return {}
        rows = calibration.input_ids[-held:, : self.train_seq_len]
        accuracy = ranking_accuracy(model, predictors, rows, self.pruning_plan(model.config))
        return {"heldout_rank_accuracy": [round(a, 4) for a in accuracy], "heldout_rows": int(held)}

    def load_predictors(self, config) -> dict[int, SaliencyPredictor]:
        artifact = self.artifact
        stages = self.stages(config.num_hidden_layers)
        if list(artifact["stage_layers"]) != stages or artifact["hidden_size"] != config.hidden_size \
                or artifact["num_layers"] != config.num_hidden_layers:
            raise MethodConfigError(
                f"sdtp: the artifact's predictors (stages {artifact['stage_layers']}, hidden "
                f"{artifact['hidden_size']}, {artifact['num_layers']} layers) do not fit this model/layout "
                f"(stages {stages}, hidden {config.hidden_size}, {config.num_hidden_layers} layers); "
                "recalibrate (calibrate --force)")
        predictors = {}
        for layer in stages:
            predictor = SaliencyPredictor(config.hidden_size, int(artifact["predictor_width"]),
                                          bool(artifact["predictor_input_norm"]))
            prefix = f"predictor.{layer}."
            predictor.load_state_dict({k[len(prefix):]: v for k, v in artifact.items() if k.startswith(prefix)})
            predictors[layer] = predictor.eval().requires_grad_(False)
        return predictors

    # -- inference -----------------------------------------------------------------------------------------
    @contextmanager
    def apply(self, model) -> Iterator[Any]:
        config = model.config
        layers = model.model.layers
        stages = self.stages(config.num_hidden_layers)
        device = next(model.parameters()).device
        random_scores = self.scores == "random"
        predictors = {} if random_scores else {layer: p.to(device) for layer, p in self.load_predictors(config).items()}
        self._model_config = config
        runtime = self._runtime = PruningRuntime(
            stages, self.resolved_keep_ratio(config), config.num_hidden_layers, self.protect_first,
            self.protect_last_fraction, LayerFlopCoefficients.from_config(config),
            self.predictor_flops(config),
            random_seed=self.seed if random_scores else None)
        originals = {index: layers[index] for index in range(stages[0], config.num_hidden_layers)}

        def record_ids(module, args, kwargs) -> None:
            runtime.input_ids = kwargs.get("input", args[0] if args else None)

        hook = model.get_input_embeddings().register_forward_pre_hook(record_ids, with_kwargs=True) \
            if random_scores else None
        try:
            for index, layer in originals.items():
                stage = stages.index(index) + 1 if index in stages else None
                layers[index] = SDTPLayer(layer, index, self._runtime, predictors.get(index), stage)
            yield model
        finally:
            for index, layer in originals.items():
                layers[index] = layer
            if hook is not None:
                hook.remove()

    def executed_flops(self) -> int | None:
        runtime = getattr(self, "_runtime", None)
        return None if runtime is None else runtime.stats.analytic_executed_flops

    def reset_stats(self) -> None:
        runtime = getattr(self, "_runtime", None)
        if runtime is not None:
            runtime.stats = PruningStats(runtime.num_layers)

    def measured_stats(self) -> MethodStats:
        runtime = getattr(self, "_runtime", None)
        if runtime is None or runtime.stats.prefill_forwards == 0:
            return MethodStats(None, None, [], [], knob="keep_ratio",
                               knob_value=runtime.keep_ratio if runtime else None,
                               details={"prefill_forwards": 0})
        s = runtime.stats
        kept = [n / s.input_tokens for n in s.tokens_per_layer]
        return MethodStats(
            compute_sparsity=1.0 - s.analytic_executed_flops / s.analytic_dense_flops,
            token_layer_sparsity=1.0 - sum(kept) / len(kept),
            per_layer_computed_fraction=[round(k, 4) for k in kept],
            removed_units=[], knob="keep_ratio", knob_value=runtime.keep_ratio,
            details={"stage_layers": runtime.stage_layers, "prefill_forwards": s.prefill_forwards,
                     "decode_forwards": s.decode_forwards, "final_keep_fraction": kept[-1],
                     "nominal_final_keep_fraction": runtime.keep_ratio ** len(runtime.stage_layers),
                     "stages_at_protected_floor": f"{s.stages_at_protected_floor}/{s.stage_decisions}"})
