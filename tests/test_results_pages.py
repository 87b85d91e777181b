"""The results pages in docs/results/ are generated from the committed stores (`python -m bench report --results
results/studies/NAME --out docs/results/NAME`), and the README's quoted verdict lines are the pages' own."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from bench.paths import REPO_ROOT
from bench.report import CLAIMS, the_claims, write_report

PAGES = sorted(p.parent.name for p in (REPO_ROOT / "docs" / "results").glob("*/report.md"))


def _pair(a, b, diff, lo, hi, significant, p_holm=0.01):
    return {"model": "m", "device": "cpu", "dtype": "float32", "target": 0.25, "a": a, "b": b,
            "retention_a_minus_b": diff, "lo": lo, "hi": hi, "significant": significant, "p_holm": p_holm}


def test_claims_are_confirmed_refuted_or_open_by_their_intervals():
    frame = pd.DataFrame([
        _pair("blockpruner", "ftp", -0.15, -0.20, -0.11, True),  # ftp − blockpruner = +15 [+11, +20]: above +10
        _pair("ftp", "shortgpt", 0.03, -0.01, 0.07, False),  # the CI excludes +10
        _pair("ftp", "ftp-static", 0.05, -0.02, 0.12, False),  # not significant
        _pair("sdtp", "sdtp-random", -0.06, -0.10, -0.02, True),  # the reverse is significant
        _pair("shortgpt", "tail", 0.04, 0.01, 0.07, True),
    ])
    claims = the_claims(frame)
    verdict = {claim: line.rsplit(": ", 1)[1] for *_, claim in CLAIMS for line in claims if f": {claim}: " in line}
    assert len(claims) == 5
    assert verdict["the FTP paper: FTP keeps ≥ 10 points more retention than BlockPruner"].startswith("confirmed")
    assert "ftp − blockpruner = +15.0 points [+11.0, +20.0]" in claims[1]
    assert verdict["the FTP paper: FTP keeps ≥ 10 points more retention than ShortGPT"].startswith("refuted")
    assert verdict["FTP's learned router beats its static teacher"].startswith("open")
    assert verdict["SDTP's saliency predictor beats random tokens at the same budgets"].startswith("refuted")
    assert verdict["Block Influence (ShortGPT) beats removing the last layers"].startswith("confirmed")


@pytest.mark.parametrize("name", PAGES)
def test_a_results_page_regenerates_identically_from_its_store(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    store = f"results/studies/{name}"
    assert (REPO_ROOT / store / "cells").is_dir(), f"docs/results/{name}/ has no committed store {store}/"
    write_report(store, str(tmp_path))
    committed = (REPO_ROOT / "docs" / "results" / name / "report.md").read_text()
    assert (tmp_path / "report.md").read_text() == committed, (
        f"docs/results/{name}/report.md differs from its store: python -m bench report --results {store} "
        f"--out docs/results/{name}")


def test_the_readmes_quoted_lines_are_in_their_pages():
    """Every README line under a `<!-- from docs/results/NAME/report.md -->` marker, up to the next blank line,
    is a line of that page, word for word."""
    readme = (REPO_ROOT / "README.md").read_text()
    quoted = re.findall(r"<!-- from (docs/results/[\w-]+/report\.md) -->\n((?:.+\n)+)", readme)
    assert quoted, "the README quotes no results page"
    for page, block in quoted:
        lines = set((REPO_ROOT / page).read_text().splitlines())
        for line in block.splitlines():
            assert line in lines, f"README line not in {page}: {line}"
