"""The report from a store holding two models: one section and one figure panel per model, the paper-style table
(text, LaTeX, HTML), and the HTML page rendered in headless Chromium (not blank, every figure loaded)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import numpy as np
import pytest

from bench.cli import main

MODELS = ("tiny-a", "tiny-b")


@pytest.fixture(scope="module")
def two_model_store(tmp_path_factory):
    """The crash tests' small ShortGPT sweep on two tiny models (different seeds), in one store."""
    import torch
    from sweep import config
    from transformers import AutoTokenizer

    from bench.models import model_source, tiny_llama
    from bench.runner import Runner

    tokenizer = AutoTokenizer.from_pretrained(model_source("smollm2-135m"))
    tokenizer.pad_token = tokenizer.eos_token
    results = tmp_path_factory.mktemp("two") / "results"
    threads = torch.get_num_threads()
    try:
        for seed, name in enumerate(MODELS):
            model = tiny_llama(num_layers=4, hidden=32, heads=2, kv_heads=1, intermediate=64, vocab=len(tokenizer),
                               seed=seed)
            run = dataclasses.replace(config(str(results)), model=name, methods=["shortgpt", "random"])
            Runner(run, model=model, tokenizer=tokenizer).run()
    finally:
        torch.set_num_threads(threads)
    return results


def test_report_has_a_section_and_a_panel_per_model(two_model_store, tmp_path):
    from PIL import Image

    out = tmp_path / "reports"
    assert main(["report", "--results", str(two_model_store), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for model in MODELS:
        assert f"## {model}" in markdown and f"<h2>{model}</h2>" in page
    assert "## What is real" in markdown and markdown.split("## The claims")[0].count(" at c = 0.25:") == 2
    assert "## Resolution" in markdown  # the power line per model and target (bench.power)
    assert markdown.count("### Retention at each target c") == 2 and page.count("<h3>Retention at each target c") == 2
    images = re.findall(r"src='data:image/png;base64,", page)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "layer_profile.png" in pngs and "retention_vs_speedup.png" in pngs
    assert len(images) == len(pngs) == 6 and "src='http" not in page and "src='/" not in page  # self-contained
    assert page.count("<table") == 2  # one paper-style table per model
    for png in set(out.glob("*.png")) - {out / "layer_profile.png"}:  # two panels side by side: wider than one
        width, height = Image.open(png).size
        assert width > 1.6 * height, png.name


def test_layer_profile_shows_what_each_method_removed(two_model_store):
    from bench.report import layer_profiles
    from bench.store import Store
    from bench.summary import current_rows

    store = Store(two_model_store)
    profiles = layer_profiles(current_rows(store.load_rows()), store)
    assert sorted(profiles) == list(MODELS)
    for profile in profiles.values():  # 4 layers at c = 0.25: ShortGPT and random each remove exactly one
        assert sorted(profile.index) == ["random@0.25", "shortgpt@0.25"]
        assert (profile.to_numpy() == 0).sum(axis=1).tolist() == [1, 1]
        assert (profile.to_numpy() == 1).sum(axis=1).tolist() == [3, 3]


def test_table_latex_prints_one_table_per_model(two_model_store, capsys):
    assert main(["table", "--results", str(two_model_store), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert latex.count(r"\begin{table}") == 2 and latex.count(r"\end{tabular}") == 2
    for model in MODELS:
        assert f"{model} (cpu, float32), target compute sparsity 0.25" in latex
    assert r"\textbf{" in latex and "_" not in latex.replace(r"\_", "")  # best retention bold; escaped names
    assert main(["table", "--results", str(two_model_store), "--summary"]) == 0
    text = capsys.readouterr().out
    assert all(f"model: {m}" in text for m in MODELS)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(two_model_store, tmp_path):
    from PIL import Image

    out = tmp_path / "reports"
    assert main(["report", "--results", str(two_model_store), "--out", str(out)]) == 0
    url = (out / "report.html").as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert 'data-figures-loaded="6"' in dom and 'data-figures="6"' in dom  # every <img> decoded
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True,
                   timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and figures, not a blank page
