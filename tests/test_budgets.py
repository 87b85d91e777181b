"""Calibration budgets follow the model's size (bench.budgets)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import budgets
from bench.budgets import SMALL_MODEL_DECODER_PARAMETERS, decoder_parameters, sized_fields
from bench.runner import RunConfig, Runner, plan_methods
from methods import make_method


def test_decoder_parameters_are_the_projection_weights(arch_model):
    """From the shape alone: every architecture's Q, K, V, O and MLP weights (biases, norms, embeddings left out)."""
    weights = sum(p.numel() for name, p in arch_model.model.layers.named_parameters()
                  if name.endswith("proj.weight"))
    assert decoder_parameters(arch_model.config) == weights > 0


def test_the_embedded_models_keep_the_cpu_presets():
    from bench.shapes import model_shape

    for name in ("smollm2-135m", "gemma3-270m"):
        assert decoder_parameters(model_shape(name)) > 5 * SMALL_MODEL_DECODER_PARAMETERS
        assert sized_fields("ftp", {}, model_shape(name)) == {}


def test_a_small_model_gets_the_small_presets_unless_the_user_names_one(tiny):
    tiny = tiny.config
    assert decoder_parameters(tiny) < SMALL_MODEL_DECODER_PARAMETERS
    assert sized_fields("ftp", {"sparsity": 0.25}, tiny) == {"sparsity": 0.25, "preset": "small"}
    assert sized_fields("ftp-static", {}, tiny) == {"preset": "small"}  # variants share the family's presets
    assert sized_fields("sdtp", {}, tiny) == {"preset": "small"}
    assert sized_fields("ftp", {"preset": "paper"}, tiny) == {"preset": "paper"}
    for name in ("shortgpt", "blockpruner", "random", "dense"):  # one budget for every size
        assert sized_fields(name, {"sparsity": 0.25}, tiny) == {"sparsity": 0.25}


def test_a_model_at_the_threshold_keeps_the_cpu_presets(tiny, monkeypatch):
    tiny = tiny.config
    monkeypatch.setattr(budgets, "SMALL_MODEL_DECODER_PARAMETERS", decoder_parameters(tiny))
    assert sized_fields("ftp", {}, tiny) == {}
    assert make_method("ftp", **sized_fields("ftp", {}, tiny)).preset == "cpu"


def test_the_small_presets_cut_the_budgets_that_do_not_shrink_with_the_model():
    small, cpu = make_method("ftp", preset="small"), make_method("ftp", preset="cpu")
    for key in ("warm_start_steps", "warm_start_sequences", "train_sequences", "population", "generations"):
        assert getattr(small, key) < getattr(cpu, key), key
    assert make_method("sdtp", preset="small").train_sequences < make_method("sdtp").train_sequences


def test_the_runner_plans_with_the_model_it_was_given(tmp_path, tiny):
    config = RunConfig(methods=["ftp", "sdtp", "shortgpt"], sparsities=[0.25], results=str(tmp_path / "r"),
                       method_fields={"sdtp": {"preset": "cpu"}})  # the user's preset wins
    runner = Runner(config, model=tiny)
    assert runner.sized and [(m.registry_name, getattr(m, "preset", None)) for m in runner.plan] == [
        ("dense", None), ("ftp", "small"), ("sdtp", "cpu"), ("shortgpt", None)]
    assert make_method("ftp").preset == "cpu"  # without a model: the CPU preset, as before


def test_a_model_whose_shape_is_not_known_offline_is_sized_once_loaded(tmp_path, tiny):
    """A hub id not in the local cache: planned with the default budgets, re-planned (same order) after loading."""
    config = RunConfig(model="someone/not-cached", methods=["sdtp", "ftp"], sparsities=[0.25, 0.4],
                       results=str(tmp_path / "r"), tasks=["piqa"])
    runner = Runner(config)
    assert not runner.sized and {m.preset for m in runner.plan[1:]} == {"cpu"}
    before = [(m.registry_name, m.sparsity, m.seed) for m in runner.plan]
    runner.model = tiny  # what run_groups loads; no group runs
    runner.run_groups([])
    assert runner.sized and {m.preset for m in runner.plan[1:]} == {"small"}
    assert [(m.registry_name, m.sparsity, m.seed) for m in runner.plan] == before


def test_the_distributed_driver_keys_artifacts_as_the_workers_calibrate_them(tmp_path, tiny):
    from bench.artifacts import CalibrationSettings, artifact_key, key_hash
    from bench.executors import _missing_artifacts

    tiny.save_pretrained(tmp_path / "tiny")
    model = str(tmp_path / "tiny")
    runner = Runner(RunConfig(model=model, methods=["sdtp"], results=str(tmp_path / "r")))
    small = make_method("sdtp", sparsity=0.25, seed=0, preset="small")
    expected = key_hash(artifact_key(model, small, CalibrationSettings.for_method(small, 0)))
    assert _missing_artifacts(runner) == {expected: 1}


def test_the_gate_looks_for_the_artifact_its_run_will_use(tmp_path, tiny, monkeypatch):
    from bench import gate

    tiny.save_pretrained(tmp_path / "tiny")
    asked = []
    monkeypatch.setattr(gate, "artifact_exists", lambda method, model, seed: asked.append(method.preset) or False)
    config = gate.GateConfig(run=gate.GateRun(model=str(tmp_path / "tiny")), methods=(gate.MethodGate("sdtp"),))
    runnable, skipped = gate.plan(config)
    assert asked == ["small"] and runnable == [] and "no calibration artifact" in skipped["sdtp"]


def test_a_user_field_that_conflicts_with_the_small_preset_is_one_clear_error(tmp_path, tiny):
    from bench.errors import BenchError

    config = RunConfig(methods=["ftp"], sparsities=[0.25], results=str(tmp_path / "r"),
                       method_fields={"ftp": {"fitness_windows": 4}})  # fits "cpu" (16 held out), not "small" (8)
    assert plan_methods(dataclasses.replace(config, methods=["ftp"]))[1].preset == "cpu"  # the CPU preset accepts it
    with pytest.raises(BenchError, match=r"holdout_windows.*preset 'small'.*\[fields.ftp\]"):
        Runner(config, model=tiny)


def test_a_shape_the_formula_cannot_read_keeps_the_default_budgets():
    from types import SimpleNamespace

    assert sized_fields("ftp", {}, SimpleNamespace(text_config={})) == {}  # e.g. a multimodal config
    assert sized_fields("ftp", {}, None) == {}  # a shape not known offline
