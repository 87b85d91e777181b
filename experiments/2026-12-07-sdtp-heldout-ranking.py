"""2026-12-07: add the held-out ranking accuracy to the committed SDTP artifacts made before SDTP.calibrate
recorded it (issue 34). For each committed sdtp artifact of an embedded model, the predictors are loaded and
`SDTP.heldout_ranking` is run on the same calibration set as `calibrate` builds (its last HELDOUT_ROWS rows, which
training did not see); the values are added to the artifact's JSON and its content hash recomputed. The predictors
are unchanged, and `python -m bench calibrate --method sdtp --force` recomputes the same field from scratch.

    python experiments/2026-12-07-sdtp-heldout-ranking.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.artifacts import COMMITTED_DIR, _content_sha256, load_artifact_dir  # noqa: E402
from bench.calibration import load_calibration  # noqa: E402
from bench.models import load_model  # noqa: E402
from methods import make_method  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    models: dict[str, tuple] = {}
    for entry in sorted(COMMITTED_DIR.glob("sdtp-*")):
        meta_path = entry / "artifact.json"
        meta = json.loads(meta_path.read_text())
        if "heldout_rank_accuracy" in meta["values"]:
            print(f"{entry.name}: already has it: {meta['values']['heldout_rank_accuracy']}")
            continue
        key = meta["key"]
        model_id = key["model"]
        if model_id not in models:
            models[model_id] = load_model(model_id, "cpu", "float32")
        model, tokenizer = models[model_id]
        method = make_method("sdtp", **{k: v for k, v in key["fields"].items()})
        artifact, _ = load_artifact_dir(entry)
        method.load_artifact(artifact)
        c = key["calibration"]  # the calibration text the artifact was trained on, as its key records it
        calibration = load_calibration(tokenizer, c["n_samples"], c["seq_len"], c["seed"], c["source"])
        trained = min(method.train_sequences or len(calibration.input_ids), len(calibration.input_ids))
        extra = method.heldout_ranking(model, method.load_predictors(model.config), calibration, trained)
        print(f"{entry.name} ({model_id}, c = {key['fields'].get('sparsity')}): {extra}")
        meta["values"].update(extra)
        tensors = entry / "tensors.safetensors"
        meta["content_sha256"] = _content_sha256(meta["values"], tensors if tensors.is_file() else None)
        meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
