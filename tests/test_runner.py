"""The runner and the results store: tidy rows with provenance, atomic cells, resume after a crash."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

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


def test_wikitext_sparsity_is_counted_on_every_window(tmp_path, monkeypatch, tiny_with_real_vocab, real_tokenizer):
    """c is counted on every window as it was scored; the spread over windows shows how a data-dependent method
    varies by input. Planted FLOPs: windows at sparsity 0.2, 0.3, 0.1."""
    import bench.wikitext
    from bench.flops import analytic_decoder_flops
    from bench.units import CellContext
    from bench.units.perplexity import measure_perplexity

    config = _config(tmp_path, methods=["dense"], tasks=["piqa"], ppl_windows=3, measure_efficiency=False)
    dense = analytic_decoder_flops(tiny_with_real_vocab.config, config.ppl_seq_len)
    counts = [int(0.8 * dense), int(0.7 * dense), int(0.9 * dense)]
    planted = iter(counts)

    def fake_count(model, **call):
        return model(**call), int(next(planted))

    monkeypatch.setattr(bench.wikitext, "counted_forward", fake_count)
    runner = Runner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    context = CellContext(tiny_with_real_vocab, real_tokenizer, runner.tasks, config.limit, progress=False)
    rows = pd.DataFrame(measure_perplexity(context, runner.plan[0], runner.unit_settings()["wikitext2"]))
    by_metric = rows.set_index("metric")
    assert rows["measured_sparsity"].tolist() == pytest.approx([0.2] * len(rows), abs=1e-6)  # all windows
    assert by_metric.loc["compute_sparsity", "value"] == pytest.approx(0.2, abs=1e-6)  # (0.2 + 0.3 + 0.1) / 3
    # bit-exact on every CPU (the gate compares it exactly): one division of integer sums, no SIMD-order mean
    assert by_metric.loc["compute_sparsity", "value"] == 1.0 - sum(counts) / (dense * len(counts))
    assert by_metric.loc["compute_sparsity_sd", "value"] == pytest.approx(0.1, abs=1e-6)
    assert by_metric.loc["compute_sparsity", "stderr"] == pytest.approx(0.1 / 3 ** 0.5, abs=1e-6)


@pytest.mark.parametrize("name", ["shortgpt", "sdtp"])
def test_accuracy_cell_sparsity_is_counted_on_every_scored_forward(tmp_path, tiny_with_real_vocab, real_tokenizer,
                                                                   name):
    """c of an accuracy cell = 1 − Σ executed / Σ dense over every forward exactly as the evaluator ran it; the test
    replays the evaluator's forwards (its own plan) and counts each one independently with FlopCounterMode."""
    from lm_eval.evaluator import evaluate

    from bench.evaluate import BenchLM
    from bench.flops import analytic_decoder_flops, count_flops
    from bench.tasks import build_task_dict
    from methods.base import scoring

    fields = {"sdtp": {"train_sequences": 2, "train_seq_len": 16, "first_stage_layer": 1, "stage_interval": 1}}.get(
        name, {})
    model, layers = tiny_with_real_vocab, tiny_with_real_vocab.config.num_hidden_layers
    config = _config(tmp_path, methods=[name], tasks=["piqa"], measure_ppl=False, measure_efficiency=False)
    runner = Runner(config, model=model, tokenizer=real_tokenizer)
    for method in runner.plan:
        for key, value in fields.items():
            setattr(method, key, value)
    runner.run()
    rows = runner.store.load_rows()
    cell = rows[(rows["method"] == name) & (rows["metric"] == "compute_sparsity")].iloc[0]
    knob_value = cell["knob_value"]
    method = runner.plan[1]
    method.set_knob(None if pd.isna(knob_value) else float(knob_value))
    lm = BenchLM(model, real_tokenizer, batch_size=config.batch_size, sequence_dependent=method.sequence_dependent,
                 progress=False, plan_only=True)
    evaluate(lm=lm, task_dict=build_task_dict(["piqa"]), limit=config.limit, bootstrap_iters=0, verbosity="ERROR")
    executed = dense = 0
    with method.apply(model) as pruned:
        for forward in lm.workload:
            mask = forward.kwargs.get("attention_mask")
            if mask is None or mask.dim() != 2:  # unpadded or a packed (4-D mask) row: the forward as it ran
                with scoring(forward.scored):
                    executed += count_flops(pruned, forward.input_ids, attention_mask=mask).decoder
                dense += analytic_decoder_flops(model.config, forward.shape[1], batch=forward.shape[0],
                                                num_layers=layers)
                continue
            for row, n in enumerate(mask.sum(-1).tolist()):  # right-padded rows: each counted as it costs alone
                with scoring(forward.scored[row:row + 1, :n]):
                    executed += count_flops(pruned, forward.input_ids[row:row + 1, :n]).decoder
                dense += analytic_decoder_flops(model.config, n, batch=1, num_layers=layers)
    assert cell["value"] == pytest.approx(1 - executed / dense, abs=1e-12)
    assert cell["n"] == 6  # 3 items × 2 choices: every request counted
    acc = rows[(rows["method"] == name) & (rows["metric"] == "acc_norm")].iloc[0]
    assert acc["measured_sparsity"] == cell["value"] and acc["matched"] == (abs(cell["value"] - 0.25) <= 0.02)


def test_sdtp_scores_are_the_same_at_batch_1_and_16(tmp_path, tiny_with_real_vocab, real_tokenizer):
    """Per-row budgets and same-span batching: a row's log-likelihoods do not depend on its batch."""
    from lm_eval.evaluator import evaluate

    from bench.evaluate import BenchLM
    from bench.tasks import build_task_dict
    from methods import make_method
    from methods.base import CalibrationSet

    model = tiny_with_real_vocab
    method = make_method("sdtp", sparsity=0.25, keep_ratio=0.6, train_sequences=2, train_seq_len=16, progress=False)
    g = torch.Generator().manual_seed(0)
    calibration = CalibrationSet.from_tensor(torch.randint(0, 1000, (4, 32), generator=g), "random-tokens")
    method.load_artifact(method.calibrate(model, None, calibration))
    scores = {}
    for batch in (1, 16):
        with method.apply(model) as pruned:
            lm = BenchLM(pruned, real_tokenizer, batch_size=batch, sequence_dependent=True, progress=False)
            out = evaluate(lm=lm, task_dict=build_task_dict(["openbookqa"]), limit=8, log_samples=True,
                           bootstrap_iters=0, verbosity="ERROR")
        scores[batch] = [[float(r[0]) for r in s["filtered_resps"]] for s in out["samples"]["openbookqa"]]
        if batch == 16:
            assert lm.engine.forwards < 32  # rows really were batched
    torch.testing.assert_close(torch.tensor(scores[1]), torch.tensor(scores[16]), rtol=0, atol=1e-4)


def test_determinism_unit_is_a_dense_cell_and_catches_noise(tmp_path, tiny_with_real_vocab, real_tokenizer):
    """The gate's determinism check is a unit of its study: dense only, stored like any cell; a model whose
    scores move between two scorings reads identical = 0."""
    from bench.units import DETERMINISM, CellContext, measure_determinism

    config = _config(tmp_path, tasks=["piqa"], determinism_task="piqa", measure_ppl=False, measure_efficiency=False)
    runner = Runner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    runner.run()
    rows = runner.store.load_rows()
    found = rows[rows["task"] == DETERMINISM]
    assert found["method"].tolist() == ["dense"] and found["value"].tolist() == [1.0] and found["n"].tolist() == [3]
    noise = tiny_with_real_vocab.lm_head.register_forward_hook(lambda m, a, out: out + 1e-3 * torch.randn_like(out))
    try:
        context = CellContext(tiny_with_real_vocab, real_tokenizer, ["piqa"], 3, progress=False)
        (row,) = measure_determinism(context, runner.plan[0], {"task": "piqa", "limit": 3})
    finally:
        noise.remove()
    assert row["value"] == 0.0


def test_calibration_seeds_give_one_cell_per_seed_and_a_seed_aware_summary(tmp_path, tiny_with_real_vocab,
                                                                             real_tokenizer):
    """--calibration-seeds 0,1,2: every pruned method is calibrated and measured once per seed (its own cells and
    artifact), dense once; the summary line pools the seeds and reports their spread."""
    from bench.summary import format_summary, summarize

    config = _config(tmp_path, methods=["random", "shortgpt"], tasks=["piqa", "arc_easy"], calibration_seeds=[0, 1, 2],
                     measure_efficiency=False)
    runner = Runner(config, model=tiny_with_real_vocab, tokenizer=real_tokenizer)
    runner.run()
    rows = runner.store.load_rows()
    per_seed = rows[rows["metric"] == "acc_norm"].groupby("method")["calibration_seed"].apply(
        lambda s: sorted(s.dropna().astype(int).unique().tolist()))
    assert per_seed.to_dict() == {"dense": [], "random": [0, 1, 2], "shortgpt": [0, 1, 2]}
    assert rows[(rows["method"] == "random") & (rows["task"] == "piqa")]["cell"].nunique() == 3
    summary = summarize(rows, runner.store).set_index("method")
    assert summary.loc["random", "seeds"] == 3 and summary.loc["dense", "seeds"] == 1
    assert summary.loc["random", "seed_min"] <= summary.loc["random", "retention"] <= summary.loc["random", "seed_max"]
    assert "seeds [retention min, max]" in format_summary(summary.reset_index())
