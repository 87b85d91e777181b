"""Calibration budgets follow the model's size (bench.budgets)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import budgets
from bench.budgets import SMALL_MODEL_DECODER_PARAMETERS, decoder_parameters, sized_fields
from bench.runner import RunConfig, Runner, plan_methods
from methods import make_method


def test_decoder_parameters_leave_out_embeddings_and_head(tiny):
    total = sum(p.numel() for p in tiny.parameters())
    layers = sum(p.numel() for layer in tiny.model.layers for p in layer.parameters())
    assert decoder_parameters(tiny) == layers < total


def test_a_small_model_gets_the_small_presets_unless_the_user_names_one(tiny):
    assert decoder_parameters(tiny) < SMALL_MODEL_DECODER_PARAMETERS
    assert sized_fields("ftp", {"sparsity": 0.25}, tiny) == {"sparsity": 0.25, "preset": "small"}
    assert sized_fields("ftp-static", {}, tiny) == {"preset": "small"}  # variants share the family's presets
    assert sized_fields("sdtp", {}, tiny) == {"preset": "small"}
    assert sized_fields("ftp", {"preset": "paper"}, tiny) == {"preset": "paper"}
    for name in ("shortgpt", "blockpruner", "random", "dense"):  # one budget for every size
        assert sized_fields(name, {"sparsity": 0.25}, tiny) == {"sparsity": 0.25}


def test_a_model_at_the_threshold_keeps_the_cpu_presets(tiny, monkeypatch):
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


def test_a_user_field_that_conflicts_with_the_small_preset_is_one_clear_error(tmp_path, tiny):
    from bench.errors import BenchError

    config = RunConfig(methods=["ftp"], sparsities=[0.25], results=str(tmp_path / "r"),
                       method_fields={"ftp": {"fitness_windows": 4}})  # fits "cpu" (16 held out), not "small" (8)
    Runner(dataclasses.replace(config, methods=["ftp"]))  # planned without the model: the CPU preset accepts it
    with pytest.raises(BenchError, match=r"holdout_windows.*preset 'small'.*\[fields.ftp\]"):
        Runner(config, model=tiny)
