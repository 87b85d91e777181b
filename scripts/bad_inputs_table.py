"""Print docs/robustness.md's table of bad inputs: each case of tests/bad_inputs.py replayed, with the line bench answers.

    python scripts/bad_inputs_table.py > /tmp/table.md
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bad_inputs import CASES  # noqa: E402


def main() -> None:
    os.environ.setdefault("BENCH_CACHE", tempfile.mkdtemp(prefix="bench-cache-"))
    print("| input | exit | what bench prints (one line) |")
    print("|---|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            code, err = case.run(Path(tmp))
            line = next(ln for ln in err.splitlines() if ln.startswith(("error:", "warning:")))
            line = line.replace(tmp, "…").replace("|", "\\|")
            line = re.sub(r"\(see `python -m bench (\w+) --help`\)", r"(see `\1 --help`)", line)
        outcome = "2 (refused)" if code else "0 (recovered)"
        print(f"| {case.what} | {outcome} | `` {line} `` |")


if __name__ == "__main__":
    main()
