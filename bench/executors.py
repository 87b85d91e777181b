"""Running a study's groups of cells on Ray (`--executor ray [--ray-address ADDR]`) or Slurm (`--executor slurm`,
through submitit; without a Slurm cluster it runs the same jobs as local processes).

The plan is the local one (bench.runner): one group per (method, sparsity), dense first. On Ray:

- every calibration artifact the plan needs and no cache holds is computed once, as its own task (one task per
  artifact key: no two workers train the same router), before any group that needs it starts;
- each group is one task: it loads the model, skips complete cells, measures the pending ones and writes each
  into its own cell directory of the store (never a shared file; cells are claimed with per-cell locks);
- a task asks for one GPU where the cluster has GPUs, otherwise CPUs (`--threads`, default: the cluster's CPUs
  shared between the groups);
- progress is shown for the whole sweep (cells done / to do, with an ETA) as groups finish.

On Slurm the calibration jobs run first (all at once) and the groups after them; job logs go to
`<results>/.slurm/`. Workers read the store, the data and the artifact cache through the file system: on one
machine that is given; on a cluster, `--results` and `$BENCH_CACHE` must be on a shared file system and bench
installed on every node. Resume, `--force` and the report are the same as with the local executor. A worker's
BenchError (a model that does not load, a corrupt committed artifact) reaches the user as the same one-line error.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.paths import REPO_ROOT


def _import(name: str, pin: str, flag: str):
    try:
        return __import__(name)
    except ImportError as exc:
        raise BenchError(f"{flag} needs {name}: pip install '{pin}' (or pip install -e '.[scale]')") from exc


RAY_CONNECT_TIMEOUT_S = 5.0


def check_ray_address(address: str | None, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse an address nothing answers at, in seconds: `ray.init` would retry for minutes and print nothing.
    None and "auto" (a local cluster Ray finds or starts itself) are left to Ray."""
    if address in (None, "auto", "local"):
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise BenchError(f"--ray-address {address}: not host:port; give the head node's GCS address (e.g. "
                         f"10.0.0.5:6379) or a Ray client address (ray://10.0.0.5:10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise BenchError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the "
                         f"cluster first (`ray start --head` on the head node) or leave --ray-address out to "
                         f"run a local Ray") from exc


def _worker_config(config, threads: int | None):
    """What a worker runs: this study, in its own process, with the store's absolute path (a worker's working
    directory may differ from the driver's)."""
    from pathlib import Path

    return dataclasses.replace(config, executor="local", progress=False, threads=threads,
                               results=str(Path(config.results).resolve()))


def _calibrate(runner_class, config, index: int) -> dict:
    """One artifact: load the model, calibrate plan[index] (or find it cached by then) and cache it. `runner_class`:
    bench.runner.Runner, passed in (pickled by reference) so that this module does not import the runner that
    imports it."""
    from bench.artifacts import ensure_calibrated
    from bench.models import cpu_threads, load_model

    try:
        runner = runner_class(config)  # validates the study before the model loads
        model, tokenizer = load_model(config.model, config.device, config.dtype)
        runner.size_plan(model.config)  # the model's budgets (bench.budgets), as the group's and the driver's
        method = runner.plan[index]
        with cpu_threads(model, config.threads):
            start = time.perf_counter()
            meta = ensure_calibrated(method, model, tokenizer, config.model, seed=method.seed)
        return {**meta, "seconds": time.perf_counter() - start}
    except BenchError as exc:
        return {"error": str(exc)}


def _group(runner_class, config, index: int, *artifacts: dict) -> dict:
    """One group of cells (`artifacts`: the results of the calibration tasks it waited for)."""
    failed = [a["error"] for a in artifacts if "error" in a]
    if failed:
        return {"error": failed[0]}
    try:
        runner = runner_class(config)
        runner.run_groups([index])
    except BenchError as exc:
        return {"error": str(exc)}
    return {"index": index, "run_cells": runner.run_cells, "written": runner.cells_written,
            "skipped": runner.cells_skipped, "seconds": runner.clock.seconds, "threads": runner.threads_used}


def _artifact_hash(method, config) -> str | None:
    from bench.artifacts import CalibrationSettings, artifact_key, key_hash

    if not method.needs_calibration:
        return None
    return key_hash(artifact_key(config.model, method, CalibrationSettings.for_method(method, method.seed)))


def _missing_artifacts(runner) -> dict[str, int]:
    """{artifact key hash: the plan index of one method that needs it} for every artifact no cache holds, keyed as
    the workers will calibrate them: the plan sized with the model's shape (bench.budgets), read here from the
    model's config.json when it was not known offline."""
    from bench.artifacts import artifact_exists
    from bench.budgets import shape_matters

    if not runner.sized and shape_matters(runner.plan):
        from transformers import AutoConfig

        try:
            runner.size_plan(AutoConfig.from_pretrained(runner.config.model))
        except (OSError, ValueError) as exc:
            raise BenchError(f"could not load model {runner.config.model!r}: its config, needed to plan the "
                             f"calibration budgets, cannot be read ({exc})") from exc
    missing: dict[str, int] = {}
    for index, method in enumerate(runner.plan):
        digest = _artifact_hash(method, runner.config)
        # --force recomputes cells, not artifacts (as the local executor does)
        if digest is not None and digest not in missing and not artifact_exists(method, runner.config.model,
                                                                                 method.seed):
            missing[digest] = index
    return missing


class _Sweep:
    """Progress over the whole sweep (cells done / to do, ETA) and the runner's tallies, as groups finish."""

    def __init__(self, runner, calibrations: int, where: str):
        self.runner = runner
        groups = len(runner.plan)
        total = sum(len(runner.unit_settings(m)) for m in runner.plan)
        self.bar = tqdm(total=total, unit="cell", disable=not runner.config.progress,
                        desc=f"cells ({calibrations} calibrations, {groups} groups on {where})")
        self.groups, self.done = groups, 0
        self.start = time.perf_counter()
        runner.calibrations_run = calibrations

    def add(self, result: dict) -> None:
        if "error" in result:
            raise BenchError(result["error"])
        r = self.runner
        r.run_cells.extend(result["run_cells"])
        r.cells_written.extend(result["written"])
        r.cells_skipped.extend(result["skipped"])
        for stage, seconds in result["seconds"].items():
            r.clock.seconds[stage] = r.clock.seconds.get(stage, 0.0) + seconds
        r.threads_used = result["threads"]
        self.done += 1
        self.bar.update(len(result["run_cells"]))
        self.bar.set_postfix_str(f"groups {self.done}/{self.groups}")

    def close(self, stage: str) -> None:
        self.bar.close()
        self.runner.clock.seconds[stage] = time.perf_counter() - self.start


RAY_CANCEL_GRACE_S = 1.0


def _cancel_unfinished(ray, refs: list) -> None:
    """Force-cancel the tasks still running after a failure, once those about to finish have had
    `RAY_CANCEL_GRACE_S` to do so. Ray 2.60 aborts the driver process when a cancel races the completion of the same
    task (a RAY_CHECK in its task manager, "Tried to complete task that was not pending"; of the kind of
    ray-project/ray#54798): a study whose workers all fail at once, as when the model cannot load, hit it in CI."""
    if not refs:
        return
    _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=RAY_CANCEL_GRACE_S)
    for ref in unfinished:
        ray.cancel(ref, force=True)


def run_on_ray(runner) -> list[str]:
    """Execute `runner.plan` on Ray: every missing artifact once as its own task, each group a task that waits for
    the artifact it needs; fills the runner's run_cells / cells_written / cells_skipped / clock as the local
    executor does, and returns run_cells."""
    ray = _import("ray", "ray==2.60.0", "--executor ray")
    config = runner.config
    check_ray_address(config.ray_address)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    if os.environ.get("BENCH_CACHE"):
        env["BENCH_CACHE"] = os.path.abspath(os.path.expanduser(os.environ["BENCH_CACHE"]))
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
        artifacts = {digest: calibrate.remote(type(runner), worker, index) for digest, index in _missing_artifacts(runner).items()}
        pending = [group.remote(type(runner), worker, i, *([artifacts[d]] if (d := _artifact_hash(m, config)) in artifacts
                                             else []))
                   for i, m in enumerate(runner.plan)]
        sweep = _Sweep(runner, len(artifacts), "Ray")
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                sweep.add(ray.get(done[0]))
        except BaseException:
            _cancel_unfinished(ray, pending)
            raise
        finally:
            sweep.close("ray wall")
        return runner.run_cells
    finally:
        if started_here:
            ray.shutdown()


def run_on_slurm(runner) -> list[str]:
    """Execute `runner.plan` as Slurm jobs through submitit (local processes where there is no Slurm): the missing
    artifacts first, one job each, then one job per group."""
    from pathlib import Path

    submitit = _import("submitit", "submitit==1.5.4", "--executor slurm")
    config = runner.config
    executor = submitit.AutoExecutor(folder=Path(config.results) / ".slurm")
    parameters = {"timeout_min": config.slurm_timeout_min, "cpus_per_task": config.threads or 1,
                  "name": "bench"}
    if config.device.startswith("cuda"):
        parameters["gpus_per_node"] = 1
    if config.slurm_partition and executor.cluster == "slurm":
        parameters["slurm_partition"] = config.slurm_partition
    executor.update_parameters(**parameters)
    worker = _worker_config(config, config.threads or 1)
    runner.store.remove_stale()
    missing = _missing_artifacts(runner)
    sweep = _Sweep(runner, len(missing), executor.cluster)
    jobs = []
    try:
        jobs = [executor.submit(_calibrate, type(runner), worker, index) for index in missing.values()]
        for job in jobs:
            if "error" in (result := job.result()):
                raise BenchError(result["error"])
        jobs = [executor.submit(_group, type(runner), worker, i) for i in range(len(runner.plan))]
        pending = list(jobs)
        while pending:
            finished = [job for job in pending if job.done()]
            for job in finished:
                pending.remove(job)
                sweep.add(job.result())
            if not finished:
                time.sleep(1.0)
    except BaseException:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)
        raise
    finally:
        sweep.close("slurm wall")
    return runner.run_cells
