"""What a run shows: bench's own progress bars, warnings and summary on the terminal; what the libraries it drives
print (lm-eval's per-request bars and "bootstrapping for stddev", its log records, `datasets`' and `transformers`'
bars) goes to the store's `run.log`, or stays on the terminal with `--verbose`."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_terminal: list[TextIO] = []


def terminal() -> TextIO:
    """The stream for bench's own bars and warnings: stderr as it was when library output was sent to the log."""
    return _terminal[-1] if _terminal else sys.stderr


@contextlib.contextmanager
def libraries_quiet(verbose: bool = False) -> Iterator[None]:
    """`datasets`' and `transformers`' progress bars and transformers' notices off while inside (unless verbose)."""
    if verbose:
        yield
        return
    import datasets
    import transformers

    bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
    level = transformers.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        transformers.logging.enable_progress_bar()
        transformers.logging.set_verbosity(level)


@contextlib.contextmanager
def library_output_to(log: Path | None) -> Iterator[None]:
    """Inside, stdout, stderr and lm-eval's log records are appended to `log`; bench's own bars keep the terminal
    through `terminal()`. None: nothing is redirected (`--verbose`)."""
    if log is None:
        yield
        return
    # lm-eval's own handler exists only once its setup_logging ran (its CLI and simple_evaluate; bench calls
    # neither): its records reach the handler added here and propagate as before (pytest's caplog sees them)
    log.parent.mkdir(parents=True, exist_ok=True)
    lm_eval_logger = logging.getLogger("lm_eval")
    with open(log, "a", encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        lm_eval_logger.addHandler(handler)
        _terminal.append(terminal())
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            _terminal.pop()
            lm_eval_logger.removeHandler(handler)
