"""Reverse-order layer pruning ("tail"): remove the n decoder layers just before the last one, n as ShortGPT's.

The control for ShortGPT's Block-Influence choice: a reassessment of layer pruning (Lu et al., "Reassessing Layer
Pruning in LLMs: New Insights and Methods", arXiv 2411.15558) found that removing the deepest layers in reverse
order matches or beats BI selection on Llama-3.1-8B. The final layer is kept (it writes what the LM head reads).
No calibration: the choice depends on the layer count alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import Method
from methods.layer_removal import RemovesLayers, layers_to_remove


@dataclass
class TailLayers(RemovesLayers, Method):
    name: ClassVar[str] = "tail"
    seeded: ClassVar[bool] = False

    def removed_indices(self, num_layers: int) -> list[int]:
        """Layers L−1−n … L−2 for n = round(c·L) (ties to the smaller n, as ShortGPT)."""
        n = min(layers_to_remove(self.sparsity, num_layers), num_layers - 1)
        return list(range(num_layers - 1 - n, num_layers - 1))
