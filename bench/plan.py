"""Planning a study: its settings (`RunConfig`, from the command line or a study file) and the groups of cells
they make (`plan_methods`: dense first, then each method at each sparsity and calibration seed, validated before any
work). Nothing here runs a model: bench.study parses study files, bench.dry_run prints a plan and its cost, bench.runner
executes one here, bench.executors on Ray or Slurm."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.budgets import sized_fields
from bench.defaults import DEFAULT_LIMIT, DEFAULT_METHODS, DEFAULT_MODEL, DEFAULT_PPL_WINDOWS
from bench.errors import BenchError
from methods import Method, MethodConfigError, make_method, method_class


def overrides_for(name: str, tables: dict[str, dict]) -> dict[str, Any]:
    """A method's entries: its family's table (`ftp` for `ftp-static`), then its own."""
    family = name.split("-", 1)[0]
    return {**tables.get(family, {}), **(tables.get(name, {}) if name != family else {})}


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    sparsities: list[float] = field(default_factory=lambda: [0.25])
    tasks: list[str] | None = None  # None: every task
    limit: int | None = DEFAULT_LIMIT  # items per task; None = all
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    # several seeds per pruned method (calibration sample order, router/predictor init, random layers): the summary
    # then combines item and seed variance; None: `seed` only
    calibration_seeds: list[int] | None = None
    results: str = "results"
    force: bool = False
    batch_size: int = 16
    ppl_seq_len: int = 512
    ppl_windows: int | None = DEFAULT_PPL_WINDOWS
    latency_seq_len: int = 512
    latency_batch: int = 1
    latency_repeats: int = 5
    decode_tokens: int = 16
    threads: int | None = None
    measure_efficiency: bool = True
    measure_ppl: bool = True
    progress: bool = True
    verbose: bool = False  # libraries' bars and messages on the terminal; otherwise appended to <results>/run.log
    latency_sweep: bool = False  # the latency-sweep unit (bench.units.latency) for every pruned method
    latency_grid: list[tuple[int, int]] | None = None  # (batch, seq_len) points; None: CPU_GRID or GPU_GRID
    sweep_max_rounds: int = 30
    determinism_task: str | None = None  # a task dense is scored on twice, compared exactly (the gate sets it)
    executor: str = "local"  # "local": in this process; "ray"/"slurm": one task or job per group (bench.executors)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one
    slurm_partition: str | None = None
    slurm_timeout_min: int = 24 * 60
    # from a study file (bench.study): per method (family or variant) field values and calibration text settings
    method_fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)


def plan_methods(config: RunConfig, shape=None) -> list[Method]:
    """dense first (the shared reference), then each method at each sparsity; validated before any work. With the
    model's `shape` (its config), a small model's methods get their small presets (bench.budgets)."""
    for s in config.sparsities:
        if not 0.0 <= s < 1.0:
            raise BenchError(f"sparsity must be in [0, 1), got {s}; e.g. --sparsity 0.25,0.4")
    names = [n for n in config.methods if n != "dense"]
    plan = [make_method("dense", seed=config.seed)]
    seeds = config.calibration_seeds or [config.seed]
    for name in names:
        chosen = overrides_for(name, config.method_fields)
        fields = sized_fields(name, chosen, shape)
        calibration = overrides_for(name, config.calibration)
        for s in config.sparsities:
            for seed in seeds if method_class(name).seeded else seeds[:1]:
                try:
                    method = make_method(name, **{"sparsity": s, "seed": seed, **fields})
                except MethodConfigError as exc:
                    if fields == chosen:
                        raise
                    raise MethodConfigError(
                        f"{exc} (this model is small, so {name} got its preset {fields['preset']!r} "
                        f"(bench.budgets); name a preset in the study's [fields.{name}] to choose another)") from exc
                if calibration:
                    method.use_calibration(calibration)
                plan.append(method)
    return plan
