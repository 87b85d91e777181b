"""Executed FLOPs equal the analytic formula exactly; ptflops agrees within 1%; compute sparsity is k/L."""

from __future__ import annotations

import pytest
import torch

from bench.flops import (
    LayerFlopCoefficients,
    analytic_decoder_flops,
    compute_sparsity,
    count_flops,
    ptflops_decoder_flops,
)
from methods import make_method


@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_dense_flops_equal_analytic(tiny, seq_len):
    ids = torch.randint(0, 128, (1, seq_len))
    assert count_flops(tiny, ids).decoder == analytic_decoder_flops(tiny.config, seq_len)


def test_batch_scales_flops(tiny):
    ids = torch.randint(0, 128, (3, 10))
    assert count_flops(tiny, ids).decoder == analytic_decoder_flops(tiny.config, 10, batch=3)


def test_smollm2_coefficients_match_methods_md():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         num_hidden_layers=30, head_dim=64)
    coeff = LayerFlopCoefficients.from_config(config)
    assert (coeff.a, coeff.b, coeff.g) == (1_769_472, 2_304, 5_308_416)
    # "At N = 512 the MHA block is 35.7% of a layer's compute"
    assert coeff.attention(512) / coeff.layer(512) == pytest.approx(0.357, abs=5e-4)


def test_ptflops_cross_check_within_one_percent(tiny):
    ids = torch.randint(0, 128, (1, 24))
    measured = count_flops(tiny, ids).decoder
    assert abs(ptflops_decoder_flops(tiny, ids) - measured) <= 0.01 * measured


@pytest.mark.parametrize("sparsity,removed", [(0.17, 1), (0.34, 2), (0.5, 3)])
def test_shortgpt_flops_and_sparsity(tiny, tiny_calibration, sparsity, removed):
    method = make_method("shortgpt", sparsity=sparsity)
    method.load_artifact(method.calibrate(tiny, None, tiny_calibration))
    ids = torch.randint(0, 128, (1, 16))
    dense = count_flops(tiny, ids)
    with method.apply(tiny) as pruned:
        report = count_flops(pruned, ids)
    L = tiny.config.num_hidden_layers
    assert report.decoder == analytic_decoder_flops(tiny.config, 16, num_layers=L - removed)
    assert compute_sparsity(report, dense) == pytest.approx(removed / L, abs=1e-12)
    assert method.stats()["layers_removed"] and len(method.stats()["layers_removed"]) == removed
