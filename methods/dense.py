"""The dense reference: nothing removed, sparsity 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import Method, MethodConfigError, MethodStats


@dataclass
class Dense(Method):
    name: ClassVar[str] = "dense"
    seeded: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity != 0.0:
            raise MethodConfigError("dense has sparsity 0 by definition; drop --sparsity for it")

    def measured_stats(self) -> MethodStats:
        return MethodStats(compute_sparsity=0.0, token_layer_sparsity=0.0, per_layer_computed_fraction=[],
                           removed_units=[], details={"layers_removed": []})
