"""Calibration budgets that follow the model's size.

The methods' CPU presets (FTP's and SDTP's "cpu") are sized for SmolLM2 135M and Gemma 3 270M: a few hundred
predictor or router steps, minutes each. Part of that cost does not shrink with the model (FTP's warm start fits
the same 4→64→2 router on logged features whatever the model; SDTP's LM head runs over the full vocabulary at
every step), so a user's small model would still take minutes. Below `SMALL_MODEL_DECODER_PARAMETERS` decoder
parameters a method that declares a small preset (`Method.small_preset`) gets it, unless the user named a preset.

The rule is applied once the model is loaded (the runner re-plans, `bench calibrate` rebuilds its method), and
the preset chosen is an ordinary field: it is part of the artifact key and of every result row's method_params."""

from __future__ import annotations

from typing import Any

from methods import method_class

SMALL_MODEL_DECODER_PARAMETERS = 20_000_000  # SmolLM2 135M has 106M, Gemma 3 270M 100M: both keep "cpu"


def decoder_parameters(model) -> int:
    """Parameters in the decoder layers (embeddings, final norm and LM head left out)."""
    return sum(p.numel() for p in model.model.layers.parameters())


def sized_fields(name: str, fields: dict[str, Any], model) -> dict[str, Any]:
    """`fields` for method `name` on `model`: with the method's small preset added when the model is small and the
    user chose no preset."""
    preset = method_class(name).small_preset
    if preset is None or "preset" in fields or decoder_parameters(model) >= SMALL_MODEL_DECODER_PARAMETERS:
        return fields
    return {**fields, "preset": preset}
