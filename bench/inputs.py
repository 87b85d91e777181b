"""Checks on the paths and files a user hands to the CLI, run before any work starts. Each failure is one
BenchError naming the flag and the fix; nothing is created or changed by a check."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.errors import BenchError


def writable_dir(path: str | Path, flag: str, example: str = "results") -> None:
    """`path` is (or can be created as) a directory this process can write: checked on the nearest existing
    ancestor, by creating and removing a temporary file (permission bits alone mislead, e.g. for root)."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is an existing file" if probe == path else f"lies under {probe}, an existing file"
        raise BenchError(f"{flag} {path} {what}, not a directory; pass a directory path (e.g. {flag} {example})")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".bench-write-check-")
    except OSError as exc:
        raise BenchError(f"{flag} {path}: cannot write in {probe} ({exc.strerror}); pass a directory you can "
                         f"write, or fix its permissions") from exc
    os.close(fd)
    os.unlink(name)


def existing_file(path: str | Path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchError(f"{flag} {path} does not exist or is not a file; pass an existing file")
    return path


def read_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON file whose top level must be an object; anything else is one BenchError ending with `fix`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise BenchError(f"{what} {path} is not readable ({exc.strerror}); {fix}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BenchError(f"{what} {path} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(value, dict):
        raise BenchError(f"{what} {path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value
