"""Calibration budgets that follow the model's size.

The methods' CPU presets (FTP's and SDTP's "cpu") are sized for SmolLM2 135M and Gemma 3 270M: a few hundred
predictor or router steps, minutes each. Part of that cost does not shrink with the model (FTP's warm start fits
the same 4→64→2 router on logged features whatever the model; SDTP's LM head runs over the full vocabulary at
every step), so a user's small model would still take minutes. Below `SMALL_MODEL_DECODER_PARAMETERS` decoder
parameters a method that declares a small preset (`Method.small_preset`) gets it, unless the user named a preset.

The rule reads the model's shape: the runner plans with the model it was given or re-plans once it has loaded it,
`bench calibrate` rebuilds its method after loading, `--dry-run` reads the shape offline; the preset chosen is an ordinary field: it is part of the artifact key and of every result row's method_params."""

from __future__ import annotations

from typing import Any

from methods import method_class
from methods.flop_coefficients import LayerFlopCoefficients

SMALL_MODEL_DECODER_PARAMETERS = 20_000_000  # SmolLM2 135M has 106M, Gemma 3 270M 100M: both keep "cpu"


def decoder_parameters(config) -> int:
    """Projection weights of the decoder layers from the model's shape (a config or `bench.shapes.model_shape`), so a
    plan can be sized without loading weights: Q, K, V, O and the gated MLP, i.e. half the per-token linear FLOPs of
    the FLOP formula (embeddings, LM head, biases and norms left out)."""
    coeff = LayerFlopCoefficients.from_config(config)
    return config.num_hidden_layers * (coeff.a + coeff.g) // 2


def is_small(config) -> bool:
    """Below the threshold; False for an unknown shape (None) or one this formula cannot read (such a model keeps
    the default budgets)."""
    if config is None:
        return False
    try:
        return decoder_parameters(config) < SMALL_MODEL_DECODER_PARAMETERS
    except (AttributeError, TypeError):
        return False


def shape_matters(plan) -> bool:
    """Would the model's shape change any of these planned methods (one of them has a small preset)?"""
    return any(type(method).small_preset for method in plan)


def sized_fields(name: str, fields: dict[str, Any], config) -> dict[str, Any]:
    """`fields` for method `name` on a model of shape `config` (None: not known): with the method's small preset
    added when the model is small and the user chose no preset."""
    preset = method_class(name).small_preset
    if preset is None or "preset" in fields or not is_small(config):
        return fields
    return {**fields, "preset": preset}
