"""Studies as TOML files: the shipped configs load, bad ones are refused with the fix, `--dry-run` plans offline."""

from __future__ import annotations

import pytest

from bench.cli import main
from bench.errors import BenchError
from bench.paths import REPO_ROOT
from bench.plan import overrides_for
from bench.study import load_study

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.toml"))


def test_the_shipped_studies_load():
    assert {p.name for p in CONFIGS} == {"default_cpu.toml", "paper_llama2_7b.toml", "paper_qwen15_7b.toml",
                                         "verdict_smollm2.toml",
                                         "long_prompts_smollm2.toml", "verdict_gemma3.toml",
                                         "verdict_smollm2_seeds.toml", "niah_8k_smollm2.toml"}
    for path in CONFIGS:
        study = load_study(path)
        assert study["methods"] and study["sparsities"]
    # the seeds file adds cells to the verdict's store: the same store, tasks, items and settings, so its seed-0
    # cells are the verdict's own (reused, not recomputed)
    verdict, seeds = (load_study(REPO_ROOT / "configs" / f"verdict_smollm2{s}.toml") for s in ("", "_seeds"))
    for key in ("results", "model", "tasks", "limit", "ppl_windows", "ppl_seq_len", "batch_size", "sparsities",
                "method_fields", "seed"):
        assert seeds[key] == verdict[key], key
    assert set(seeds["methods"]) < set(verdict["methods"]) and seeds["calibration_seeds"] == [0, 1, 2]
    paper = load_study(REPO_ROOT / "configs" / "paper_llama2_7b.toml")
    assert paper["sparsities"] == [0.22, 0.25, 0.30, 0.40] and paper["ppl_seq_len"] == 2048
    assert paper["limit"] is None and paper["dtype"] == "bfloat16"
    assert overrides_for("ftp-static", paper["method_fields"]) == {"preset": "paper"}
    assert overrides_for("blockpruner", paper["calibration"])["seq_len"] == 2048


def test_default_cpu_study_is_what_run_does_with_no_options():
    from bench.cli import build_parser

    defaults = build_parser().parse_args(["run"])
    study = load_study(REPO_ROOT / "configs" / "default_cpu.toml")
    assert study["methods"] == defaults.methods and study["sparsities"] == defaults.sparsity
    assert study["limit"] == defaults.limit and study["ppl_windows"] == defaults.ppl_windows
    from bench.defaults import DEFAULT_TASKS

    assert study["tasks"] == DEFAULT_TASKS and study["model"] == defaults.model


@pytest.mark.parametrize("text, message", [
    ('modle = "x"', "unknown key 'modle'; did you mean 'model'"),
    ("sparsities = [0.25, 1.5]", "sparsities are in [0, 1)"),
    ('limit = "all"', 'write e.g. limit = 50 or "none"'),
    ('methods = ["ftp", "shortgtp"]', "unknown key 'shortgtp'; did you mean 'shortgpt'"),
    ('[fields.ftpp]\npreset = "paper"', "did you mean 'ftp'"),
    ("[calibration.blockpruner]\nsamples = 4", "unknown key 'samples'; did you mean 'n_samples'"),
    ('dtype = "fp16"', 'write e.g. dtype = "bfloat16"'),
    ("model = ", "not valid TOML"),
    ("calibration_seeds = [0, 0]", "write e.g. calibration_seeds = [0, 1, 2]"),
    ("latency_sweep = 1", "write e.g. latency_sweep = true"),
    ('executor = "dask"', 'write e.g. executor = "ray"'),
])
def test_bad_study_files_say_how_to_fix_them(tmp_path, text, message):
    path = tmp_path / "study.toml"
    path.write_text(text + "\n")
    with pytest.raises(BenchError, match=None) as info:
        load_study(path)
    assert message in str(info.value)


def test_bad_field_values_fail_before_any_work(tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text('methods = ["ftp"]\n[fields.ftp]\npreset = "huge"\n')
    assert main(["run", "--config", str(path), "--dry-run", "--results", str(tmp_path / "r")]) == 2
    assert "preset must be one of" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_dry_run_plans_offline_and_the_command_line_wins(tmp_path, capsys):
    config = REPO_ROOT / "configs" / "paper_llama2_7b.toml"
    assert main(["run", "--config", str(config), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    # dense + 8 methods × 4 sparsities, × (8 tasks + WikiText-2 + efficiency)
    assert "33 method settings × 10 units = 330 cells" in out
    assert "| ftp-static | 0.22 | 0 | {'preset': 'paper'} | ftp-" in out and "to calibrate" in out
    assert "calibration.seq_len': 2048" in out
    assert main(["run", "--config", str(config), "--dry-run", "--methods", "shortgpt", "--sparsity", "0.25",
                 "--tasks", "piqa", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "2 method settings × 3 units = 6 cells" in out


def test_study_overrides_reach_the_methods_and_only_them():
    from bench.runner import RunConfig, plan_methods

    config = RunConfig(methods=["ftp-static", "blockpruner"], method_fields={"ftp": {"preset": "paper"}},
                       calibration={"blockpruner": {"n_samples": 2}})
    plan = {m.registry_name: m for m in plan_methods(config)}
    assert plan["ftp-static"].preset == "paper" and plan["ftp-static"].router == "static"
    assert plan["blockpruner"].default_calibration["n_samples"] == 2
    assert plan["blockpruner"].calibration_override == {"n_samples": 2}
    assert type(plan["blockpruner"]).default_calibration["n_samples"] == 1  # the class default is untouched


def test_calibration_seeds_in_a_study_plan_one_artifact_per_seed(tmp_path, capsys):
    path = tmp_path / "seeds.toml"
    path.write_text('methods = ["shortgpt"]\ncalibration_seeds = [0, 1, 2]\nlatency_sweep = true\n')
    assert main(["run", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| shortgpt |")]
    assert [line.split("|")[3].strip() for line in lines] == ["0", "1", "2"]
    assert len({line.split("|")[5].split(":")[0] for line in lines}) == 3  # three artifact keys
