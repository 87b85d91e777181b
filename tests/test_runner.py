"""The runner and the results store: tidy rows with provenance, atomic cells, resume after a crash."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.runner import RunConfig, Runner
from bench.store import SCHEMA, Store

REQUIRED = ["model", "method", "target_sparsity", "measured_sparsity", "task", "metric", "value", "n", "seed",
            "device", "dtype", "cell", "torch", "transformers", "lm_eval", "git_commit", "timestamp"]


def _config(tmp_path, **overrides) -> RunConfig:
    base = dict(model="tiny", methods=["shortgpt"], sparsities=[0.25], tasks=["piqa", "arc_easy"], limit=3,
                results=str(tmp_path / "results"), ppl_seq_len=64, ppl_windows=1, latency_seq_len=32,
                latency_repeats=1, decode_tokens=2, progress=False, batch_size=4)
    base.update(overrides)
    return RunConfig(**base)


class CountingRunner(Runner):
    """Counts measurements; optionally dies after `crash_after` of them (a simulated kill)."""

    crash_after: int | None = None

    def measure(self, method, unit, settings):
        self.calls = getattr(self, "calls", 0) + 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        return super().measure(method, unit, settings)


def test_rows_are_tidy_with_provenance(tmp_path, tiny_with_real_vocab, real_tokenizer):
    runner = Runner(_config(tmp_path), model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    runner.run()
    rows = pd.read_parquet(tmp_path / "results" / "cells")  # the whole store in one pandas call
    assert list(rows.columns) == list(SCHEMA)
    assert rows[REQUIRED].notna().all().all(), rows[REQUIRED].isna().sum()
    assert set(rows["method"]) == {"dense", "shortgpt"}
    acc = rows[(rows["task"] == "piqa") & (rows["metric"] == "acc")]
    assert len(acc) == 2 and (acc["n"] == 3).all()
    short = rows[(rows["method"] == "shortgpt") & (rows["task"] == "efficiency")].set_index("metric")
    # 4 layers, target 0.25 -> 1 layer removed -> measured compute sparsity exactly 1/4
    assert short.loc["compute_sparsity", "value"] == pytest.approx(0.25, abs=1e-12)
    assert short.loc["decoder_flops", "value"] == pytest.approx(0.75 * short.loc["dense_decoder_flops", "value"])
    # per-sample scores are kept for paired statistics
    cell = acc[acc["method"] == "dense"]["cell"].iloc[0]
    samples = Store(tmp_path / "results").load_samples(cell)
    assert [s["doc_id"] for s in samples] == [0, 1, 2] and all(len(s["loglikelihoods"]) == 2 for s in samples)


def test_resume_after_crash_recomputes_nothing_complete(tmp_path, tiny_with_real_vocab, real_tokenizer):
    config = _config(tmp_path)
    first = CountingRunner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    first.crash_after = 5
    with pytest.raises(KeyboardInterrupt):
        first.run()
    store = Store(config.results)
    done = {p.name for p in store.cells.iterdir() if not p.name.startswith(".")}
    assert len(done) == 5
    assert not [p for p in store.cells.iterdir() if p.name.startswith(".")]  # no half-written cell left
    second = CountingRunner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    second.run()
    total_units = 2 * 4  # (dense, shortgpt) x (piqa, arc_easy, wikitext2, efficiency)
    assert second.calls == total_units - 5
    assert set(second.cells_skipped) == done
    third = CountingRunner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    third.run()
    assert getattr(third, "calls", 0) == 0
    forced = CountingRunner(_config(tmp_path, force=True), model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    forced.run()
    assert forced.calls == total_units
