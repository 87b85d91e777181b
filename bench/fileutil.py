"""Small file-integrity helpers shared by the results store and the caches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def json_digest(obj: Any) -> str:
    """16 hex digits of the sha256 of `obj` as sorted JSON: the name of a results cell (its identity) and of a
    calibration artifact (its key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a temporary named after a dead one is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def move_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Rename the finished directory `tmp` to `final`; an existing `final` is first moved aside to `old` (where
    readers never look) and removed after, so `final` is always whole: the old one or the new one."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
