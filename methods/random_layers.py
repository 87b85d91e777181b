"""Random baseline at matched sparsity: remove n random decoder layers (seeded), n chosen as ShortGPT's."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from methods.base import Method, MethodStats
from methods.layer_removal import layer_removal_stats, layers_to_remove, removed_layers


@dataclass
class RandomLayers(Method):
    name: ClassVar[str] = "random"

    def removed_indices(self, num_layers: int) -> list[int]:
        n = layers_to_remove(self.sparsity, num_layers)
        return sorted(random.Random(self.seed).sample(range(num_layers), n))

    @contextmanager
    def apply(self, model) -> Iterator[object]:
        self._removed = self.removed_indices(model.config.num_hidden_layers)
        self._num_layers = model.config.num_hidden_layers
        with removed_layers(model, self._removed) as pruned:
            yield pruned

    def measured_stats(self) -> MethodStats:
        return layer_removal_stats(getattr(self, "_removed", []), getattr(self, "_num_layers", 0))
