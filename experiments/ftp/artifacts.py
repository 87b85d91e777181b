"""What the FTP scripts share: the committed artifacts of the current recipe, and an artifact loaded back into the
method, calibration text and windows that made it (imported by the scripts run as `PYTHONPATH=. python
scripts/NAME.py`)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.artifacts import COMMITTED_DIR, CalibrationSettings, artifact_key, key_hash, load_artifact_dir
from bench.calibration import CalibrationSet, load_calibration
from bench.models import DEFAULT_MODEL
from methods import make_method
from methods.ftp.method import FTP, CalibrationWindows, recorded_fields


def committed_seeds(seeds=(0, 1, 2), sparsity: float = 0.25, name: str = "ftp") -> list[Path]:
    """The committed artifact directories the current defaults key to, one per seed (default model)."""
    out = []
    for seed in seeds:
        method = make_method(name, sparsity=sparsity, seed=seed)
        key = artifact_key(DEFAULT_MODEL, method, CalibrationSettings.for_method(method, seed))
        out.append(COMMITTED_DIR / f"{name.split('-')[0]}-{key_hash(key)}")
    return out


@dataclass
class Loaded:
    """An artifact with what made it: `method` holds the artifact (its router and schedules) and the fields of its
    key; `windows` are drawn as `FTP.calibrate` drew them, and `rng` is the stream after that draw."""

    directory: Path
    artifact: dict[str, Any]
    method: FTP
    calibration: CalibrationSet
    windows: CalibrationWindows
    rng: random.Random


def load(directory: Path, tokenizer, device="cpu", **overrides) -> Loaded:
    """The artifact in `directory` with the method its key names (its fields less the fixed recipe; `overrides` on
    top) and that method's calibration text and windows."""
    artifact, meta = load_artifact_dir(directory)
    fields = {**recorded_fields(meta["key"]["fields"]), "progress": False, **overrides}
    method = make_method("ftp", **fields)
    method.load_artifact(artifact)
    settings = CalibrationSettings.for_method(method, method.seed)
    calibration = load_calibration(tokenizer, settings.n_samples, settings.seq_len, settings.seed, settings.source)
    torch.manual_seed(method.seed)  # router init, as calibrate seeds it
    rng = random.Random(method.seed)
    return Loaded(directory, artifact, method, calibration, method.calibration_windows(calibration, rng, device), rng)


def field_overrides(fields: list[str]) -> dict[str, Any]:
    """`field=value` command-line overrides of FTP fields, values read as JSON where they parse (else strings)."""
    out: dict[str, Any] = {}
    for text in fields:
        key, value = text.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
