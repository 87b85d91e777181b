"""ShortGPT (arXiv 2403.03853): remove the decoder layers with the lowest Block Influence.

BI_l = 1 - mean_t cos(h_l,t, h_{l+1},t) over calibration tokens, computed row-wise from forward hooks on the
raw residual stream. One shot: BI is computed once on the dense model. Removed layers are deleted from
`model.model.layers` (the model stays a normal PreTrainedModel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from methods.base import CalibrationSet, Method, MethodConfigError, MethodStats
from methods.layer_removal import RemovesLayers, layers_to_remove


def block_influence(model, calibration: CalibrationSet, batch_size: int = 4,
                    reference_last_layer_norm: bool = False, progress: bool = True) -> list[float]:
    """BI of every decoder layer, from hooks capturing each layer's input and output hidden states."""
    layers = model.model.layers
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    token_count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            captured[index] = (h_in, h_out)
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        batches = calibration.input_ids.split(batch_size)
        for batch in tqdm(batches, desc="shortgpt: block influence", disable=not progress):
            with torch.inference_mode():
                model(input_ids=batch.to(device), use_cache=False)
            for i in range(len(layers)):
                h_in, h_out = captured[i]
                if reference_last_layer_norm and i == len(layers) - 1:
                    h_out = model.model.norm(h_out)  # the reference reads output_hidden_states' last entry
                cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # row-wise, O(tokens)
                if reference_last_layer_norm:
                    cos = torch.nan_to_num(cos, nan=0.5)
                cos_sum[i] += cos.double().sum().cpu()
            token_count += batch.numel()
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return (1.0 - cos_sum / token_count).tolist()


@dataclass
class ShortGPT(RemovesLayers, Method):
    """Fields: `reference_last_layer_norm` reproduces the reference code's last-layer comparison against the
    final-normed output (off by default: the paper's definition uses the raw residual stream)."""

    reference_last_layer_norm: bool = False
    calibration_batch_size: int = 4

    name: ClassVar[str] = "shortgpt"
    needs_calibration: ClassVar[bool] = True
    # The BI ranking does not depend on the target: one calibration serves every sparsity.
    calibration_ignores: ClassVar[tuple[str, ...]] = ("sparsity", "seed", "calibration_batch_size")
    default_calibration: ClassVar[dict] = {"n_samples": 64, "seq_len": 512}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration_batch_size < 1:
            raise MethodConfigError("shortgpt: calibration_batch_size must be >= 1")

    def calibrate(self, model, tokenizer, calibration: CalibrationSet) -> dict:
        bi = block_influence(model, calibration, self.calibration_batch_size, self.reference_last_layer_norm)
        return {"block_influence": bi, "ranking": sorted(range(len(bi)), key=lambda i: (bi[i], i))}

    def removed_indices(self, num_layers: int) -> list[int]:
        ranking = self.artifact["ranking"]
        if len(ranking) != num_layers:
            raise MethodConfigError(f"shortgpt: artifact ranks {len(ranking)} layers, model has {num_layers}; "
                                    "recalibrate for this model (calibrate --force)")
        return sorted(ranking[: layers_to_remove(self.sparsity, num_layers)])

    def measured_stats(self) -> MethodStats:
        removed = getattr(self, "_removed", [])
        bi = self.artifact.get("block_influence", []) if self._artifact else []
        stats = super().measured_stats()
        stats.details["removed_block_influence"] = [bi[i] for i in removed] if bi else []
        return stats
