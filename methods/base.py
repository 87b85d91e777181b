"""The `Method` contract every pruning method implements (modelled on kvpress presses).

A method is a dataclass whose fields are its hyperparameters. The harness drives it as

    method = make_method("shortgpt", sparsity=0.25)
    artifact = method.calibrate(model, tokenizer, calibration)   # cached by the harness
    method.load_artifact(artifact)
    with method.apply(model) as pruned:                          # dense model restored on exit
        ... evaluate pruned ...
        method.stats()

Methods know nothing about tasks, results or plots.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from methods.errors import MethodConfigError  # noqa: F401  (re-exported: methods.base.MethodConfigError)


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration token windows: `input_ids` is [n_samples, seq_len], never from an evaluation set."""

    input_ids: torch.Tensor
    source: str
    sha256: str  # content hash of the token windows, part of every artifact key

    @classmethod
    def from_tensor(cls, input_ids: torch.Tensor, source: str) -> CalibrationSet:
        digest = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return cls(input_ids=input_ids, source=source, sha256=digest)

    def split(self, n_holdout: int) -> tuple[CalibrationSet, CalibrationSet]:
        """(train, held-out) split by rows, for methods that score candidates on unseen calibration text."""
        if not 0 < n_holdout < len(self.input_ids):
            raise MethodConfigError(f"cannot hold out {n_holdout} of {len(self.input_ids)} calibration rows")
        head, tail = self.input_ids[:-n_holdout], self.input_ids[-n_holdout:]
        return (CalibrationSet.from_tensor(head, self.source + ":train"),
                CalibrationSet.from_tensor(tail, self.source + ":holdout"))


# --- which positions a caller scores, and which positions have logits -----------------------------------
@dataclass
class ScoringContext:
    """Set by the evaluator around a forward.

    scored: [batch, seq] bool, True where the caller reads the logits (multiple-choice continuations,
        LAMBADA's target word). Token-dropping methods must never drop these. None: every position is read.
    logit_positions: written by a method that drops tokens for good (SDTP): [batch, seq] bool, True where
        the returned logits are real. None: all positions have real logits. Perplexity is computed over these.
    """

    scored: torch.Tensor | None = None
    logit_positions: torch.Tensor | None = None


_SCORING: contextvars.ContextVar[ScoringContext | None] = contextvars.ContextVar("scoring", default=None)


@contextmanager
def scoring(scored: torch.Tensor | None = None) -> Iterator[ScoringContext]:
    ctx = ScoringContext(scored=scored)
    token = _SCORING.set(ctx)
    try:
        yield ctx
    finally:
        _SCORING.reset(token)


def current_scoring() -> ScoringContext | None:
    """The evaluator's context for the forward in progress, or None outside the evaluator (e.g. generate())."""
    return _SCORING.get()


# --- the matching protocol and the stats every method reports --------------------------------------------
@dataclass(frozen=True)
class Knob:
    """An input-dependent method's inference-time setting that moves its compute sparsity monotonically. The
    harness solves it on each unit's own inputs (never labels) so that c is within ±0.02 of the target."""

    name: str
    value: float  # where the solve starts (the calibrated or reference-length value)
    low: float
    high: float
    increasing: bool  # True: c grows with the value
    dense_at: float | None = None  # a value at which the method computes every token by construction (c = 0)


@dataclass
class MethodStats:
    """One vocabulary for what a method did on the forwards since apply() (static methods: by construction).

    compute_sparsity: 1 − executed/dense decoder FLOPs by the method's own accounting (routers and predictors
        included); None before any forward of a method whose compute depends on the input.
    token_layer_sparsity: 1 − the mean over decoder layers of the fraction of tokens each layer computed.
    per_layer_computed_fraction: per decoder layer, the fraction of tokens it computed (0 = removed layer; a
        layer with one of two sub-blocks removed counts as computing its tokens).
    removed_units: what is gone for good ("layer 7", "mha 25", "mlp 3"); token methods remove nothing.
    knob / knob_value: the matching knob and its value in force (None for methods without one).
    details: method-specific extras (flat in the dict form)."""

    compute_sparsity: float | None
    token_layer_sparsity: float | None
    per_layer_computed_fraction: list[float]
    removed_units: list[str]
    knob: str | None = None
    knob_value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    REQUIRED: ClassVar[tuple[str, ...]] = ("compute_sparsity", "token_layer_sparsity",
                                           "per_layer_computed_fraction", "removed_units", "knob", "knob_value")

    def as_dict(self) -> dict[str, Any]:
        return {**self.details, **{k: getattr(self, k) for k in self.REQUIRED}}


@dataclass
class Method:
    """Base class. `sparsity` is the target compute sparsity c = 1 - F_exec/F_dense of the decoder blocks."""

    sparsity: float = 0.0
    seed: int = 0

    name: ClassVar[str] = "base"
    # Bump when a change alters what calibrate() produces: part of the artifact key ("code version").
    version: ClassVar[str] = "1"
    needs_calibration: ClassVar[bool] = False
    # Calibration fields that do not change the artifact (e.g. one BlockPruner search serves every sparsity).
    calibration_ignores: ClassVar[tuple[str, ...]] = ()
    # True when decisions depend on the whole sequence (token routing): the evaluator must not share prefixes
    # across sequences, and a padded batch carries its 2-D padding mask (decisions are per row, on its own tokens).
    sequence_dependent: ClassVar[bool] = False
    # False: a cached forward holds one sequence (FTP: each block caches its own computed tokens per row), so the
    # harness generates row by row; True: rows of equal prompt length share a batch.
    batched_decode: ClassVar[bool] = True
    # The registry name (a variant's, e.g. "ftp-topk"), set by make_method; the class name otherwise.
    registry_name: ClassVar[str] = ""
    # What calibrate() wants from the harness: {"n_samples", "seq_len", "source"}; {} = the harness default.
    default_calibration: ClassVar[dict] = {}
    # The preset a small model gets unless the user names one (bench.budgets); None: one budget for every size.
    small_preset: ClassVar[str | None] = None
    # False: nothing the method does depends on `seed` (no sampled calibration, no random choice): a study's
    # calibration seeds plan it once, and its seed spread is zero by construction.
    seeded: ClassVar[bool] = True

    _artifact: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    _knob_value: float | None = field(default=None, init=False, repr=False, compare=False)
    _calibration_override: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not (0.0 <= float(self.sparsity) < 1.0) \
                or math.isnan(float(self.sparsity)):
            raise MethodConfigError(
                f"{self.name}: sparsity must be in [0, 1), got {self.sparsity!r}; e.g. --sparsity 0.25")
        self.sparsity = float(self.sparsity)

    # -- identity --------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The hyperparameters (dataclass fields), as recorded in every result row."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    def use_calibration(self, calibration: dict[str, Any]) -> None:
        """Calibrate on a study's text settings (`[calibration.NAME]`: n_samples, seq_len, source) instead of the
        method's defaults; they enter its artifact key and its cells' identity (`calibration_override`)."""
        self.default_calibration = {**type(self).default_calibration, **calibration}
        self._calibration_override = dict(calibration)

    @property
    def calibration_override(self) -> dict[str, Any] | None:
        """The study's calibration settings given by `use_calibration`, None when the method's defaults hold."""
        return self._calibration_override

    def calibration_config(self) -> dict[str, Any]:
        """The fields that determine the calibration artifact."""
        return {k: v for k, v in self.config().items() if k not in self.calibration_ignores}

    # -- lifecycle -------------------------------------------------------------------------------------------
    def calibrate(self, model, tokenizer, calibration: CalibrationSet) -> dict[str, Any]:
        """One-off work (scores, search, training). Returns a small artifact: JSON values and tensors."""
        return {}

    def load_artifact(self, artifact: dict[str, Any]) -> None:
        self._artifact = artifact

    @property
    def artifact(self) -> dict[str, Any]:
        if self._artifact is None:
            if self.needs_calibration:
                raise MethodConfigError(f"{self.name}: no calibration artifact loaded; run calibrate() first")
            return {}
        return self._artifact

    @contextmanager
    def apply(self, model) -> Iterator[Any]:
        """Turn `model` into the pruned model in place; restore the dense model on exit."""
        yield model

    # -- matching (the harness's protocol, docs/matching.md) ----------------------------------------
    def knob(self, config) -> Knob | None:
        """Input-dependent methods: the knob the harness solves on each unit's inputs. None: c does not depend on
        the inputs' content (layer and block removal)."""
        return None

    def knob_in_force(self, config) -> float | None:
        """The knob value forward passes use now: the one set by `set_knob`, else the method's own start value."""
        knob = self.knob(config)
        if knob is None:
            return None
        return knob.value if self._knob_value is None else float(self._knob_value)

    def set_knob(self, value: float | None) -> None:
        """Use this knob value from now on (also inside a live apply()); None: back to the method's own."""
        if value is not None:
            raise MethodConfigError(f"{self.name} has no matching knob")

    def row_flops(self, config, width: int, scored: torch.Tensor | None) -> int | None:
        """Executed decoder FLOPs of one unpadded row of `width` tokens (scored: [width] bool) at the current knob,
        where they follow from the row's shape alone (exact budgets); None where they depend on its content (an
        argmax router). The harness then solves the knob by arithmetic; tests check it equals FlopCounterMode."""
        return None

    def executed_flops(self) -> int | None:
        """Decoder FLOPs executed since apply() (or the last reset) by the method's own per-row accounting, which
        tests check equals FlopCounterMode on unpadded rows. Sequence-dependent methods report it so a batch of
        right-padded rows is counted as its rows cost alone (the padding is the batch's work, not the method's,
        and a row's decisions do not depend on it); None: count with FlopCounterMode."""
        return None

    def fit_lengths(self, config, shapes: list[tuple[int, int]]) -> dict[str, Any] | None:
        """Static methods whose compute share depends on sequence length (BlockPruner): choose the pruned model
        for the study's real (batch, width) forwards. Returns {"knob", "value"} or None if nothing depends on it."""
        return None

    def reset_stats(self) -> None:
        """Forget the forwards counted so far (the harness calls it after solving the knob)."""

    def stats(self) -> dict[str, Any]:
        """What actually happened on the forwards since apply(), in `MethodStats`' vocabulary (flat dict)."""
        return self.measured_stats().as_dict()

    def measured_stats(self) -> MethodStats:
        return MethodStats(compute_sparsity=0.0, token_layer_sparsity=0.0, per_layer_computed_fraction=[],
                           removed_units=[])
