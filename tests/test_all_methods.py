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


def _assert_stats_schema(name: str, stats: dict, num_layers: int) -> None:
    """One vocabulary for every method (methods.base.MethodStats)."""
    from methods.base import MethodStats

    assert set(MethodStats.REQUIRED) <= set(stats), f"{name} misses {set(MethodStats.REQUIRED) - set(stats)}"
    assert stats["compute_sparsity"] is None or 0.0 <= stats["compute_sparsity"] < 1.0
    assert stats["token_layer_sparsity"] is None or 0.0 <= stats["token_layer_sparsity"] < 1.0
    fractions = stats["per_layer_computed_fraction"]
    assert isinstance(fractions, list) and all(0.0 <= f <= 1.0 for f in fractions)
    assert name == "dense" or len(fractions) == num_layers, name
    assert isinstance(stats["removed_units"], list) and all(isinstance(u, str) for u in stats["removed_units"])
    assert (stats["knob"] is None) == (stats["knob_value"] is None), name


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
    method.fit_lengths(tiny.config, [tuple(ids.shape)])  # as the harness does (BlockPruner; a no-op otherwise)
    with method.apply(tiny) as pruned:
        with torch.no_grad(), scoring(torch.zeros_like(ids, dtype=torch.bool)):
            logits = pruned(ids).logits
        with scoring(torch.zeros_like(ids, dtype=torch.bool)):
            flops = count_flops(pruned, ids).decoder
        stats = method.stats()
    assert logits.shape == dense_logits.shape and torch.isfinite(logits).all()
    _assert_stats_schema(name, stats, tiny.config.num_hidden_layers)
    if stats["compute_sparsity"] is not None and name != "dense":
        # the method's own accounting agrees with FlopCounterMode (static methods: by construction)
        assert stats["compute_sparsity"] == pytest.approx(1 - flops / dense_flops, abs=1e-9), name
    if name == "dense":
        assert flops == dense_flops and torch.equal(logits, dense_logits)
    else:
        assert flops < dense_flops, f"{name} saved no compute"
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, dense_logits), f"{name} did not restore the dense model"
