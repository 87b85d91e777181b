"""The gate's comparison is a pure function over summary records: these tests feed it tampered baselines and
expect failure, with no model."""

from __future__ import annotations

import copy
import json

import pytest

from bench.errors import BenchError
from bench.gate import DEFAULT_BASELINE, DEFAULT_CONFIG, compare, format_checks, load_gate_config


def _record(retention: float, ppl: float, flops: int, sparsity: float, acc: float) -> dict:
    return {"target_sparsity": 0.25, "retention": retention, "retention_ci": [retention - 0.1, retention + 0.1],
            "accuracy": {"piqa": acc, "arc_easy": acc - 0.1}, "ppl": ppl, "ppl_ratio": ppl / 28.7,
            "matched": {"piqa": True, "efficiency": True}, "decoder_flops": flops,
            "dense_decoder_flops": 1_000_000, "measured_sparsity": {"piqa": sparsity, "efficiency": sparsity},
            "timings": {"prefill_ms": 900.0}}


@pytest.fixture
def config():
    return load_gate_config(DEFAULT_CONFIG)


@pytest.fixture
def current():
    return {"run": {"limit": 25}, "determinism": {"task": "piqa", "identical": True, "items": 25},
            "methods": {"dense": _record(1.0, 28.7, 1_000_000, 0.0, 0.60),
                        "shortgpt": _record(0.80, 60.0, 766_667, 0.2333, 0.50)}}


def _failed(checks) -> list[tuple[str, str]]:
    return [(c.method, c.quantity) for c in checks if c.status == "FAIL"]


def test_identical_passes(config, current):
    assert _failed(compare(copy.deepcopy(current), current, config)) == []


def test_higher_baseline_retention_fails(config, current):
    baseline = copy.deepcopy(current)
    baseline["methods"]["shortgpt"]["retention"] = 0.80 + config.retention_tolerance("shortgpt") + 0.01
    checks = compare(baseline, current, config)
    assert _failed(checks) == [("shortgpt", "retention")]
    table = format_checks(checks)
    assert "FAIL" in table and "retention" in table and "-0.03" in table  # what moved and by how much


def test_retention_drop_within_tolerance_and_gain_pass(config, current):
    baseline = copy.deepcopy(current)
    baseline["methods"]["shortgpt"]["retention"] = 0.80 + config.retention_tolerance("shortgpt") - 0.005
    assert _failed(compare(baseline, current, config)) == []
    baseline["methods"]["shortgpt"]["retention"] = 0.5  # an improvement is not a regression
    assert _failed(compare(baseline, current, config)) == []


def test_dense_accuracy_is_tight(config, current):
    baseline = copy.deepcopy(current)
    baseline["methods"]["dense"]["accuracy"]["piqa"] = 0.60 + config.tolerances.dense_accuracy + 0.01
    assert _failed(compare(baseline, current, config)) == [("dense", "accuracy piqa")]


def test_any_flops_or_sparsity_change_fails(config, current):
    baseline = copy.deepcopy(current)
    baseline["methods"]["shortgpt"]["decoder_flops"] += 1
    baseline["methods"]["dense"]["measured_sparsity"]["piqa"] = 1e-12
    assert set(_failed(compare(baseline, current, config))) == {
        ("shortgpt", "decoder FLOPs"), ("dense", "measured sparsity piqa")}


def test_ppl_tolerance_is_relative_both_ways(config, current):
    """Dense is gated on its perplexity, every other method on its ratio to dense on the same positions."""
    tol = config.tolerances.ppl_relative
    for method, key in (("dense", "ppl"), ("shortgpt", "ppl_ratio")):
        for factor, fails in ((1 + tol / 2, False), (1 + 2 * tol, True), (1 - 2 * tol, True)):
            baseline = copy.deepcopy(current)
            baseline["methods"][method][key] *= factor
            assert bool(_failed(compare(baseline, current, config))) is fails, (method, factor)


def test_an_unmatched_cell_of_a_gated_method_fails(config, current):
    baseline = copy.deepcopy(current)
    current["methods"]["shortgpt"]["matched"]["piqa"] = False
    assert _failed(compare(baseline, current, config)) == [("shortgpt", "matched piqa")]


def test_timings_are_never_gated(config, current):
    baseline = copy.deepcopy(current)
    baseline["methods"]["shortgpt"]["timings"]["prefill_ms"] = 1.0
    checks = compare(baseline, current, config)
    assert _failed(checks) == []
    assert any(c.quantity == "prefill_ms" and c.status == "info" for c in checks)


def test_nondeterminism_and_changed_settings_fail(config, current):
    baseline = copy.deepcopy(current)
    current["determinism"]["identical"] = False
    current["run"] = {"limit": 10}
    assert set(_failed(compare(baseline, current, config))) == {
        ("dense", "bit-identical rescoring (piqa)"), ("*", "gate run settings")}


def test_skipped_method_is_a_loud_note_not_a_failure(config, current):
    baseline = copy.deepcopy(current)
    del current["methods"]["shortgpt"]
    current["skipped"] = {"shortgpt": "not registered"}
    checks = compare(baseline, current, config)
    assert _failed(checks) == []
    assert [(c.method, c.status, c.current) for c in checks if c.quantity == "skipped"] == [
        ("shortgpt", "note", "not registered")]


def test_config_is_typed_and_strict(tmp_path):
    config = load_gate_config(DEFAULT_CONFIG)
    assert config.run.tasks and isinstance(config.run.tasks, tuple) and config.run.limit > 0
    assert {"random", "shortgpt", "blockpruner", "sdtp", "ftp"} <= {m.name for m in config.methods}
    bad = tmp_path / "gate.toml"
    bad.write_text('[run]\nlimt = 3\n')
    with pytest.raises(BenchError, match="limt"):
        load_gate_config(bad)


@pytest.mark.skipif(not DEFAULT_BASELINE.is_file(), reason="no gate baseline committed yet "
                    "(python -m bench gate --update-baseline); .ci/run skips the gate too")
def test_committed_baseline_matches_the_config():
    """The committed baseline was made with the committed config, and every method in it has all its numbers."""
    config = load_gate_config(DEFAULT_CONFIG)
    baseline = json.loads(DEFAULT_BASELINE.read_text())
    assert baseline["run"]["tasks"] == list(config.run.tasks) and baseline["run"]["limit"] == config.run.limit
    assert baseline["determinism"]["identical"] is True
    assert "dense" in baseline["methods"]
    for name, record in baseline["methods"].items():
        assert record["decoder_flops"] > 0 and record["ppl"] > 1, name
        assert set(record["accuracy"]) == set(config.run.tasks), name
