"""Whole-layer removal shared by ShortGPT and the random-layers baseline: delete decoder layers from
`model.model.layers`, renumber attention `layer_idx` and the config so `generate()` with a KV cache works,
and put everything back on exit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from methods.base import MethodStats


def layers_to_remove(target_sparsity: float, num_layers: int) -> int:
    """n minimising |n/L - target| (tie -> smaller n): removing n of L layers gives compute sparsity n/L."""
    return min(range(num_layers), key=lambda n: (abs(n / num_layers - target_sparsity), n))


def layer_removal_stats(removed: Sequence[int], num_layers: int) -> MethodStats:
    """Every layer costs the same, so removing n of L layers gives compute sparsity n/L on any input."""
    fraction = len(removed) / num_layers if num_layers else 0.0
    return MethodStats(compute_sparsity=fraction, token_layer_sparsity=fraction,
                       per_layer_computed_fraction=[0.0 if i in set(removed) else 1.0 for i in range(num_layers)],
                       removed_units=[f"layer {i}" for i in removed], details={"layers_removed": list(removed)})


@contextmanager
def removed_layers(model, indices: Sequence[int]) -> Iterator[object]:
    """Delete the decoder layers at `indices` in place; restore the dense model on exit."""
    decoder = model.model
    config = model.config
    original_layers = decoder.layers
    original_num = config.num_hidden_layers
    original_types = list(config.layer_types) if getattr(config, "layer_types", None) is not None else None
    drop = set(int(i) for i in indices)
    if any(not 0 <= i < len(original_layers) for i in drop):
        raise ValueError(f"layer indices {sorted(drop)} out of range for {len(original_layers)} layers")
    kept = [i for i in range(len(original_layers)) if i not in drop]
    try:
        decoder.layers = nn.ModuleList(original_layers[i] for i in kept)
        for new_idx, layer in enumerate(decoder.layers):
            layer.self_attn.layer_idx = new_idx
        config.num_hidden_layers = len(kept)
        if original_types is not None:
            config.layer_types = [original_types[i] for i in kept]
        yield model
    finally:
        decoder.layers = original_layers
        for idx, layer in enumerate(original_layers):
            layer.self_attn.layer_idx = idx
        config.num_hidden_layers = original_num
        if original_types is not None:
            config.layer_types = original_types


class RemovesLayers:
    """apply() and measured_stats() of a method that deletes the whole layers `removed_indices(L)` names."""

    def removed_indices(self, num_layers: int) -> list[int]:
        raise NotImplementedError

    @contextmanager
    def apply(self, model) -> Iterator[object]:
        self._num_layers = model.config.num_hidden_layers
        self._removed = self.removed_indices(self._num_layers)
        with removed_layers(model, self._removed) as pruned:
            yield pruned

    def measured_stats(self) -> MethodStats:
        return layer_removal_stats(getattr(self, "_removed", []), getattr(self, "_num_layers", 0))
