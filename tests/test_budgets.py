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
    from bench.study import model_shape

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
    config = RunConfig(methods=["ftp", "shortgpt"], sparsities=[0.25], results=str(tmp_path / "r"),
                       method_fields={"sdtp": {"preset": "cpu"}})
    runner = Runner(config, model=tiny)
    assert runner.sized and {m.registry_name: getattr(m, "preset", None) for m in runner.plan} == {
        "dense": None, "ftp": "small", "shortgpt": None}
    assert [m.registry_name for m in plan_methods(config)] == [m.registry_name for m in runner.plan]
    assert make_method("ftp").preset == "cpu"  # without a model: the CPU preset, as before


def test_the_dry_run_plans_the_budgets_run_will_use(tmp_path, tiny):
    from bench.artifacts import CalibrationSettings, artifact_key, key_hash
    from bench.study import dry_run

    tiny.save_pretrained(tmp_path / "tiny")  # a user's local model: its shape is read offline
    lines = []
    dry_run(RunConfig(model=str(tmp_path / "tiny"), methods=["sdtp"], results=str(tmp_path / "r")), lines.append)
    planned = Runner(RunConfig(model=str(tmp_path / "tiny"), methods=["sdtp"], results=str(tmp_path / "r")),
                     model=tiny).plan[1]
    assert planned.preset == "small"
    key = key_hash(artifact_key(str(tmp_path / "tiny"), planned, CalibrationSettings.for_method(planned, 0)))
    row = next(line for line in lines if line.startswith("| sdtp |"))
    assert f"sdtp-{key}: to calibrate" in row  # the artifact run will make, not the CPU preset's


def test_a_user_field_that_conflicts_with_the_small_preset_is_one_clear_error(tmp_path, tiny):
    from bench.errors import BenchError

    config = RunConfig(methods=["ftp"], sparsities=[0.25], results=str(tmp_path / "r"),
                       method_fields={"ftp": {"fitness_windows": 4}})  # fits "cpu" (16 held out), not "small" (8)
    Runner(dataclasses.replace(config, methods=["ftp"]))  # planned without the model: the CPU preset accepts it
    with pytest.raises(BenchError, match=r"holdout_windows.*preset 'small'.*\[fields.ftp\]"):
        Runner(config, model=tiny)
