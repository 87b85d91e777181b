"""The study: *plan* the groups of cells (one per method and sparsity, dense first) and *execute* them, here or on
Ray (bench.executors). For each group: calibrate (cached), then measure every pending unit (each accuracy task,
WikiText-2 perplexity, the efficiency probe; bench.units) into its own cell of the store. Complete cells are
skipped, so a killed run resumes where it stopped; --force recomputes."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.artifacts import ensure_calibrated
from bench.console import libraries_quiet, library_output_to
from bench.errors import BenchError
from bench.executors import run_on_ray, run_on_slurm
from bench.fileutil import json_digest as cell_hash
from bench.matching import PROTOCOL
from bench.models import adds_bos, cpu_threads, load_model, validate_model_name
from bench.plan import RunConfig, plan_methods  # noqa: F401 (RunConfig: part of this module's interface)
from bench.provenance import BENCH_VERSION, Provenance
from bench.shapes import model_shape
from bench.store import ROWS, Store
from bench.timing import CPU_GRID, GPU_GRID
from bench.units import DETERMINISM, LATENCY_SWEEP, CellContext, fits_lengths, measure
from bench.units.accuracy import fit_pool
from methods import Method, MethodConfigError


class StageClock:
    """Wall time per stage, printed at the end of a run."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class Runner:
    def __init__(self, config: RunConfig, model=None, tokenizer=None):
        """`model`/`tokenizer` may be given in memory (tests); otherwise `config.model` is loaded."""
        from bench.defaults import DEFAULT_TASKS
        from bench.tasks import resolve_tasks

        self.config = config
        self.tasks = resolve_tasks(config.tasks) if config.tasks else list(DEFAULT_TASKS)
        if model is None:
            validate_model_name(config.model)
        self.plan: list[Method] = []
        self.sized = False  # has the plan seen the model's shape (small-model presets, bench.budgets)?
        # the shape from the model given, or offline (zoo table, local config.json, HF cache); else once loaded
        self.size_plan(model.config if model is not None else model_shape(config.model))
        self.store = Store(config.results)
        self.clock = StageClock()
        self.cells_written: list[str] = []
        self.threads_used: int | None = None  # torch CPU threads the last run() used
        self.cells_skipped: list[str] = []
        self.run_cells: list[str] = []
        self.not_scored: list[tuple[str, str]] = []  # (method, generation task) left out: dense scored 0 there
        self.model, self.tokenizer = model, tokenizer
        self.context: CellContext | None = None  # what the units measure with; built once the model is loaded
        self.provenance: Provenance | None = None

    def size_plan(self, shape) -> None:
        """(Re)plan with the model's shape (None: not known yet, plan with the default budgets). The order never
        changes, so a plan index means the same (method, sparsity, seed) before and after, here and in a worker."""
        try:
            self.plan = plan_methods(self.config, shape)
        except MethodConfigError as exc:
            raise BenchError(str(exc)) from exc
        self.sized = shape is not None

    def _identity(self, method: Method, unit: str, settings: dict[str, Any]) -> dict[str, Any]:
        identity = {"model": self.config.model, "method": method.registry_name, "method_version": method.version,
                    "params": method.config(), "unit": unit, "settings": settings,
                    "device": self.provenance.device, "dtype": str(self.model.dtype), "bench": BENCH_VERSION}
        override = method.calibration_override
        if override:
            identity["calibration"] = override
        return identity

    def unit_settings(self, method: Method | None = None) -> dict[str, dict[str, Any]]:
        """{unit: its settings} of `method`'s group: every task, WikiText-2, the efficiency probe, and for dense
        the determinism check when the study asks for one."""
        c = self.config
        # "protocol": how compute is matched and counted (bench.matching); a new value re-measures older cells
        units = {task: {"limit": c.limit, "batch_size": c.batch_size, "protocol": PROTOCOL} for task in self.tasks}
        if c.measure_ppl:
            units["wikitext2"] = {"seq_len": c.ppl_seq_len, "windows": c.ppl_windows, "protocol": PROTOCOL}
        if c.measure_efficiency:
            units["efficiency"] = {"batch": c.latency_batch, "seq_len": c.latency_seq_len,
                                   "repeats": c.latency_repeats, "decode_tokens": c.decode_tokens,
                                   "protocol": PROTOCOL}
        if c.latency_sweep and method is not None and method.registry_name != "dense":
            grid = c.latency_grid or (GPU_GRID if self.provenance and self.provenance.device.startswith("cuda")
                                      else CPU_GRID)
            units[LATENCY_SWEEP] = {"grid": [list(p) for p in grid], "decode_tokens": c.decode_tokens,
                                    "min_rounds": 5, "max_rounds": c.sweep_max_rounds, "protocol": PROTOCOL}
        if self.tokenizer is not None and adds_bos(self.tokenizer):
            # raw-text windows start with BOS for such a tokenizer (bench.models.adds_bos): part of what the
            # cell measured (SmolLM2's identities are unchanged)
            for unit in ("wikitext2", "efficiency", LATENCY_SWEEP):
                if unit in units:
                    units[unit] = {**units[unit], "bos": True}
        if c.determinism_task and method is not None and method.registry_name == "dense":
            units[DETERMINISM] = {"task": c.determinism_task, "limit": c.limit, "batch_size": c.batch_size,
                                  "protocol": PROTOCOL}
        return units

    def cell_settings(self, method: Method, unit: str, settings: dict[str, Any]) -> dict[str, Any]:
        """A length-fitted static method's accuracy cells depend on the tasks its pruned model is chosen on (the
        study's multiple-choice tasks pooled; a generation task alone: bench.units.accuracy.fit_pool), so that
        list is part of their identity."""
        if unit in self.tasks and fits_lengths(method):
            return {**settings, "pool": fit_pool(unit, self.tasks)}
        return settings

    # -- the study --------------------------------------------------------------------------------------------
    def run(self) -> list[str]:
        """Every group of cells: in this process (`executor="local"`), or as Ray tasks (bench.executors)."""
        if self.config.executor in ("ray", "slurm"):
            return (run_on_ray if self.config.executor == "ray" else run_on_slurm)(self)
        return self.run_groups(range(len(self.plan)), clean=True)

    def run_groups(self, indices, clean: bool = False) -> list[str]:
        """The cells of `self.plan[i]` for each i, in this process (loading the model if none was given)."""
        c = self.config
        torch.manual_seed(c.seed)
        with libraries_quiet(c.verbose):
            if self.model is None:
                self.model, self.tokenizer = self.clock.timed("load model",
                                                              lambda: load_model(c.model, c.device, c.dtype))
            if not self.sized:
                self.size_plan(self.model.config)
            with cpu_threads(self.model, c.threads) as threads:
                self.threads_used = threads
                self.provenance = Provenance.current(c.model, self.model, c.seed, c.batch_size)
                log = None if c.verbose else Path(c.results) / "run.log"
                self.context = CellContext(self.model, self.tokenizer, self.tasks, c.limit, c.batch_size, c.progress,
                                           log=log)
                if clean:
                    self.store.remove_stale()  # temporaries of killed runs
                selected = [self.plan[i] for i in indices]
                outer = tqdm(selected, desc="methods", disable=not c.progress)
                # --no-progress: a calibration's own bars go to the log too (warnings keep the terminal)
                with contextlib.nullcontext() if c.progress else library_output_to(log):
                    for method in outer:
                        outer.set_postfix_str(f"{method.registry_name}@{method.sparsity:g}")
                        self.run_group(method)
        return self.run_cells

    def run_group(self, method: Method) -> None:
        """One (method, sparsity): calibrate (cached) if any of its cells is pending, then measure each pending
        unit into its own cell."""
        c = self.config
        units = self.unit_settings(method)
        settings = {u: self.cell_settings(method, u, s) for u, s in units.items()}
        cells = {unit: cell_hash(self._identity(method, unit, settings[unit])) for unit in units}
        self.run_cells.extend(cells.values())
        pending = [u for u in units if c.force or not self.store.is_complete(cells[u])]
        self.cells_skipped.extend(cells[u] for u in units if u not in pending)
        if not pending:
            return
        artifact = self.clock.timed(f"calibrate {method.registry_name}", lambda m=method: ensure_calibrated(
            m, self.model, self.tokenizer, c.model, seed=m.seed, force=False))
        for unit in pending:
            if method.registry_name != "dense" and self.dense_at_zero(unit, settings[unit]):
                self.not_scored.append((method.registry_name, unit))
                continue
            with self.store.claim(cells[unit], force=c.force) as owned:  # another process may hold it
                if not owned:
                    self.cells_skipped.append(cells[unit])
                    continue
                stage = "accuracy" if unit in self.tasks else unit
                method.set_knob(None)
                rows, samples = self.clock.timed(stage, lambda u=unit, m=method: self.measure(m, u, units[u]))
                common = {**self.provenance.columns(), "cell": cells[unit], "method": method.registry_name,
                          "method_params": json.dumps(method.config(), sort_keys=True, default=str),
                          "target_sparsity": method.sparsity, "artifact": artifact.get("key_hash"),
                          "calibration_seed": None if method.registry_name == "dense" else method.seed,
                          "calibration": json.dumps(artifact, default=str)}
                rows = [{**common, **row} for row in rows]
                identity = {**self._identity(method, unit, settings[unit]), "stats": method.stats(),
                            "host": platform.node()}
                method.set_knob(None)
                self.store.write(cells[unit], identity, rows, samples)
                self.cells_written.append(cells[unit])

    def dense_at_zero(self, unit: str, settings: dict[str, Any]) -> bool:
        """A generation task (a RULER length) on which the dense model scored 0 in this study: no method is compared
        there (retention has no denominator), so its cells are not computed; the summary reports the length."""
        from bench.tasks import GENERATION_TASKS, TASKS

        if unit not in GENERATION_TASKS:
            return False
        dense = cell_hash(self._identity(self.plan[0], unit, settings))
        if not self.store.is_complete(dense, report=False):
            return False
        rows = pd.read_parquet(self.store.cell_dir(dense) / ROWS)
        primary = rows[rows["metric"] == TASKS[unit].primary_metric]["value"]
        return len(primary) > 0 and float(primary.iloc[0]) == 0.0

    def measure(self, method: Method, unit: str, settings: dict[str, Any]):
        """One unit's (rows, samples): bench.units, with this study's context."""
        return measure(self.context, method, unit, settings)
