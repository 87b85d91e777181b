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


class MethodConfigError(ValueError):
    """A user-caused configuration error (bad hyperparameter, missing artifact)."""


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
    # True when decisions depend on the whole sequence (token routing): the evaluator must not pad batches
    # and must not share prefixes across sequences.
    sequence_dependent: ClassVar[bool] = False

    _artifact: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

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

    def stats(self) -> dict[str, Any]:
        """What actually happened on the forwards since apply(): blocks removed, tokens computed, ..."""
        return {}
