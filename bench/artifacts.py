"""Calibration artifacts (layer indices, deletion orders, router/predictor weights), cached by a content hash
of (model, method, its calibration fields, calibration data, code version). JSON for values, safetensors for
tensors; never pickled models.

Lookup order: the user cache ($BENCH_CACHE/artifacts), then the artifacts committed in methods/artifacts
(for the default model and default sparsities, so a first run needs no training)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bench.calibration import SOURCES, load_calibration
from bench.console import terminal
from bench.datafiles import manifest
from bench.errors import BenchError
from bench.fileutil import json_digest as key_hash
from bench.fileutil import move_into_place
from bench.paths import REPO_ROOT, cache_dir
from methods.base import Method

COMMITTED_DIR = Path(__file__).resolve().parent.parent / "methods" / "artifacts"
_TENSORS = "tensors.safetensors"
_META = "artifact.json"


@dataclass(frozen=True)
class CalibrationSettings:
    n_samples: int
    seq_len: int
    source: str
    seed: int

    @classmethod
    def for_method(cls, method: Method, seed: int) -> CalibrationSettings:
        defaults = {"n_samples": 64, "seq_len": 512, "source": "c4", **method.default_calibration}
        return cls(n_samples=int(defaults["n_samples"]), seq_len=int(defaults["seq_len"]),
                   source=str(defaults["source"]), seed=seed)

    def data_sha256(self) -> list[str]:
        return [manifest()[name]["sha256"] for name in SOURCES[self.source]]


def artifact_key(model_id: str, method: Method, settings: CalibrationSettings) -> dict[str, Any]:
    return {
        "model": model_id,
        "method": type(method).__name__,
        "version": type(method).version,
        "fields": method.calibration_config(),
        "calibration": {**settings.__dict__, "data_sha256": settings.data_sha256()},
    }


def _entry_name(method: Method, digest: str) -> str:
    return f"{type(method).name}-{digest}"


def _content_sha256(values: dict[str, Any], tensor_file: Path | None) -> str:
    h = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    if tensor_file is not None and tensor_file.is_file():
        h.update(tensor_file.read_bytes())
    return h.hexdigest()


def save_artifact(directory: Path, key: dict[str, Any], artifact: dict[str, Any], seconds: float) -> None:
    """Written to a temporary folder, then renamed: a crash never leaves a half-written entry."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in artifact.items() if not isinstance(v, torch.Tensor)}
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensor_file = tmp / _TENSORS if tensors else None
    if tensors:
        save_file(tensors, str(tensor_file))
    meta = {"key": key, "values": values, "tensors": sorted(tensors), "calibration_seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "content_sha256": _content_sha256(values, tensor_file)}
    (tmp / _META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
    move_into_place(tmp, directory, directory.with_name(f".old-{directory.name}-{os.getpid()}"))


class CorruptArtifact(BenchError):
    def __init__(self, directory: Path, reason: str):
        super().__init__(f"calibration artifact {directory} is corrupt ({reason}); {_fix(directory)}")
        self.reason = reason


def _is_committed(directory: Path) -> bool:
    return directory.resolve().parent == COMMITTED_DIR.resolve()


def _fix(directory: Path) -> str:
    if _is_committed(directory):
        where = directory.relative_to(REPO_ROOT) if directory.is_relative_to(REPO_ROOT) else directory
        return f"it ships with the repository: restore it with `git checkout -- {where}` (or reinstall bench)"
    return (f"`python -m bench run` recalibrates a damaged cached artifact by itself, `python -m bench calibrate "
            f"--method M --force` too; or delete {directory}")


def load_artifact_dir(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(artifact, meta), after a full parse and the content-hash check; a corrupt entry raises BenchError with
    the fix."""
    try:
        meta = json.loads((directory / _META).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("values"), dict) \
                or not isinstance(meta.get("tensors"), list):
            raise CorruptArtifact(directory, f"{_META} is not an artifact record")
        tensor_file = directory / _TENSORS
        tensors = load_file(str(tensor_file)) if meta["tensors"] else {}
        if _content_sha256(meta["values"], tensor_file if meta["tensors"] else None) != meta["content_sha256"]:
            raise CorruptArtifact(directory, "content hash mismatch")
        if sorted(tensors) != meta["tensors"]:
            raise CorruptArtifact(directory, "tensors missing")
    except CorruptArtifact:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise CorruptArtifact(directory, f"{type(exc).__name__}: {exc}") from exc
    return {**meta["values"], **tensors}, meta


def find_artifact(name: str) -> Path | None:
    for root in (cache_dir() / "artifacts", COMMITTED_DIR):
        if (root / name / _META).is_file():
            return root / name
    return None


def artifact_name(model_id: str, method: Method, seed: int) -> str:
    """The directory name (`<method>-<key hash>`) of this method's artifact on this model at this calibration seed."""
    return _entry_name(method, key_hash(artifact_key(model_id, method, CalibrationSettings.for_method(method, seed))))


def artifact_exists(method: Method, model_id: str, seed: int = 0) -> bool:
    """Whether a cached or committed artifact serves this method on this model (no calibration needed)."""
    if not method.needs_calibration:
        return True
    return find_artifact(artifact_name(model_id, method, seed)) is not None


def ensure_calibrated(method: Method, model, tokenizer, model_id: str, seed: int = 0,
                      force: bool = False, save_to: Path | None = None) -> dict[str, Any]:
    """Load the method's artifact from a cache, or calibrate and cache it. Returns its meta (incl. key hash)."""
    if not method.needs_calibration:
        return {"key_hash": None, "cached": None}
    settings = CalibrationSettings.for_method(method, seed)
    key = artifact_key(model_id, method, settings)
    digest = key_hash(key)
    name = _entry_name(method, digest)
    target = (save_to or cache_dir() / "artifacts") / name
    locks = cache_dir() / "artifacts" / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{name}.lock")):  # two runs never calibrate the same artifact twice
        found = None if force else find_artifact(name)
        if found is not None:
            try:
                artifact, meta = load_artifact_dir(found)
            except CorruptArtifact as exc:
                if _is_committed(found):
                    raise  # a damaged repository file is refused with the fix, never silently replaced
                print(f"warning: cached calibration artifact {found} is corrupt ({exc.reason}); recalibrating it",
                      file=terminal(), flush=True)
            else:
                method.load_artifact(artifact)
                return {"key_hash": digest, "cached": str(found),
                        "calibration_seconds": meta.get("calibration_seconds")}
        return _calibrate(method, model, tokenizer, settings, key, digest, target, seed)


def _calibrate(method: Method, model, tokenizer, settings: CalibrationSettings, key: dict[str, Any], digest: str,
               target: Path, seed: int) -> dict[str, Any]:
    calibration = load_calibration(tokenizer, settings.n_samples, settings.seq_len, settings.seed, settings.source)
    torch.manual_seed(seed)
    start = time.perf_counter()
    artifact = method.calibrate(model, tokenizer, calibration)
    seconds = time.perf_counter() - start
    save_artifact(target, key, artifact, seconds)
    method.load_artifact(load_artifact_dir(target)[0])  # what later runs will load, bit for bit
    return {"key_hash": digest, "cached": None, "path": str(target), "calibration_seconds": round(seconds, 2)}
