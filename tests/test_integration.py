"""The real default model (SmolLM2-135M from the installed wheel), with a small item limit."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from bench.flops import analytic_decoder_flops, count_flops, ptflops_decoder_flops
from bench.runner import RunConfig, Runner

pytestmark = pytest.mark.integration


def test_dense_flops_at_512_match_analytic_and_ptflops(real_model):
    model, _ = real_model
    ids = torch.randint(0, 1000, (1, 512))
    measured = count_flops(model, ids).decoder
    analytic = analytic_decoder_flops(model.config, 512)
    assert measured == analytic == 30 * (1_769_472 * 512 + 2_304 * 512 * 512 + 5_308_416 * 512)
    assert abs(ptflops_decoder_flops(model, ids) - measured) <= 0.01 * measured


def test_shortgpt_run_on_real_model(tmp_path, real_model):
    model, tokenizer = real_model
    config = RunConfig(methods=["shortgpt"], sparsities=[0.25], tasks=["piqa"], limit=24,
                       results=str(tmp_path / "results"), ppl_windows=2, latency_repeats=1, decode_tokens=2,
                       latency_seq_len=128,
                       progress=False)
    runner = Runner(config, model=model, tokenizer=tokenizer)
    runner.run()
    rows = pd.read_parquet(tmp_path / "results" / "cells")
    eff = rows[(rows["task"] == "efficiency") & (rows["metric"] == "compute_sparsity")].set_index("method")["value"]
    assert eff["shortgpt"] == pytest.approx(7 / 30, abs=1e-12)  # committed BI ranking: 7 of 30 layers
    assert abs(eff["shortgpt"] - 0.25) <= 0.02
    ppl = rows[rows["metric"] == "ppl"].set_index("method")["value"]
    assert 20 < ppl["dense"] < 40 and ppl["shortgpt"] > ppl["dense"]
    acc = rows[(rows["task"] == "piqa") & (rows["metric"] == "acc")].set_index("method")["value"]
    assert 0.5 < acc["dense"] <= 1.0
    assert rows.loc[rows["method"] == "shortgpt", "artifact"].notna().all()
