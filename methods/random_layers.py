"""Random baseline at matched sparsity: remove n random decoder layers (seeded), n chosen as ShortGPT's."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from methods.base import Method
from methods.layer_removal import RemovesLayers, layers_to_remove


@dataclass
class RandomLayers(RemovesLayers, Method):
    name: ClassVar[str] = "random"

    def removed_indices(self, num_layers: int) -> list[int]:
        n = layers_to_remove(self.sparsity, num_layers)
        return sorted(random.Random(self.seed).sample(range(num_layers), n))
