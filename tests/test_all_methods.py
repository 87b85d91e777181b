"""Every registered method (kvpress' default_presses idea): calibrates, prunes, runs, reports, restores."""

from __future__ import annotations

import pytest
import torch

from bench.flops import count_flops
from methods import available_methods, make_method
from methods.base import scoring

# Small settings so calibration on the tiny model takes seconds; everything else is each method's default.
FAST_FIELDS: dict[str, dict] = {
    "blockpruner": {"search_steps": 6},
    "sdtp": {"train_sequences": 2, "train_seq_len": 16},
    "ftp": {"preset": "test"},
}


def _fast_fields(name: str) -> dict:
    for prefix, fields in FAST_FIELDS.items():
        if name == prefix or name.startswith(prefix + "-"):
            return fields
    return {}


@pytest.mark.parametrize("name", available_methods())
def test_every_method_prunes_and_restores(name, tiny, tiny_calibration):
    sparsity = 0.0 if name == "dense" else 0.34
    method = make_method(name, sparsity=sparsity, **_fast_fields(name))
    if method.needs_calibration:
        method.load_artifact(method.calibrate(tiny, None, tiny_calibration))
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        dense_logits = tiny(ids).logits
    dense_flops = count_flops(tiny, ids).decoder
    with method.apply(tiny) as pruned:
        with torch.no_grad(), scoring(torch.zeros_like(ids, dtype=torch.bool)):
            logits = pruned(ids).logits
        with scoring(torch.zeros_like(ids, dtype=torch.bool)):
            flops = count_flops(pruned, ids).decoder
        stats = method.stats()
    assert logits.shape == dense_logits.shape and torch.isfinite(logits).all()
    assert isinstance(stats, dict)
    if name == "dense":
        assert flops == dense_flops and torch.equal(logits, dense_logits)
    else:
        assert flops < dense_flops, f"{name} saved no compute"
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, dense_logits), f"{name} did not restore the dense model"
