"""Every registered method (kvpress' default_presses idea): calibrates, prunes, runs, reports, restores."""

from __future__ import annotations

import pytest
import torch

from bench.flops import LayerFlopCoefficients, analytic_decoder_flops, count_flops
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


pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN_METHODS = ("ftp", "sdtp")  # decisions depend on the tokens: their cached decoding has its own references


def _is_token_method(name: str) -> bool:
    return any(name == p or name.startswith(p + "-") for p in TOKEN_METHODS)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_prunes_and_restores(name, arch_model, tiny_calibration):
    """On each of the five tiny architectures: calibrates, really saves compute (executed FLOPs fall and equal the
    method's own analytic account), keeps scored positions, decodes with a KV cache as without one (methods whose
    pruning does not depend on the tokens; FTP and SDTP have exact references in their own tests, on every
    architecture too), and restores the dense model bit-exactly."""
    model = arch_model
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[0, 18:] = True
    with torch.no_grad():
        dense_logits = model(ids).logits
    method, dense_flops = _calibrated(name, model, tiny_calibration, ids)
    with method.apply(model) as pruned:
        logits, flops, stats = _pruned_forward(method, pruned, ids)
        with torch.no_grad(), scoring(scored) as ctx:
            pruned(ids)
        if ctx.logit_positions is not None:  # a method that drops positions says which survive
            assert bool(ctx.logit_positions[scored].all()), f"{name} dropped a scored position"
        if not _is_token_method(name):
            prompt = ids[:, :12]
            with torch.no_grad():
                cached = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
                uncached = pruned.generate(prompt, max_new_tokens=8, do_sample=False,
                                           use_cache=False)
            assert torch.equal(cached, uncached), f"{name}: cached decoding differs from uncached"
    assert logits.shape == dense_logits.shape and torch.isfinite(logits).all()
    _assert_stats_schema(name, stats, model.config.num_hidden_layers)
    if stats["compute_sparsity"] is not None and name != "dense":
        # the method's own (analytic) accounting agrees with FlopCounterMode
        assert stats["compute_sparsity"] == pytest.approx(1 - flops / dense_flops, abs=1e-9), name
    if name == "dense":
        assert flops == dense_flops and torch.equal(logits, dense_logits)
    else:
        assert flops < dense_flops, f"{name} saved no compute"
    if stats["removed_units"]:  # static removal: FLOPs are the analytic formula of what is left
        assert flops == _analytic_after_removal(model.config, ids.shape[1], stats["removed_units"]), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits), f"{name} did not restore the dense model"


def _calibrated(name: str, model, calibration, ids: torch.Tensor):
    """(the method calibrated on `model` and fitted to `ids`' shape as the harness does, the dense decoder FLOPs on
    `ids`, checked against the analytic formula)."""
    method = make_method(name, sparsity=0.0 if name == "dense" else 0.34, **_fast_fields(name))
    if method.needs_calibration:
        method.load_artifact(method.calibrate(model, None, calibration))
    dense_flops = count_flops(model, ids).decoder
    assert dense_flops == analytic_decoder_flops(model.config, ids.shape[1])
    method.fit_lengths(model.config, [tuple(ids.shape)])  # BlockPruner chooses its blocks; a no-op otherwise
    return method, dense_flops


def _pruned_forward(method, pruned, ids: torch.Tensor):
    """(logits, executed decoder FLOPs, stats) of one pruned forward with no scored position."""
    with torch.no_grad(), scoring(torch.zeros_like(ids, dtype=torch.bool)):
        logits = pruned(ids).logits
    with scoring(torch.zeros_like(ids, dtype=torch.bool)):
        flops = count_flops(pruned, ids).decoder
    return logits, flops, method.stats()


def _analytic_after_removal(config, seq_len: int, removed_units: list[str]) -> int:
    """Decoder FLOPs of the layers and sub-blocks left ("layer 3", "mha 2", "mlp 5" removed)."""
    coeff = LayerFlopCoefficients.from_config(config)
    removed = {tuple(unit.split()) for unit in removed_units}
    total = 0
    for layer in range(config.num_hidden_layers):
        if ("layer", str(layer)) in removed:
            continue
        total += 0 if ("mha", str(layer)) in removed else coeff.attention(seq_len)
        total += 0 if ("mlp", str(layer)) in removed else coeff.mlp(seq_len)
    return total


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", available_methods())
def test_every_method_calibrates_and_runs_in_bfloat16(name, arch, tiny_calibration):
    """The CUDA path runs bf16; CI has no GPU, so every method calibrates, prunes and decodes in bf16 on CPU here.
    FLOP counts do not depend on the dtype: dense and static removal count exactly the float32 analytic formula,
    token methods exactly their own analytic account of the decisions they made."""
    from bench.models import tiny_model

    model = tiny_model(arch).to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    method, dense_flops = _calibrated(name, model, tiny_calibration, ids)
    with method.apply(model) as pruned:
        logits, flops, stats = _pruned_forward(method, pruned, ids)
        with torch.no_grad():
            generated = pruned.generate(ids[:, :12], max_new_tokens=4, do_sample=False)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert generated.shape == (1, 16)
    if stats["compute_sparsity"] is not None:
        assert stats["compute_sparsity"] == pytest.approx(1 - flops / dense_flops, abs=1e-9), name
    if stats["removed_units"]:
        assert flops == _analytic_after_removal(model.config, ids.shape[1], stats["removed_units"]), name
