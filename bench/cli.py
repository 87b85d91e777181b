"""`python -m bench {run,report,table,calibrate,list,gate,perf}`. User errors print one line, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.defaults import DEFAULT_LIMIT, DEFAULT_METHODS, DEFAULT_MODEL, DEFAULT_PPL_WINDOWS, DEFAULT_TASKS
from bench.errors import BenchError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line (no usage block), exit 2, like every other user error."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.25,0.4, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("empty list; give at least one value, e.g. 0.25,0.4")
    return values


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"empty list {text!r}; name at least one (`python -m bench list` shows "
                                         "them), or leave the option out for the default")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _limit(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"takes a positive integer or 'none', got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1) or 'none', got {value}")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from exc
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers such as 0,1,2, got {text!r}")
    return values


def _grid(text: str) -> list[tuple[int, int]]:
    points = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        batch, _, length = item.lower().partition("x")
        if not (batch.isdigit() and length.isdigit() and int(batch) > 0 and int(length) > 1):
            raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH points such as 1x128,4x512, got {item!r}")
        points.append((int(batch), int(length)))
    if not points:
        raise argparse.ArgumentTypeError("empty grid; give points such as 1x128,4x512")
    return points


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name, local directory or HF id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice, recorded)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bench", description="Compare LLM pruning methods at "
                                     "matched compute sparsity: accuracy retention, perplexity, FLOPs, latency.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the study (dense is always included as the reference)")
    _add_model_args(p)
    p.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS),
                   help=f"comma-separated (default {','.join(DEFAULT_METHODS)}; see `list`)")
    p.add_argument("--sparsity", type=_floats, default=[0.25], help="target compute sparsities, e.g. 0.25,0.4")
    p.add_argument("--tasks", type=_names, default=None,
                   help=f"comma-separated (default {','.join(DEFAULT_TASKS)}: the tasks the default model is above "
                        "chance on; `list` shows all eight)")
    p.add_argument("--limit", type=_limit, default=DEFAULT_LIMIT,
                   help=f"items per task, or 'none' for all (default {DEFAULT_LIMIT}, sized for a 2-core CPU)")
    p.add_argument("--ppl-windows", type=_limit, default=DEFAULT_PPL_WINDOWS,
                   help=f"WikiText-2 windows (default {DEFAULT_PPL_WINDOWS}; 'none' = whole test set)")
    p.add_argument("--ppl-seq-len", type=_positive, default=512)
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--latency-repeats", type=_positive, default=5)
    p.add_argument("--calibration-seeds", type=_ints, default=None,
                   help="calibrate and measure every pruned method once per seed, e.g. 0,1,2; the summary's CI then "
                        "combines item and seed variance and shows the seeds' spread")
    p.add_argument("--latency-sweep", action="store_true",
                   help="also measure prefill/decode speedup over batch × length (CPU: 1,4 × 128,512,1024; GPU: "
                        "1,4,16 × 512,2048,4096) with 95%% CIs, a dense-vs-dense control and an `unstable` flag")
    p.add_argument("--latency-grid", type=_grid, default=None, help="sweep points, e.g. 1x128,4x512 (with "
                                                                     "--latency-sweep)")
    p.add_argument("--sweep-max-rounds", type=_positive, default=30,
                   help="cap on the interleaved rounds per sweep point (rounds grow until CIs are within ±3%%)")
    p.add_argument("--results", default="results", help="results store directory (default results/)")
    p.add_argument("--force", action="store_true", help="recompute cells that are already complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bars: only the summary and errors")
    p.add_argument("--verbose", action="store_true",
                   help="show what lm-eval, datasets and transformers print (default: appended to <results>/run.log)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a study file (configs/*.toml); options given here override it")
    p.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                   help="local: every cell in this process; ray / slurm: one Ray task or Slurm job (submitit; local "
                        "processes without Slurm) per (method, sparsity), each missing calibration artifact once as "
                        "its own task (pip install -e '.[scale]')")
    p.add_argument("--slurm-partition", default=None,
                   help="with --executor slurm: the partition to submit to (each job asks for one GPU when --device "
                        "cuda is given, CPUs otherwise)")
    p.add_argument("--ray-address", default=None,
                   help="with --executor ray: an existing cluster (e.g. ray://head:10001); default: start a local one")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cell plan, the artifacts to calibrate and an estimated cost; load no model")
    parser.run_parser = p

    p = sub.add_parser("report", help="figures + Markdown report, regenerated from the results store only")
    p.add_argument("--results", default="results")
    p.add_argument("--out", default="reports")

    p = sub.add_parser("table", help="the tidy rows to stdout")
    p.add_argument("--results", default="results")
    p.add_argument("--format", choices=["csv", "markdown", "latex"], default="csv",
                   help="csv/markdown: the tidy rows; latex: the paper-style table per model and sparsity")
    p.add_argument("--summary", action="store_true",
                   help="print the per-method summary and the method-vs-method retention differences instead")

    p = sub.add_parser("power", help="the smallest retention difference the study in the store can detect, and "
                                     "the items per task a 2-point difference needs")
    p.add_argument("--results", default="results")
    p.add_argument("--tasks", type=_names, default=None,
                   help="analyse only these tasks' items (what the study would show on a shorter task list)")

    p = sub.add_parser("calibrate", help="run or load a method's calibration and print its artifact")
    _add_model_args(p)
    p.add_argument("--method", required=True)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--force", action="store_true", help="recalibrate even if a cached artifact exists")
    p.add_argument("--json", action="store_true", help="print the artifact as JSON (tensors summarised)")
    p.add_argument("--save-committed", action="store_true",
                   help="write the artifact into methods/artifacts/ (maintainers: artifacts shipped with the repo)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a study file whose [fields.METHOD] and [calibration.METHOD] tables apply, as in `run` "
                        "(e.g. configs/verdict_gemma3.toml); its other keys are not used here")

    p = sub.add_parser("list", help="methods, tasks and models")
    p.add_argument("--artifacts", action="store_true",
                   help="the committed calibration artifacts instead: what each serves and which commands load it "
                        "(methods/artifacts/README.md)")

    p = sub.add_parser("gate", help="regression gate against the committed baseline")
    p.add_argument("--config", default=None, help="gate config TOML (default bench/gate.toml)")
    p.add_argument("--baseline", default=None, help="baseline JSON (default results/baseline/gate.json)")
    p.add_argument("--results", default=None, help="store for the gate's cells (default: a cache directory)")
    p.add_argument("--update-baseline", action="store_true", help="rewrite the baseline and print the diff")

    p = sub.add_parser("perf", help="scoring speed: vs a plain forward loop and vs stock HFLM, side by side; "
                       "with --methods, each method's seconds per executed FLOP vs dense")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", type=_names, default=None,
                   help="comma-separated or 'all': time per item, executed FLOPs and seconds per FLOP vs dense on "
                        f"the default study's tasks ({','.join(DEFAULT_TASKS)}), target ≤ 1.5x")
    p.add_argument("--tasks", type=_names, default=None, help="comma-separated (default piqa,arc_easy,"
                   "hellaswag,winogrande,boolq; with --methods the default study's tasks)")
    p.add_argument("--limit", type=_positive, default=None, help="items per task (default 40; 20 with --methods)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (with --methods)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (with --methods)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--threads", type=_positive, default=2)
    p.add_argument("--no-progress", action="store_true")
    return parser


def cmd_run(args) -> int:
    from bench.runner import RunConfig, Runner
    from bench.store import Store
    from bench.study import FILE_ONLY
    from bench.summary import format_summary, format_unmatched, summarize, unmatched_cells

    study = getattr(args, "study", None) or {}
    extra = {k: study[k] for k in FILE_ONLY if k in study}
    config = RunConfig(model=args.model, methods=args.methods, sparsities=args.sparsity, tasks=args.tasks,
                       limit=args.limit, device=args.device, dtype=args.dtype, seed=args.seed,
                       results=args.results, force=args.force, batch_size=args.batch_size,
                       ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len,
                       latency_repeats=args.latency_repeats, threads=args.threads, progress=not args.no_progress,
                       verbose=args.verbose, executor=args.executor, ray_address=args.ray_address, slurm_partition=args.slurm_partition, latency_sweep=args.latency_sweep,
                       latency_grid=args.latency_grid, sweep_max_rounds=args.sweep_max_rounds,
                       calibration_seeds=args.calibration_seeds, **extra)
    if args.dry_run:
        from bench.dry_run import dry_run

        dry_run(config)
        return 0
    runner = Runner(config)
    limit = "all" if config.limit is None else config.limit
    print(f"[bench] model={config.model} methods={','.join(m.registry_name for m in runner.plan[:1])}+"
          f"{','.join(sorted({m.registry_name for m in runner.plan[1:]}))} sparsity={config.sparsities} "
          f"tasks={','.join(runner.tasks)} limit={limit} items/task, ppl windows={config.ppl_windows}", flush=True)
    start = time.perf_counter()
    runner.run()
    store = Store(config.results)
    rows = store.load_rows()
    rows = rows[rows["cell"].isin(runner.run_cells)]
    print()
    print(format_summary(summarize(rows, store)))
    from bench.long_context import format_long_context, long_context_table

    long_prompts = long_context_table(rows, store)
    if len(long_prompts):
        print("\nLong prompts (generation; c on prefill is matched, c on decode reported):")
        print(format_long_context(long_prompts))
    if runner.not_scored:
        print("Not scored (dense at 0 on these lengths): "
              + ", ".join(f"{method} on {task}" for method, task in runner.not_scored))
    unmatched = unmatched_cells(rows[rows["method"] != "dense"])
    if len(unmatched):
        print("\nUnmatched cells (|c − target| > 0.02 on the scored inputs; left out of retention):")
        print(format_unmatched(unmatched))
    from bench.power import format_power, study_power
    from bench.summary import format_latency_sweep, latency_sweep_table

    sweep = latency_sweep_table(rows)
    if len(sweep):
        print("\nLatency sweep (speedup over dense, interleaved):")
        print(format_latency_sweep(sweep))
    print("\n[power] " + format_power(study_power(rows, store)).replace("\n", "\n[power] "))
    print(f"\n[bench] {len(runner.cells_written)} cells computed, {len(runner.cells_skipped)} already complete "
          f"(resume), results in {config.results}/")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in runner.clock.seconds.items())
    print(f"[bench] wall time {time.perf_counter() - start:.0f}s: {stages}; threads={runner.threads_used}")
    return 0


def cmd_report(args) -> int:
    from bench.report import write_report

    paths = write_report(args.results, args.out)
    for path in paths:
        print(path)
    return 0


def cmd_table(args) -> int:
    from bench.store import Store

    store = Store(args.results)
    rows = store.load_rows()
    if args.summary:
        from bench.summary import (
            current_rows,
            format_latency_sweep,
            format_pairwise,
            format_retention_at_targets,
            format_summary,
            format_unmatched,
            latency_sweep_table,
            pairwise_differences,
            retention_at_targets,
            summarize,
            unmatched_cells,
        )

        rows = current_rows(rows)
        summary = summarize(rows, store)
        print(format_summary(summary))
        if len(summary) and summary.groupby("model")["target"].nunique().max() > 2:  # dense's 0 and two targets
            print("\nRetention at each target c (read off each method's retention-vs-measured-c curve):")
            print(format_retention_at_targets(retention_at_targets(summary)))
        print("\nUnmatched cells (|c − target| > 0.02 on the scored inputs; left out of retention):")
        print(format_unmatched(unmatched_cells(rows[rows["method"] != "dense"])))
        print("\nMethod against method (matched tasks only):")
        print(format_pairwise(pairwise_differences(rows, store)))
        sweep = latency_sweep_table(rows)
        if len(sweep):
            print("\nLatency sweep (speedup over dense, interleaved):")
            print(format_latency_sweep(sweep))
        return 0
    if args.format == "latex":
        from bench.summary import current_rows, pairwise_differences, summarize
        from bench.tables import format_latex, paper_tables

        rows = current_rows(rows)
        print(format_latex(paper_tables(rows, summarize(rows, store), pairwise_differences(rows, store))))
        return 0
    if args.format == "csv":
        rows.to_csv(sys.stdout, index=False)
    else:
        from bench.report import markdown_table

        print(markdown_table(rows))
    return 0


def cmd_power(args) -> int:
    from bench.power import format_power, study_power
    from bench.store import Store
    from bench.summary import current_rows

    store = Store(args.results)
    tasks = None
    if args.tasks:
        from bench.tasks import resolve_tasks

        tasks = resolve_tasks(args.tasks)
    print(format_power(study_power(current_rows(store.load_rows()), store, tasks=tasks)))
    return 0


def cmd_calibrate(args) -> int:
    import torch

    from bench.artifacts import ensure_calibrated
    from bench.budgets import sized_fields
    from bench.models import cpu_threads, load_model
    from bench.plan import overrides_for
    from bench.study import load_study
    from methods import make_method

    fields, calibration = {"sparsity": args.sparsity, "seed": args.seed}, {}
    if args.config:
        study = load_study(args.config)
        fields = {**overrides_for(args.method, study["method_fields"]), **fields}
        calibration = overrides_for(args.method, study["calibration"])
    make_method(args.method, **fields)  # bad input fails before the model loads
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    method = make_method(args.method, **sized_fields(args.method, fields, model.config))  # bench.budgets
    if calibration:
        method.use_calibration(calibration)
    from bench.artifacts import COMMITTED_DIR

    with cpu_threads(model, args.threads):
        info = ensure_calibrated(method, model, tokenizer, args.model, seed=args.seed,
                                 force=args.force or args.save_committed,
                                 save_to=COMMITTED_DIR if args.save_committed else None)
    with method.apply(model):
        stats = method.stats()
    artifact = {k: ({"tensor": list(v.shape), "dtype": str(v.dtype)} if isinstance(v, torch.Tensor) else v)
                for k, v in (method._artifact or {}).items()}
    payload = {"method": args.method, "config": method.config(), "cache": info, "artifact": artifact,
               "stats": stats}
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print(f"{args.method}: cache={info}")
        for key, value in stats.items():
            print(f"  {key}: {value}")
    return 0


def cmd_list(args) -> int:
    if args.artifacts:
        from bench.artifact_index import format_index, index_entries

        print(format_index(index_entries()), end="")
        return 0
    from bench.models import MODELS
    from bench.tasks import TASKS
    from methods import available_methods, method_class, variant_defaults

    print("methods:")
    for name in available_methods():
        cls = method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        variant = ", ".join(f"{k}={v}" for k, v in variant_defaults(name).items())
        print(f"  {name:16s} {doc[0] if doc else ''}" + (f" [variant: {variant}]" if variant else ""))
    print("tasks:")
    for name, info in TASKS.items():
        print(f"  {name:16s} {info.n_items} items, metrics {', '.join(info.metrics)} (primary {info.primary_metric})")
    print("models:")
    for name, spec in MODELS.items():
        print(f"  {name:16s} {spec.description}")
    print("  (or any local model directory / Hugging Face id)")
    return 0


def cmd_perf(args) -> int:
    if args.methods:
        from bench.method_perf import run_method_perf
        from methods import available_methods, variant_defaults

        names = available_methods() if args.methods == ["all"] else args.methods
        for name in names:
            variant_defaults(name)  # an unknown name: one clear error before any model loads
        return run_method_perf(args.model, names, args.tasks or list(DEFAULT_TASKS), args.limit or 20,
                               args.batch_size, args.threads, args.device, args.dtype, progress=not args.no_progress)
    from bench.engine_perf import run_perf

    return run_perf(args.model, args.tasks, args.limit or 40, args.batch_size, args.threads,
                    progress=not args.no_progress)


def cmd_gate(args) -> int:
    from bench.gate import run_gate

    return run_gate(config_path=args.config, baseline_path=args.baseline, results=args.results,
                    update=args.update_baseline)


def validate(args) -> None:
    """The paths and files named on the command line, checked before any model is loaded or file written."""
    from bench.inputs import existing_file, read_json_object, writable_dir

    if args.command == "run":
        writable_dir(args.results, "--results")
    elif args.command == "report":
        writable_dir(args.out, "--out", example="reports")
    elif args.command == "gate":
        if args.config is not None:
            from bench.gate import load_gate_config

            load_gate_config(existing_file(args.config, "--config"))
        if args.baseline is not None and (not args.update_baseline or Path(args.baseline).exists()):
            read_json_object(existing_file(args.baseline, "--baseline"), "--baseline",
                             "pass a baseline written by `python -m bench gate --update-baseline`")
        if args.results is not None:
            writable_dir(args.results, "--results")


COMMANDS = {"run": cmd_run, "report": cmd_report, "table": cmd_table, "calibrate": cmd_calibrate,
            "list": cmd_list, "gate": cmd_gate, "power": cmd_power,
            "perf": cmd_perf}


# study-file keys whose command-line option has another name
_CLI_NAMES = {"sparsities": "sparsity"}


def _with_study(parser: argparse.ArgumentParser, argv: list[str] | None, path: str) -> argparse.Namespace:
    """Parse again with the study file's values as the `run` defaults, so options on the command line win."""
    from bench.study import FILE_ONLY, load_study

    study = load_study(path)
    parser.run_parser.set_defaults(**{_CLI_NAMES.get(k, k): v for k, v in study.items() if k not in FILE_ONLY})
    args = parser.parse_args(argv)
    args.study = study
    return args


def main(argv: list[str] | None = None) -> int:
    from methods.errors import MethodConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run" and args.config:
            args = _with_study(parser, argv, args.config)
        validate(args)
        return COMMANDS[args.command](args)
    except (BenchError, MethodConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `python -m bench table | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted; complete cells are saved, rerun the same command to resume", file=sys.stderr)
        return 130
