"""What measuring a cell needs besides the method: the dense model, its tokenizer and the study's settings, with
the per-study caches (the forwards' shapes per task, the dense model's perplexity per window set). The units
(bench.units.accuracy, .perplexity, .efficiency) are functions of (context, method, settings) -> rows; nothing
here knows about the store, cells or executors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.console import library_output_to
from bench.matching import MatchResult, Workload, is_matched, solve_knob
from methods import Method

# unit names besides the tasks, "wikitext2" and "efficiency" (bench.units.measure dispatches on them)
DETERMINISM = "determinism"
LATENCY_SWEEP = "latency_sweep"

def decode_windows(config) -> list[int | None]:
    """Per decoder layer, the number of keys a decoded token attends to at most (None: its whole cache): the
    sliding window on layers of type "sliding_attention" (Gemma 3), or on every layer when the config has one and no
    layer types (Mistral)."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" and window else None for t in types[:layers]]
    return [window if window and getattr(config, "use_sliding_window", True) else None] * layers


def fits_lengths(method: Method) -> bool:
    """Does this static method choose its pruned model from the study's sequence lengths (BlockPruner)?"""
    return type(method).fit_lengths is not Method.fit_lengths


@dataclass
class CellContext:
    model: Any
    tokenizer: Any
    tasks: list[str]  # the study's tasks (a length-fitted method is fitted on all of them)
    limit: int | None
    batch_size: int = 16
    progress: bool = True
    dense_layers: int = 0  # the dense model's decoder layers (a method may remove some while it is applied)
    log: Path | None = None  # where lm-eval's own output goes (bench.console); None: the terminal (--verbose)
    _shapes: dict[tuple[str, bool], list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    _dense_ppl: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dense_layers = self.dense_layers or self.model.config.num_hidden_layers
        # each dense layer's attention span when decoding (a method may change the config while applied)
        self._decode_windows = decode_windows(self.model.config)[:self.dense_layers]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer's local directory (generated tasks size their prompts with it), None if it has none."""
        return getattr(self.tokenizer, "name_or_path", None) or None

    def dense_flops(self, batch: int, width: int) -> int:
        """The dense model's decoder FLOPs on a [batch, width] forward (equal to its FlopCounterMode count)."""
        from bench.flops import analytic_decoder_flops

        return analytic_decoder_flops(self.model.config, width, batch=batch, num_layers=self.dense_layers)

    def dense_decode_flops(self, batch: int, past: int) -> int:
        """The dense model's decoder FLOPs of one decode step: `batch` rows of one new token each attending to a
        cache of `past` tokens plus itself, or to the last `window` tokens on a sliding-window layer, whose cache
        keeps only those (equal to its FlopCounterMode count, tests/test_generation.py)."""
        from methods.flop_coefficients import LayerFlopCoefficients

        coeff = LayerFlopCoefficients.from_config(self.model.config)
        return batch * sum(coeff.layer(1, past + 1 if w is None else min(past + 1, w)) for w in self._decode_windows)

    def task_shapes(self, task: str, sequence_dependent: bool) -> list[tuple[int, int]]:
        """The (batch, width) of every forward the evaluator will run on `task`, read without running the model
        (lm-eval builds the requests, the engine plans its batches)."""
        from lm_eval.evaluator import evaluate

        from bench.evaluate import BenchLM
        from bench.tasks import build_task_dict

        key = (task, sequence_dependent)
        if key not in self._shapes:
            lm = BenchLM(self.model, self.tokenizer, batch_size=self.batch_size,
                         sequence_dependent=sequence_dependent, progress=False, plan_only=True)
            with library_output_to(self.log):
                evaluate(lm=lm, task_dict=build_task_dict([task], self.limit, tokenizer=self.tokenizer_path),
                         limit=self.limit,
                         bootstrap_iters=0, verbosity="ERROR")
            self._shapes[key] = [f.shape for f in lm.workload]
        return self._shapes[key]

    def fit(self, method: Method, shapes: list[tuple[int, int]]) -> MatchResult:
        """Static methods: choose the pruned model for these forwards (a no-op for layer removal)."""
        result = MatchResult(target=method.sparsity)
        fitted = method.fit_lengths(self.model.config, shapes)
        if fitted:
            result.knob, result.value = fitted["knob"], float(fitted["value"])
        return result

    def solve(self, method: Method, model, workload: Workload) -> MatchResult:
        """Input-dependent methods: solve the knob on this unit's forwards (inside the live apply())."""
        result = solve_knob(method, model, workload, self.dense_flops)
        method.reset_stats()
        return result

    @staticmethod
    def match_columns(match: MatchResult, measured: float | None) -> dict[str, Any]:
        matched = is_matched(measured, match.target)
        reason = match.reason or (None if matched else f"c = {measured} is off the target {match.target:g} "
                                  "by more than 0.02 on the scored inputs")
        return {"measured_sparsity": measured, "matched": matched, "knob": match.knob,
                "knob_value": match.value, "unmatched_reason": None if matched else reason,
                "solve_s": match.seconds}

    def dense_perplexity(self, windows: torch.Tensor):
        """The dense model's per-prediction NLL on these windows (once per run), for ppl on the same positions."""
        from bench.wikitext import perplexity

        key = (tuple(windows.shape), int(windows.sum()))
        if key not in self._dense_ppl:
            self._dense_ppl[key] = perplexity(self.model, windows, progress=False)
        return self._dense_ppl[key]
