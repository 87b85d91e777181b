"""The matching protocol on tiny random LLaMAs: compute sparsity counted on what was scored, knobs solved on each
unit's own inputs, BlockPruner fitted to the real lengths, SDTP batch-independent, perplexity on the same positions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench.flops import analytic_decoder_flops, count_flops
from bench.matching import (
    MATCH_TOLERANCE,
    SOLVE_TOLERANCE,
    Workload,
    is_matched,
    solve_knob,
    workload_sparsity,
)
from bench.models import tiny_llama
from methods import make_method
from methods.base import CalibrationSet, Knob, scoring

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deep():
    """12 layers: fine enough compute granularity for every method to land within ±0.02."""
    return tiny_llama(num_layers=12, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128, seed=0)


def _calibration() -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return CalibrationSet.from_tensor(torch.randint(0, 128, (12, 32), generator=g), "random-tokens")


def _workload(lengths: list[int], scored_tail: int, batch: int = 2, seed: int = 0) -> Workload:
    """Forwards of `batch` equal rows per length, the last `scored_tail` positions scored (like choices)."""
    g = torch.Generator().manual_seed(seed)
    forwards = []
    for n in lengths:
        ids = torch.randint(0, 128, (batch, n), generator=g)
        scored = torch.zeros(batch, n, dtype=torch.bool)
        scored[:, n - scored_tail:] = True
        forwards.append((ids, scored, {}))
    return Workload(forwards)


def _dense(model):
    layers = model.config.num_hidden_layers
    return lambda b, n: analytic_decoder_flops(model.config, n, batch=b, num_layers=layers)


SHORT = [18, 22, 25, 30, 34]  # multiple-choice-like items
LONG = [96, 128]  # passages


def _calibrated(name: str, model, **fields):
    fast = {"sdtp": {"train_sequences": 2, "train_seq_len": 16}, "ftp": {"preset": "test"}}
    extra = next((v for k, v in fast.items() if name == k or name.startswith(k + "-")), {})
    method = make_method(name, sparsity=0.25, progress=False, **extra, **fields) if extra \
        else make_method(name, sparsity=0.25, **fields)
    method.load_artifact(method.calibrate(model, None, _calibration()))
    return method


@pytest.mark.parametrize("name", ["sdtp", "ftp-topk", "ftp-static", "ftp-random"])
def test_row_flops_equal_flop_counter_mode(deep, name):
    """Methods whose FLOPs follow from the row's shape are solved by arithmetic: it must equal the real count."""
    method = _calibrated(name, deep)
    knob = method.knob(deep.config)
    for value in (knob.value, (knob.value + (knob.low if knob.increasing else knob.high)) / 2):
        method.set_knob(value)
        with method.apply(deep) as pruned:
            for n, tail in ((40, 5), (64, 0), (17, 12)):
                ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
                scored = torch.zeros(1, n, dtype=torch.bool)
                scored[:, n - tail:] = True
                with scoring(scored):
                    counted = count_flops(pruned, ids).decoder
                assert method.row_flops(deep.config, n, scored[0]) == counted


@pytest.mark.parametrize("name", ["sdtp", "ftp-topk", "ftp-static", "ftp"])
@pytest.mark.parametrize("lengths,tail", [(SHORT, 3), (LONG, 0)])
def test_solved_knob_lands_within_the_band_on_each_length_distribution(deep, name, lengths, tail):
    method = _calibrated(name, deep)
    workload = _workload(lengths, tail)
    with method.apply(deep) as pruned:
        result = solve_knob(method, pruned, workload, _dense(deep))
        measured = workload_sparsity(pruned, workload, _dense(deep))
    assert result.knob == method.knob(deep.config).name and result.value is not None
    assert abs(measured - 0.25) <= MATCH_TOLERANCE, (result, measured)
    assert is_matched(measured, 0.25)


def test_the_knob_differs_between_short_and_long_inputs(deep):
    """SDTP protects the scored span and the last 10%: short scored items need a smaller keep ratio."""
    method = _calibrated("sdtp", deep)
    values = []
    for lengths, tail in ((SHORT, 3), (LONG, 0)):
        with method.apply(deep) as pruned:
            values.append(solve_knob(method, pruned, _workload(lengths, tail), _dense(deep)).value)
        method.set_knob(None)
    assert values[0] < values[1]


def test_an_unreachable_target_is_reported_not_hidden(deep):
    """Short items whose scored span covers most of the row: SDTP cannot drop enough."""
    method = _calibrated("sdtp", deep)
    method.sparsity = 0.45
    workload = _workload([12, 14, 16], scored_tail=9)
    with method.apply(deep) as pruned:
        result = solve_knob(method, pruned, workload, _dense(deep))
        measured = workload_sparsity(pruned, workload, _dense(deep))
    assert result.reason and "out of reach" in result.reason
    assert measured == pytest.approx(result.solved_sparsity) and not is_matched(measured, 0.45)


class _CurveMethod:
    """A stand-in with c = curve(knob value) on every row, solved by arithmetic (`row_flops`)."""

    def __init__(self, curve, target, increasing=True, dense_at=None, start=0.5):
        self.curve, self.sparsity, self.value = curve, target, None
        self.spec = Knob("v", start, low=0.0, high=1.0, increasing=increasing, dense_at=dense_at)

    def knob(self, config):
        return self.spec

    def set_knob(self, value):
        self.value = value

    def row_flops(self, config, width, scored):
        return round(1e9 * (1.0 - self.curve(self.spec.value if self.value is None else self.value)))


def _solve_curve(method):
    config = tiny_llama(num_layers=2).config
    workload = Workload([(torch.zeros(1, 8, dtype=torch.long), None, {})])
    return solve_knob(method, SimpleNamespace(config=config), workload, lambda b, n: 10**9)


@pytest.mark.parametrize("increasing", [True, False])
def test_the_solve_lands_on_a_nonlinear_monotone_curve(increasing):
    curve = (lambda v: 0.6 * v**2) if increasing else (lambda v: 0.6 * (1 - v) ** 2)
    result = _solve_curve(_CurveMethod(curve, 0.25, increasing=increasing))
    assert abs(result.solved_sparsity - 0.25) <= SOLVE_TOLERANCE and not result.reason
    assert result.solved_sparsity == pytest.approx(curve(result.value))


def test_dense_at_is_a_point_of_the_curve_that_costs_no_step():
    """With c(0) = 0 given, the first step is a secant through the origin instead of a forward at the bound."""
    curve = lambda v: 0.3 * v + 0.3 * v**2  # noqa: E731
    with_origin = _solve_curve(_CurveMethod(curve, 0.25, dense_at=0.0, start=0.9))
    without = _solve_curve(_CurveMethod(curve, 0.25, start=0.9))
    assert abs(with_origin.solved_sparsity - 0.25) <= SOLVE_TOLERANCE
    assert abs(without.solved_sparsity - 0.25) <= SOLVE_TOLERANCE
    assert with_origin.steps < without.steps


def test_a_target_beyond_the_bound_stops_at_the_bound_with_the_reason():
    result = _solve_curve(_CurveMethod(lambda v: 0.2 * v, 0.25, dense_at=0.0))
    assert result.value == 1.0 and "out of reach" in result.reason and "gives c = 0.2000" in result.reason


def test_ftp_computes_every_token_at_its_dense_at_value(deep):
    """`dense_at` is taken without a forward: FTP's scale 0 must give c = 0 exactly, router costs included."""
    method = _calibrated("ftp", deep)
    knob = method.knob(deep.config)
    method.set_knob(knob.dense_at)
    with method.apply(deep) as pruned:
        assert workload_sparsity(pruned, _workload(SHORT, 3), _dense(deep), method) == 0.0
        assert method.executed_flops() == sum(2 * _dense(deep)(1, n) for n in SHORT)


def _blockpruner(model):
    """A hand-made deletion order, every MLP block first, then the MHA blocks (the search is tested elsewhere)."""
    layers = model.config.num_hidden_layers
    order = [[kind, i] for kind in ("mlp", "mha") for i in range(layers)]
    method = make_method("blockpruner", sparsity=0.25, search_steps=len(order))
    method.load_artifact({"deletion_order": order, "num_layers": layers, "perplexities": [1.0] * len(order),
                          "dense_perplexity": 1.0})
    return method


def test_blockpruner_fits_its_prefix_to_the_real_lengths():
    model = tiny_llama(num_layers=24, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128, seed=0)
    method = _blockpruner(model)
    prefixes = {}
    for n in (128, 2048):
        fitted = method.fit_lengths(model.config, [(1, n)])
        prefixes[n] = fitted["value"]
        ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))
        dense = count_flops(model, ids).decoder
        with method.apply(model) as pruned:
            measured = 1 - count_flops(pruned, ids).decoder / dense
        assert abs(measured - 0.25) <= MATCH_TOLERANCE, (n, measured)
        assert measured == pytest.approx(method.stats()["compute_sparsity"], abs=1e-12)
    assert prefixes[128] != prefixes[2048]  # attention's share grows with N: fewer blocks reach 0.25 at 2048


def test_sdtp_row_is_the_same_alone_and_in_a_mixed_batch(deep):
    """Per-row budgets: rows whose protected sets differ in size keep the same tokens and give the same logits
    alone and together (the padding slots of the shorter kept set are masked out)."""
    method = _calibrated("sdtp", deep, keep_ratio=0.5)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    scored = torch.zeros(3, 40, dtype=torch.bool)
    scored[0, 37:] = True
    scored[1, 20:] = True  # many more protected tokens
    scored[2, [5, 9, 39]] = True
    with method.apply(deep) as pruned, torch.no_grad():
        with scoring(scored) as ctx:
            together = pruned(input_ids=ids, use_cache=False).logits
            kept_together = ctx.logit_positions.clone()
        for row in range(3):
            with scoring(scored[row:row + 1]) as ctx:
                alone = pruned(input_ids=ids[row:row + 1], use_cache=False).logits
            assert torch.equal(ctx.logit_positions[0], kept_together[row])
            kept = kept_together[row]
            torch.testing.assert_close(together[row][kept], alone[0][kept], rtol=1e-5, atol=1e-5)
    assert kept_together.sum(1).unique().numel() > 1  # the rows really kept different numbers of tokens


def test_perplexity_ratio_is_one_for_dense_and_uses_the_same_positions():
    from bench.wikitext import PerplexityResult

    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    keep = torch.tensor([[True, False, True, False]])
    method = PerplexityResult(ppl=0.0, nll_tokens=2, predictions=4, windows=1, seq_len=5,
                              token_nll=nll + 0.5, scored=keep)
    dense = PerplexityResult(ppl=0.0, nll_tokens=4, predictions=4, windows=1, seq_len=5, token_nll=nll,
                             scored=torch.ones_like(keep))
    assert dense.ppl_on(keep) == pytest.approx(torch.tensor(2.0).exp().item())  # (1 + 3) / 2, not (1+2+3+4)/4
    assert method.ppl_on(keep) / dense.ppl_on(keep) == pytest.approx(torch.tensor(0.5).exp().item())


@pytest.mark.parametrize("name", [n for n in __import__("methods").available_methods() if n != "dense"])
def test_every_method_is_matched_by_the_harness_rule(deep, name):
    """The harness's rule for each kind of method (fit to the lengths, or solve the knob on the inputs) brings c,
    counted with FlopCounterMode on every forward, within ±0.02 of the target on a 12-layer model."""
    from bench.units import fits_lengths

    fields = {"blockpruner": {"search_steps": 12}}.get(name, {})
    method = _calibrated(name, deep, **fields) if make_method(name).needs_calibration \
        else make_method(name, sparsity=0.25)
    workload, dense = _workload(SHORT, 3), _dense(deep)  # dense FLOPs of the full model (layer removal edits config)
    if fits_lengths(method):
        method.fit_lengths(deep.config, workload.shapes)
    with method.apply(deep) as pruned:
        knob = method.knob(deep.config)
        result = solve_knob(method, pruned, workload, dense) if knob is not None else None
        measured = workload_sparsity(pruned, workload, dense)
        stats = method.stats()
    assert abs(measured - 0.25) <= MATCH_TOLERANCE, (name, measured)
    if result is not None:  # the stats report the knob in force: the solved one
        assert (stats["knob"], stats["knob_value"]) == (knob.name, pytest.approx(result.value))


def test_a_subsample_keeps_a_forward_when_each_is_longer_than_the_budget():
    """Ten 8K prompts against a 2,048-token solve budget (RULER at 8K): the subsample holds one forward, the middle
    one, not none (an empty workload divided c by zero); below the budget it is the workload itself."""
    from bench.matching import SOLVE_TOKENS

    forwards = [(torch.full((1, 8192), i), None, {}) for i in range(10)]
    picked = Workload(forwards).subsample(SOLVE_TOKENS).forwards
    assert len(picked) == 1 and int(picked[0][0][0, 0]) == 5
    short = Workload(forwards[:1]).subsample(10 ** 6)
    assert short.forwards == forwards[:1]
    spread = Workload([(torch.full((1, 512), i), None, {}) for i in range(16)]).subsample(SOLVE_TOKENS).forwards
    assert [int(f[0][0, 0]) for f in spread] == [2, 6, 10, 14]  # evenly spread, unchanged
