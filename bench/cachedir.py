"""A cache directory built once, verified on every use: the dequantized model cache.

The directory is built in a temporary sibling (`.tmp-<name>-<pid>`, which nothing looks up) and renamed into
place; a lock makes a second process wait for the first build instead of building its own. `bench-manifest.json`
records the sha256 of every file at build time and is checked before each use; a directory that fails the check
(a truncated or garbled file) is reported in one line and rebuilt. Directories built before the manifest existed
are checked by a full parse of their config and safetensors headers (which catches truncation)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from safetensors import SafetensorError, safe_open

from bench.console import terminal
from bench.fileutil import file_sha256, move_into_place, pid_alive

MANIFEST = "bench-manifest.json"


def problem(directory: Path) -> str | None:
    """None when the directory is whole and verified, else why not ('missing' when it was never built)."""
    if not directory.is_dir():
        return "missing"
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json unreadable: {type(exc).__name__}"
    if not isinstance(config, dict):
        return "config.json is not an object"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors file"
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        try:
            files = json.loads(manifest_path.read_text())["files"]
            for name, digest in files.items():
                if not (directory / name).is_file():
                    return f"{name} is missing"
                if file_sha256(directory / name) != digest:
                    return f"{name} does not match its recorded sha256"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"{MANIFEST} unreadable: {type(exc).__name__}"
        return None
    for path in weights:  # built before the manifest existed: a full header parse
        try:
            with safe_open(str(path), "pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            return f"{path.name}: {exc}"
    return None


def remove_stale(directory: Path) -> None:
    """Temporaries of builds whose process died (`.tmp-<name>-<pid>`, and earlier versions' `<name>.tmp<pid>`)."""
    for path in directory.parent.glob(f".tmp-{directory.name}-*"):
        tail = path.name.rsplit("-", 1)[-1]
        if tail.isdigit() and not pid_alive(int(tail)):
            shutil.rmtree(path, ignore_errors=True)
    for path in directory.parent.glob(f"{directory.name}.tmp*"):
        tail = path.name.rsplit(".tmp", 1)[-1]
        if tail.isdigit() and not pid_alive(int(tail)):
            shutil.rmtree(path, ignore_errors=True)


def cached_dir(directory: Path, build: Callable[[Path], None]) -> Path:
    """`directory`, verified; built with `build(tmp)` first when missing or damaged."""
    if problem(directory) is None:
        return directory
    locks = directory.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{directory.name}.lock")):
        reason = problem(directory)  # another process may have built it while we waited
        if reason is None:
            return directory
        if reason != "missing":
            print(f"warning: cached {directory} failed verification ({reason}); rebuilding it", file=terminal(),
                  flush=True)
        remove_stale(directory)
        tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. the model wheel is missing: no debris
            raise
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        move_into_place(tmp, directory, directory.parent / f".tmp-{directory.name}-old-{os.getpid()}")
    return directory
