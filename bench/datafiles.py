"""The vendored data files (bench/data/*.xz, SOURCE notes in bench/data/SOURCES), read with their sha256
checked against MANIFEST.json on every load."""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path

from bench.errors import BenchError
from bench.inputs import read_json_object

DATA_DIR = Path(__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=1)
def manifest() -> dict[str, dict]:
    path = DATA_DIR / "MANIFEST.json"
    if not path.is_file():
        raise BenchError(f"{path} is missing: the install is incomplete; reinstall with scripts/setup.sh")
    fix = "restore it with `git checkout -- bench/data/MANIFEST.json` (or reinstall with scripts/setup.sh)"
    entries = read_json_object(path, "data manifest", fix)
    bad = [name for name, entry in entries.items()
           if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry)]
    if bad:
        raise BenchError(f"data manifest {path} is corrupt (entry {bad[0]!r} lacks file/sha256); {fix}")
    return entries


@functools.lru_cache(maxsize=16)
def read_verified(name: str) -> bytes:
    """The decompressed bytes of a vendored file such as 'piqa/valid.jsonl', after checking its sha256."""
    entry = manifest().get(name)
    if entry is None:
        raise BenchError(f"no vendored data file {name!r}; known files: {', '.join(sorted(manifest()))}")
    path = DATA_DIR / entry["file"]
    fix = "restore it with `git checkout -- bench/data` (the SOURCE notes in bench/data/SOURCES say where it came from)"
    if not path.is_file():
        raise BenchError(f"data file {path} is missing; {fix}")
    try:
        data = lzma.decompress(path.read_bytes())
    except lzma.LZMAError as exc:
        raise BenchError(f"data file {path} is corrupt ({exc}); {fix}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise BenchError(f"data file {path} is corrupt: sha256 {digest[:12]}… != recorded {entry['sha256'][:12]}…; {fix}")
    return data


def read_text(name: str) -> str:
    return read_verified(name).decode("utf-8")


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in read_text(name).splitlines() if line.strip()]
