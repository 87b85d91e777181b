"""Running a study's groups of cells on Ray (`python -m bench run --executor ray [--ray-address ADDR]`).

The plan is the local one (bench.runner): one group per (method, sparsity), dense first. On Ray:

- every calibration artifact the plan needs and no cache holds is computed once, as its own task (one task per
  artifact key: no two workers train the same router), before any group that needs it starts;
- each group is one task: it loads the model, skips complete cells, measures the pending ones and writes each
  into its own cell directory of the store (never a shared file; cells are claimed with per-cell locks);
- a task asks for one GPU where the cluster has GPUs, otherwise CPUs (`--threads`, default: the cluster's CPUs
  shared between the groups);
- progress is shown for the whole sweep (cells done / to do, with an ETA) as groups finish.

Workers read the store, the data and the artifact cache through the file system: on one machine that is given; on
a cluster, `--results` and `$BENCH_CACHE` must be on a shared file system and bench installed on every node.
Resume, `--force` and the report are the same as with the local executor.
"""

from __future__ import annotations

import dataclasses
import os
import time

from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.paths import REPO_ROOT


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise BenchError("--executor ray needs Ray: pip install 'ray==2.60.0' (or pip install -e '.[ray]')") from exc
    return ray


def _worker_config(config, threads: int):
    return dataclasses.replace(config, executor="local", progress=False, threads=threads)


def _calibrate(config, index: int) -> dict:
    """One artifact: load the model, calibrate plan[index] (or find it cached by then) and cache it."""
    from bench.artifacts import ensure_calibrated
    from bench.models import cpu_threads, load_model
    from bench.runner import Runner

    runner = Runner(config)
    model, tokenizer = load_model(config.model, config.device, config.dtype)
    with cpu_threads(model, config.threads):
        start = time.perf_counter()
        method = runner.plan[index]
        meta = ensure_calibrated(method, model, tokenizer, config.model, seed=method.seed)
    return {**meta, "seconds": time.perf_counter() - start}


def _group(config, index: int, *_artifacts) -> dict:
    """One group of cells (`_artifacts`: the calibration tasks it waits for)."""
    from bench.runner import Runner

    runner = Runner(config)
    runner.run_groups([index])
    return {"index": index, "run_cells": runner.run_cells, "written": runner.cells_written,
            "skipped": runner.cells_skipped, "seconds": runner.clock.seconds, "threads": runner.threads_used}


def _artifact_hash(method, config) -> str | None:
    from bench.artifacts import CalibrationSettings, artifact_key, key_hash

    if not method.needs_calibration:
        return None
    return key_hash(artifact_key(config.model, method, CalibrationSettings.for_method(method, method.seed)))


def run_on_ray(runner) -> list[str]:
    """Execute `runner.plan` on Ray; fills the runner's run_cells / cells_written / cells_skipped / clock as the
    local executor does, and returns run_cells."""
    from bench.artifacts import artifact_exists

    ray = _import_ray()
    config = runner.config
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    if os.environ.get("BENCH_CACHE"):
        env["BENCH_CACHE"] = os.environ["BENCH_CACHE"]
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    try:
        resources = ray.cluster_resources()
        groups = len(runner.plan)
        if resources.get("GPU", 0) >= 1:
            options, threads = {"num_gpus": 1, "num_cpus": 1}, config.threads
        else:
            cpus = max(1, int(resources.get("CPU", 1)))
            threads = config.threads or max(1, cpus // min(groups, cpus))
            options = {"num_cpus": min(threads, cpus)}
        worker = _worker_config(config, threads)
        runner.store.remove_stale()  # here only: workers never delete temporaries of another process
        calibrate = ray.remote(max_retries=0)(_calibrate).options(**options)
        group = ray.remote(max_retries=0)(_group).options(**options)
        artifacts: dict[str, object] = {}
        for index, method in enumerate(runner.plan):
            digest = _artifact_hash(method, config)
            if digest is not None and digest not in artifacts and not config.force \
                    and not artifact_exists(method, config.model, method.seed):
                artifacts[digest] = calibrate.remote(worker, index)
        pending = {group.remote(worker, i, *([artifacts[d]] if (d := _artifact_hash(m, config)) in artifacts
                                             else [])): i
                   for i, m in enumerate(runner.plan)}
        per_group = len(runner.unit_settings())
        bar = tqdm(total=groups * per_group, desc=f"cells ({len(artifacts)} calibrations, {groups} groups on Ray)",
                   unit="cell", disable=not config.progress)
        start = time.perf_counter()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:  # a worker's BenchError is the user's one-line error
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, BenchError):
                        raise cause from None
                    raise
                pending.pop(done[0])
                runner.run_cells.extend(result["run_cells"])
                runner.cells_written.extend(result["written"])
                runner.cells_skipped.extend(result["skipped"])
                for stage, seconds in result["seconds"].items():
                    runner.clock.seconds[stage] = runner.clock.seconds.get(stage, 0.0) + seconds
                runner.threads_used = result["threads"]
                bar.update(len(result["run_cells"]))
                bar.set_postfix_str(f"groups {groups - len(pending)}/{groups}")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
        runner.clock.seconds["ray wall"] = time.perf_counter() - start
        runner.calibrations_on_ray = len(artifacts)
        return runner.run_cells
    finally:
        if started_here:
            ray.shutdown()
