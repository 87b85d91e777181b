"""Studies as TOML files: `python -m bench run --config configs/NAME.toml`.

A file names what `run` takes on the command line (model, dtype, device, methods, sparsities, tasks, limits, …) plus
two tables per method, applied to the method and to its registered variants (`[fields.ftp]` reaches `ftp-static`
too; `[fields.ftp-static]` only that variant):

    [fields.ftp]            # the method's dataclass fields, e.g. preset = "paper"
    [calibration.blockpruner]  # the calibration text it is given: n_samples, seq_len, source

Options given on the command line override the file. Unknown keys, wrong types and bad values are errors that say
what to write instead; nothing here imports torch, so a config is checked in a second (`--dry-run`, which plans it
without loading a model, is bench.dry_run).
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.paths import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# key -> (type check, example): what `run` takes, by its RunConfig name
_NONE = "none"
RUN_KEYS: dict[str, tuple[str, str]] = {
    "description": ("str", '"LLaMA-2-7B, the paper\'s four sparsities"'),
    "model": ("str", '"smollm2-135m"'),
    "device": ("choice:auto,cpu,cuda", '"cuda"'),
    "dtype": ("choice:auto,float32,bfloat16", '"bfloat16"'),
    "seed": ("int>=0", "0"),
    "methods": ("names", '["shortgpt", "ftp"]'),
    "sparsities": ("sparsities", "[0.22, 0.25, 0.30, 0.40]"),
    "tasks": ("names", '["piqa", "arc_easy"]'),
    "limit": ("count|none", '50 or "none"'),
    "ppl_windows": ("count|none", '10 or "none"'),
    "ppl_seq_len": ("count", "2048"),
    "batch_size": ("count", "16"),
    "latency_repeats": ("count", "5"),
    "latency_seq_len": ("count", "512"),
    "decode_tokens": ("count", "16"),
    "threads": ("count", "2"),
    "results": ("str", '"results"'),
    "calibration_seeds": ("seeds", "[0, 1, 2]"),
    "latency_sweep": ("bool", "true"),
    "measure_ppl": ("bool", "false"),  # the WikiText-2 unit (default true)
    "measure_efficiency": ("bool", "false"),  # the latency probe unit (default true)
    "executor": ("choice:local,ray,slurm", '"ray"'),
}
TABLES = ("fields", "calibration")
# study keys `run` has no command-line option for: RunConfig takes them from the file only
FILE_ONLY = ("latency_seq_len", "decode_tokens", "method_fields", "calibration", "measure_ppl", "measure_efficiency")
CALIBRATION_KEYS = {"n_samples": "count", "seq_len": "count", "source": "str"}


def _error(path: Path, where: str, message: str) -> BenchError:
    return BenchError(f"{path}: {where}: {message}")


def _unknown(path: Path, where: str, key: str, known: list[str]) -> BenchError:
    close = get_close_matches(key, known, n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return _error(path, where, f"unknown key {key!r}; {hint}known keys: {', '.join(known)}")


def _check(path: Path, key: str, value: Any, kind: str, example: str) -> Any:
    bad = _error(path, key, f"{value!r} is not valid; write e.g. {key} = {example}")
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad
    elif kind.startswith("choice:"):
        if value not in kind.split(":", 1)[1].split(","):
            raise bad
    elif kind == "int>=0":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad
    elif kind in ("count", "count|none"):
        if kind == "count|none" and value == _NONE:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "seeds":
        if not isinstance(value, list) or not value or len(set(value)) != len(value) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise bad
    elif kind == "names":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad
    elif kind == "sparsities":
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value):
            raise _error(path, key, f"{value!r} is not valid; sparsities are in [0, 1), e.g. {key} = {example}")
        return [float(v) for v in value]
    return value


def load_study(path: str | Path) -> dict[str, Any]:
    """The validated file as {RunConfig field: value, "method_fields": {...}, "calibration": {...}}."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--config {path}: no such file; the shipped studies are in configs/ "
                         f"({', '.join(sorted(p.name for p in (REPO_ROOT / 'configs').glob('*.toml')))})")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"--config {path}: not valid TOML ({exc}); see configs/default_cpu.toml for the format") from exc
    out: dict[str, Any] = {"method_fields": {}, "calibration": {}}
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise _error(path, key, f"write one table per method, e.g. [{key}.ftp]")
            continue
        if key not in RUN_KEYS:
            raise _unknown(path, "top level", key, [*RUN_KEYS, *TABLES])
        kind, example = RUN_KEYS[key]
        out[key] = _check(path, key, value, kind, example)
    for method, fields in data.get("fields", {}).items():
        out["method_fields"][method] = dict(fields)
    for method, settings in data.get("calibration", {}).items():
        for key, value in settings.items():
            if key not in CALIBRATION_KEYS:
                raise _unknown(path, f"[calibration.{method}]", key, list(CALIBRATION_KEYS))
            _check(path, f"calibration.{method}.{key}", value, CALIBRATION_KEYS[key],
                   '"c4-all"' if key == "source" else "512")
        out["calibration"][method] = dict(settings)
    _check_methods(path, out)
    out.pop("description", None)
    return out


def _check_methods(path: Path, study: dict[str, Any]) -> None:
    """Method and task names, and that every table names a method of the study (a typo would be ignored)."""
    from methods import available_methods

    known = available_methods()
    names = study.get("methods", [])
    for name in names:
        if name not in known:
            raise _unknown(path, "methods", name, known)
    for table in ("method_fields", "calibration"):
        for name in study[table]:
            if name not in known:
                raise _unknown(path, f"[{'fields' if table == 'method_fields' else table}.{name}]", name, known)
    if "tasks" in study:
        from bench.tasks import TASK_ALIASES, TASKS

        for task in study["tasks"]:
            if task not in TASKS and task not in TASK_ALIASES:
                raise _unknown(path, "tasks", task, [*TASKS, *TASK_ALIASES])
