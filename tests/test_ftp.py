"""FTP on a tiny random LLaMA: real skipping (gather/scatter), exact FLOPs, static router, GA, losses, cached
decoding against a full-sequence reference, padding, calibration end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bench.flops import LayerFlopCoefficients, count_flops
from methods import make_method
from methods.base import CalibrationSet
from methods.ftp import FTP
from methods.ftp.block import RoutingController, RoutingPolicy, routed_model
from methods.ftp.measure import measure_routing, solve_scale
from methods.ftp.router import (
    TokenRouter,
    newest_token_features,
    router_features,
    static_compute_mask,
    topk_compute_mask,
)
from methods.ftp.schedule import GAConfig, genetic_search, token_sparsity_for_compute, uniform_schedule
from methods.ftp.training import (
    distillation_loss,
    guide_loss,
    guide_weight,
    sparsity_loss,
    teacher_features,
    train_router,
    warm_start,
    weighted_bce,
)

SCHEDULE = [0.0, 0.5, 0.25, 0.4, 0.6, 0.3]  # six blocks, as the `tiny` fixture


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(**changes):
    """The test preset's router-training recipe (FTP.train_config, the one source of its values) with `changes`."""
    return replace(FTP(sparsity=0.25, preset="test").train_config(), **changes)


def _router(compute_bias: float = 0.0) -> TokenRouter:
    """A hand-set router that computes late, highly attended tokens in lightly scheduled blocks and skips others:
    logit_compute - logit_skip = 3·gelu(position) - 2·gelu(rank) - 3·gelu(s_i) + 0.2 + bias."""
    router = TokenRouter()
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
        router.net[0].weight[0, 0] = router.net[0].weight[1, 2] = router.net[0].weight[2, 3] = 1.0
        router.net[2].weight[0, :3] = torch.tensor([3.0, -2.0, -3.0])
        router.net[2].bias[0] = 0.2 + compute_bias
    return router.eval().requires_grad_(False)


def _controller(config, schedule, router, kind="learned", selection="argmax", **policy) -> RoutingController:
    return RoutingController(config, RoutingPolicy(tuple(schedule), kind=kind, selection=selection, **policy), router)


def _ids(length: int = 40, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# -- the routed block ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,selection", [("learned", "argmax"), ("learned", "topk"), ("static", "topk")])
def test_sparsity_zero_equals_dense(tiny, kind, selection):
    ids = _ids()
    dense = _logits(tiny, ids)
    ctl = _controller(tiny.config, [0.0] * 6, _router(compute_bias=-5.0) if kind == "learned" else None,
                            kind=kind, selection=selection)
    with routed_model(tiny, ctl):
        routed = _logits(tiny, ids)
    torch.testing.assert_close(routed, dense, rtol=1e-5, atol=1e-5)


def test_method_at_sparsity_zero_equals_dense(tiny, tiny_calibration):
    method = FTP(sparsity=0.0, preset="test", progress=False)
    method.load_artifact(method.calibrate(tiny, None, tiny_calibration))
    ids = _ids()
    dense = _logits(tiny, ids)
    with method.apply(tiny):
        torch.testing.assert_close(_logits(tiny, ids), dense, rtol=1e-5, atol=1e-5)
    assert method.stats()["compute_sparsity"] == pytest.approx(0.0, abs=1e-3)  # only router FLOPs: none here


def test_skipped_tokens_bypass_the_block_and_are_absent_from_its_keys(tiny):
    ids = _ids()
    ctl = _controller(tiny.config, SCHEDULE, _router(), kind="learned", selection="topk")
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with routed_model(tiny, ctl):
        handles = [layer.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, (args[0].clone(), out.clone())))
            for i, layer in enumerate(tiny.model.layers)]
        with torch.no_grad():
            output = tiny(input_ids=ids, use_cache=True)
        for handle in handles:
            handle.remove()
        decisions = {i: d[0].clone() for i, d in ctl.last_decisions.items()}
    cache = output.past_key_values
    skipped_somewhere = False
    for i, layer in enumerate(tiny.model.layers):
        compute = decisions[i]
        h_in, h_out = seen[i]
        skipped = ~compute
        skipped_somewhere |= bool(skipped.any())
        assert torch.equal(h_out[0, skipped], h_in[0, skipped]), f"block {i} changed a skipped token"
        assert not torch.equal(h_out[0, compute], h_in[0, compute])
        # The block's cache holds exactly the computed tokens' keys, rotated at their original positions.
        keys = cache.layers[i].keys[0]
        assert keys.shape[-2] == int(compute.sum())
        attn = layer.self_attn
        x = layer.input_layernorm(h_in[0, compute])
        k = attn.k_proj(x).view(-1, attn.config.num_key_value_heads, attn.head_dim).transpose(0, 1)
        cos, sin = tiny.model.rotary_emb(x[None], compute.nonzero()[:, 0][None])
        rotated = k * cos + torch.cat([-k[..., k.shape[-1] // 2:], k[..., : k.shape[-1] // 2]], -1) * sin
        torch.testing.assert_close(keys, rotated, rtol=1e-5, atol=1e-5)
    assert skipped_somewhere and bool(decisions[0].all())


@pytest.mark.parametrize("kind,selection", [("learned", "argmax"), ("learned", "topk"), ("static", "topk"),
                                            ("random", "topk")])
def test_executed_flops_match_the_analytic_count(tiny, kind, selection):
    ids = _ids(48)
    coeff = LayerFlopCoefficients.from_config(tiny.config)
    router = _router() if kind == "learned" else None
    ctl = _controller(tiny.config, SCHEDULE, router, kind=kind, selection=selection)
    with routed_model(tiny, ctl):
        measured = count_flops(tiny, ids).decoder
        counts = [int(ctl.last_decisions[i].sum()) for i in range(6)]
    routed_blocks = sum(1 for s in SCHEDULE[1:] if s > 0)
    router_flops = routed_blocks * ids.shape[1] * (2 * 4 * 64 + 2 * 64 * 2) if kind == "learned" else 0
    # the learned router's attention-score table: a weighted column sum over H·n·n probabilities (a matmul,
    # 2·H·n·n), in every block but the last (no later block reads it)
    heads = tiny.config.num_attention_heads
    table_flops = sum(2 * heads * n * n for n in counts[:-1]) if kind == "learned" else 0
    assert measured == sum(coeff.layer(n) for n in counts) + router_flops + table_flops
    assert ctl.stats.executed_flops + ctl.stats.router_flops == measured
    assert counts[0] == 48 and min(counts) < 48
    if selection == "topk":
        assert counts == [math.ceil((1 - s) * 48 - 1e-9) for s in SCHEDULE]
    assert measured < count_flops(tiny, ids).decoder


def test_real_skipping_equals_the_gated_simulation(arch_model):
    """Gather/scatter inference and the training-time simulation (h + g·Δ, skipped keys masked) agree, on every
    architecture (sliding-window layers see their window in original positions in both)."""
    tiny = arch_model
    ids = _ids(36)
    ctl = _controller(tiny.config, SCHEDULE, _router(), kind="learned", selection="argmax")
    with routed_model(tiny, ctl):
        routed = _logits(tiny, ids)
        decisions = {i: d.clone() for i, d in ctl.last_decisions.items()}
        with ctl.simulating(forced=decisions):
            simulated = _logits(tiny, ids)
        with ctl.simulating():
            unforced = _logits(tiny, ids)  # argmax gates from the router itself: the same decisions
    torch.testing.assert_close(simulated, routed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unforced, routed, rtol=1e-5, atol=1e-5)


# -- router inputs and selections -----------------------------------------------------------------------------
def test_static_router_keeps_first_token_and_recent_window(tiny):
    valid = torch.ones(1, 10, dtype=torch.bool)
    mask = static_compute_mask(valid, 0.6)  # ⌈0.4·10⌉ = 4: x0 and x7, x8, x9
    assert mask[0].nonzero()[:, 0].tolist() == [0, 7, 8, 9]
    padded = torch.tensor([[False, False, True, True, True, True, True, True]])
    assert static_compute_mask(padded, 0.5)[0].nonzero()[:, 0].tolist() == [2, 6, 7]  # budget from 6 valid tokens
    ctl = _controller(tiny.config, SCHEDULE, None, kind="static")
    with routed_model(tiny, ctl):
        _logits(tiny, _ids(20))
        for i, s in enumerate(SCHEDULE):
            keep = math.ceil((1 - s) * 20 - 1e-9)
            expected = [0] + list(range(20 - keep + 1, 20)) if s > 0 else list(range(20))
            assert ctl.last_decisions[i][0].nonzero()[:, 0].tolist() == expected


def test_topk_budget_excludes_padding():
    p = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.2, 0.6]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    assert topk_compute_mask(p, valid, 0.4)[0].tolist() == [False, True, False, True, False, True]


def test_attention_score_table_is_one_under_uniform_attention():
    from methods.ftp.attention import attention_received, causal_visibility

    n = 7
    visible = causal_visibility(n, n, torch.device("cpu"))
    probs = (visible.float() / visible.sum(-1, keepdim=True))[None, None].expand(1, 3, n, n)
    torch.testing.assert_close(attention_received(probs, visible[None]), torch.ones(1, n))


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
def test_probability_attention_equals_sdpa(mask_kind):
    """The eager path that returns probabilities (grouped-query matmuls, no repeat_kv) gives SDPA's output, and
    its probabilities are zero wherever the mask hides a key."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from methods.ftp.attention import causal_visibility, ftp_attention_forward

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n, dim = 2, 6, 2, 9, 8
    query = torch.randn(batch, n, heads, dim, generator=g).transpose(1, 2)  # the layout attention modules pass
    key, value = (torch.randn(batch, kv_heads, n, dim, generator=g) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    visible = causal_visibility(n, n, torch.device("cpu"))[None, None].expand(batch, 1, n, n).clone()
    visible[0, :, :, :3] = False  # row 0: three padding keys
    visible[0, :, :3, 0] = True  # ... whose own queries see one key, as transformers' masks do
    mask = {"causal": None, "bool": visible,
            "additive": torch.zeros(batch, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)}[mask_kind]
    reference = visible if mask_kind != "causal" else None
    expected, _ = sdpa_attention_forward(module, query, key, value, reference, is_causal=mask_kind == "causal")
    out, probs = ftp_attention_forward(module, query, key, value, mask, ftp_need_probs=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    hidden = ~(visible if mask_kind != "causal" else causal_visibility(n, n, torch.device("cpu"))[None, None])
    assert probs.masked_select(hidden.expand_as(probs)).abs().max() == 0


def test_attention_received_equals_its_definition():
    """Weighted column sums equal the definition: mean over heads and over the queries that see the key of
    P(q, k) · (keys q sees), with padding queries left out."""
    from methods.ftp.attention import attention_received, causal_visibility

    n, heads = 8, 3
    valid = torch.tensor([[False, False, True, True, True, True, True, True], [True] * n])
    visible = causal_visibility(n, n, torch.device("cpu"))[None] & valid[:, None, :] & valid[:, :, None]
    logits = torch.randn(2, heads, n, n, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), -1).nan_to_num(0.0)
    probs[0, :, :2] = 1.0 / n  # padding queries attend somewhere; they must not count
    v = visible.float()
    definition = (probs.mean(1) * v.sum(-1, keepdim=True) * v).sum(-2) / v.sum(-2).clamp(min=1)
    torch.testing.assert_close(attention_received(probs, visible), definition)
    causal = torch.softmax(logits.masked_fill(~causal_visibility(n, n, torch.device("cpu")), float("-inf")), -1)
    torch.testing.assert_close(attention_received(causal), attention_received(causal, causal_visibility(n, n, "cpu")[None]))


def test_padded_rows_match_unpadded_rows(tiny):
    """Padding is never computed in routed blocks and never counts toward a budget."""
    ids = _ids(24)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    batch = torch.cat([padded, torch.cat([ids, ids[:, :pad]], dim=1)])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    positions = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.arange(24)[None]], 1)
    positions = torch.cat([positions, torch.arange(24 + pad)[None]])
    ctl = _controller(tiny.config, SCHEDULE, None, kind="static")
    with routed_model(tiny, ctl):
        alone = _logits(tiny, ids)
        both = _logits(tiny, batch, attention_mask=mask, position_ids=positions, use_cache=False)
        assert not ctl.last_decisions[2][0, :pad].any()
    torch.testing.assert_close(both[0, pad:], alone[0], rtol=1e-4, atol=1e-4)


# -- cached decoding -------------------------------------------------------------------------------------------
def test_generate_with_cache_matches_full_sequence_reference(arch_model):
    """Reference: the full generated sequence run without cache through the gated simulation, with every
    (block, position) decision forced to what cached decoding chose. Token t's state at block i depends only on
    earlier tokens and their decisions, so the two must give the same logits at every position, and greedy
    decoding must pick their argmax. On every architecture: sliding-window caches that hold only computed tokens
    (and drop their oldest entries) still give each query exactly its window."""
    tiny = arch_model
    prompt = _ids(16)
    ctl = _controller(tiny.config, SCHEDULE, _router(compute_bias=-1.5), kind="learned")
    steps: list[dict[int, torch.Tensor]] = []
    with routed_model(tiny, ctl):
        hook = tiny.model.register_forward_hook(lambda *a: steps.append(dict(ctl.last_decisions)))
        with torch.no_grad():
            out = tiny.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        hook.remove()
        sequence = out.sequences
        total = sequence.shape[1] - 1  # the last token was never fed back
        decisions = {i: torch.cat([step[i] for step in steps], dim=1)[:, :total] for i in range(6)}
        decode_skips = sum(int((~decisions[i][:, 16:]).sum()) for i in range(1, 6))
        with ctl.simulating(forced=decisions):
            reference = _logits(tiny, sequence[:, :total])
    generated = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(generated, reference[:, 15:], rtol=1e-4, atol=1e-4)
    assert torch.equal(sequence[:, 16:], reference[:, 15:].argmax(-1))
    assert decode_skips > 0, "the test router should skip some decoding steps"
    assert ctl.stats.decode_steps == 9


def test_cached_decoding_rejects_batches(tiny):
    from methods.base import MethodConfigError

    ctl = _controller(tiny.config, SCHEDULE, None, kind="static")
    with routed_model(tiny, ctl), pytest.raises(MethodConfigError, match="batch size 1"):
        tiny.generate(_ids(12, batch=2), max_new_tokens=2, do_sample=False)


# -- schedule search -------------------------------------------------------------------------------------------
def test_translation_from_compute_to_token_sparsity(real_config):
    assert token_sparsity_for_compute(0.25, real_config, 512) == pytest.approx(0.225, abs=0.001)
    assert token_sparsity_for_compute(0.0, real_config, 512) == 0.0


def test_ga_keeps_mean_and_improves_a_planted_problem():
    blocks, mean = 10, 0.3
    planted = [0.0, 0.05, 0.1, 0.2, 0.6, 0.8, 0.6, 0.35, 0.2, 0.1]  # mean 0.3, s_0 = 0
    assert sum(planted) / blocks == pytest.approx(mean)

    def fitness(s: list[float]) -> float:
        assert s[0] == 0.0 and abs(sum(s) / blocks - mean) < 1e-9 and min(s) >= 0 and max(s) <= 0.9 + 1e-12
        return -sum((a - b) ** 2 for a, b in zip(s, planted, strict=True))

    result = genetic_search(fitness, blocks, mean, GAConfig(population=16, generations=25), seed=0, progress=False)
    assert result.best_fitness[-1] > result.best_fitness[0] + 0.1
    assert result.best_fitness == sorted(result.best_fitness)  # elitism: the best never gets worse
    assert fitness(result.best) == pytest.approx(result.best_fitness[-1])
    assert result.best_fitness[-1] > fitness(uniform_schedule(blocks, mean)) + 0.1
    again = genetic_search(fitness, blocks, mean, GAConfig(population=16, generations=25), seed=0, progress=False)
    assert again.best == result.best


# -- losses ------------------------------------------------------------------------------------------------------
def test_each_loss_is_zero_where_it_should_be():
    static = {1: torch.tensor([[True, False, True]])}
    assert float(guide_loss({1: static[1].float()}, static)) == 0.0
    assert float(guide_loss({1: torch.full((1, 3), 0.5)}, static)) == pytest.approx(math.log(2))
    p = {1: torch.tensor([[0.2, 0.4, 0.6, 0.8]]), 2: torch.tensor([[0.9, 0.9, 0.9, 0.9]])}  # skip 0.5 and 0.1
    assert float(sparsity_loss(p, [0.0, 0.5, 0.1])) == 0.0  # met exactly
    assert float(sparsity_loss(p, [0.0, 0.3, 0.0])) == 0.0  # over-skipping is not penalised
    assert float(sparsity_loss(p, [0.0, 0.6, 0.3])) == pytest.approx(0.1 + 0.2)
    assert guide_weight(0, 100) == 1.0 and guide_weight(25, 100) == 0.5 and guide_weight(50, 100) == 0.0
    assert guide_weight(99, 100) == 0.0
    logits = torch.randn(1, 5, 11)
    assert float(distillation_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(1, 5, 11)
    p_dense, log_q = torch.softmax(logits, -1), torch.log_softmax(other, -1)
    kl = (p_dense * (torch.log_softmax(logits, -1) - log_q)).sum(-1).mean()  # KL(dense ‖ routed) per position
    assert float(distillation_loss(other, logits)) == pytest.approx(float(kl), rel=1e-5)


def test_standardised_inputs_leave_the_router_unchanged_in_form():
    """Inside, the router reads standardised inputs from re-expressed weights (same function); on exit the
    standardisation is folded back: same outputs, no hook left, and a training step taken inside changes the
    raw-input router exactly as it changed the standardised one."""
    from methods.ftp.training import feature_moments, standardised_inputs

    torch.manual_seed(0)
    router = TokenRouter()
    x = torch.rand(64, 4) * torch.tensor([1.0, 70.0, 1.0, 0.5])
    before = router(x).detach()
    with standardised_inputs(router, *feature_moments(x)):
        torch.testing.assert_close(router(x), before)
        with torch.no_grad():
            router.net[0].weight[:, 1] += 0.5  # a step on the score input, in standardised units
        inside = router(x).detach()
    assert not router._forward_pre_hooks
    torch.testing.assert_close(router(x), inside)
    assert not torch.allclose(inside, before)


def test_distillation_is_zero_when_every_token_is_computed(tiny):
    ids = _ids(20)
    ctl = _controller(tiny.config, SCHEDULE, _router(), kind="learned")
    with routed_model(tiny, ctl):
        with ctl.dense():
            dense = tiny(input_ids=ids).logits
        with ctl.simulating(forced={i: torch.ones(1, 20, dtype=torch.bool) for i in range(6)}):
            simulated = tiny(input_ids=ids).logits
    torch.testing.assert_close(simulated, dense)
    assert abs(float(distillation_loss(simulated, dense))) < 1e-6  # float32 rounding only


# -- the method -------------------------------------------------------------------------------------------------
def _calibration(rows: int = 12, length: int = 32) -> CalibrationSet:
    return CalibrationSet.from_tensor(torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(0)),
                                      "random-tokens")


def test_calibrate_is_seeded_and_hits_the_target(tiny):
    fields = dict(sparsity=0.3, preset="test", selection="topk", progress=False)
    method = FTP(**fields)
    artifact = method.calibrate(tiny, None, _calibration())
    again = FTP(**fields).calibrate(tiny, None, _calibration())
    assert artifact["schedule"] == again["schedule"]
    assert artifact["loss_total"] == again["loss_total"]
    assert torch.equal(artifact["router.net.0.weight"], again["router.net.0.weight"])
    schedule = artifact["schedule"]
    assert schedule[0] == 0.0 and sum(schedule) / 6 == pytest.approx(artifact["schedule_mean"])
    assert artifact["schedule_mean"] == pytest.approx(token_sparsity_for_compute(0.3, tiny.config, 512))
    for key in ("ga_best_fitness", "finetune_best_fitness", "loss_guide", "loss_sparsity", "loss_distill"):
        assert artifact[key], key
    assert all(isinstance(v, (torch.Tensor, int, float, list)) for v in artifact.values())
    assert abs(artifact["measured_compute_sparsity"] - 0.3) <= 0.02
    method.load_artifact(artifact)
    ids = _ids(32)
    with method.apply(tiny):
        _logits(tiny, ids)
        stats = method.stats()
    assert abs(stats["compute_sparsity"] - 0.3) <= 0.02
    assert stats["per_block_computed_fraction"][0] == 1.0


def test_rescaling_moves_an_argmax_router_onto_the_target(tiny):
    """The argmax router's sparsity is measured, then the schedule scaled until it fits (regula falsi)."""
    ctl = _controller(tiny.config, SCHEDULE, _router(compute_bias=1.0))
    windows = _ids(48, batch=2)
    with routed_model(tiny, ctl):
        fit = solve_scale(tiny, ctl, SCHEDULE, windows, 0.3, 0.005, 12, 0.9)
    first = fit.history[0]
    assert first["scale"] == 1.0 and abs(first["compute_sparsity"] - 0.3) > 0.005  # misses ...
    assert abs(fit.measured["compute_sparsity"] - 0.3) <= 0.005  # ... the rescaled one fits
    assert fit.scale != 1.0 and ctl.policy.schedule == tuple(min(0.9, s * fit.scale) for s in SCHEDULE)


def test_a_router_deaf_to_its_sparsity_input_is_left_unmatched(tiny):
    """No threshold is moved: a router whose P(compute) ignores s_i and stays above 0.5 cannot be scaled onto the
    target, and the solve says so (c stays near 0) instead of changing the decision rule."""
    router = _router(compute_bias=2.0)
    with torch.no_grad():
        router.net[2].weight[0, 2] = 0.0  # no dependence on s_i
    ctl = _controller(tiny.config, SCHEDULE, router)
    with routed_model(tiny, ctl):
        fit = solve_scale(tiny, ctl, SCHEDULE, _ids(48), 0.3, 0.005, 8, 0.9)
    assert all(h["compute_sparsity"] < 0.05 for h in fit.history)
    assert abs(fit.error(0.3)) > 0.2


@pytest.mark.parametrize("name", ["ftp-static", "ftp-random", "ftp-uniform"])
def test_variants_hit_the_target_on_calibration_windows(tiny, name):
    method = make_method(name, sparsity=0.3, preset="test", selection="topk", progress=False)
    artifact = method.calibrate(tiny, None, _calibration())
    assert abs(artifact["measured_compute_sparsity"] - 0.3) <= 0.02
    if name == "ftp-uniform":
        assert artifact["ga_best_fitness"] == [] and len(set(artifact["schedule"][1:])) == 1


def test_registry_variants():
    assert make_method("ftp").router == "learned" and make_method("ftp").selection == "argmax"
    assert make_method("ftp-static").router == "static"
    assert make_method("ftp-random").router == "random"
    assert make_method("ftp-uniform").schedule == "uniform"
    assert make_method("ftp-nopos").position_input is False
    nosparsity = make_method("ftp-nosparsity")
    assert nosparsity.sparsity_input is False and nosparsity.selection == "topk"
    assert make_method("ftp-topk").selection == "topk" and make_method("ftp-topk").router == "learned"
    assert make_method("ftp", preset="paper").population == 32 and make_method("ftp", preset="paper").generations == 30
    assert FTP.sequence_dependent and FTP.needs_calibration


def test_bad_fields_raise_clear_errors():
    from methods.base import MethodConfigError

    with pytest.raises(MethodConfigError, match="preset"):
        FTP(preset="fast")
    with pytest.raises(MethodConfigError, match="selection"):
        FTP(selection="sample")
    with pytest.raises(MethodConfigError, match="holdout_windows"):
        FTP(holdout_windows=2, fitness_windows=2, rescale_windows=2)


# -- the blocked attention pass, incremental decoding features, the training recipe ---------------------------
@pytest.mark.parametrize("case", ["causal", "padded", "decode"])
def test_blocked_attention_received_equals_eager_and_is_counted(case):
    """One blocked pass gives SDPA's output and the eager definition of attention received, and FlopCounterMode
    counts it as SDPA (full n×m) plus the column sums."""
    from torch.utils.flop_counter import FlopCounterMode

    from methods.ftp import attention as A

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, m, dim = 2, 6, 2, 300, 8  # 300 > one query chunk
    n = 1 if case == "decode" else m
    query = torch.randn(batch, heads, n, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, m, dim, generator=g) for _ in range(2))
    module = torch.nn.Module()
    valid = torch.ones(batch, n, dtype=torch.bool)
    mask = None
    visible = A.causal_visibility(n, m, torch.device("cpu"))[None].expand(batch, n, m)
    if case == "padded":
        valid[0, :5] = False
        visible = visible & valid[:, None, :] & valid[:, :, None]
        mask = visible[:, None]
    out_eager, probs = A.ftp_attention_forward(module, query, key, value, mask, ftp_need_probs=True)
    expected = A.attention_received(probs, visible)
    with FlopCounterMode(display=False) as counter:
        out, received = A.ftp_attention_forward(module, query, key, value, mask, ftp_received=True,
                                                ftp_valid=valid if case == "padded" else None)
    rows = valid[:, :, None, None].expand_as(out)  # padding queries' outputs are unused
    torch.testing.assert_close(out[rows], out_eager[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(received, expected, rtol=1e-4, atol=1e-5)
    assert counter.get_total_flops() == 4 * batch * heads * n * m * dim + 2 * batch * heads * n * m


@pytest.mark.parametrize("use_position", [True, False])
def test_decode_features_equal_features_recomputed_over_the_sequence(tiny, use_position):
    """Each cached decoding step builds the newest token's features in O(log N); they equal the features
    `router_features` computes from scratch over the whole sequence and table, ties included, with and without the
    position input."""
    checked = []

    class Checking(RoutingController):
        def decode_decision(self, index):
            state, policy = self.state, self.policy
            if policy.routed(index):
                scratch = router_features(state.valid, state.table, policy.schedule[index], use_position)[:, -1:]
                fast = newest_token_features(int(state.valid.sum()), state.table[0, -1], state.previous_sorted,
                                             policy.schedule[index], use_position)
                torch.testing.assert_close(fast, scratch)
                checked.append(index)
            return super().decode_decision(index)

    ctl = Checking(tiny.config, RoutingPolicy(tuple(SCHEDULE), use_position=use_position), _router(compute_bias=-1.5))
    with routed_model(tiny, ctl), torch.no_grad():
        tiny.generate(_ids(16), max_new_tokens=8, do_sample=False)
    assert len(checked) == 7 * 5  # every routed block of every decoding step
    sorted_scores = torch.tensor([0.5, 1.0, 1.0, 2.0])
    for score, rank in ((1.0, 3), (3.0, 0), (0.1, 4)):  # ties rank the newest token after the earlier ones
        features = newest_token_features(5, torch.tensor(score), sorted_scores, 0.3)
        assert features[0, 0].tolist() == pytest.approx([math.log(5) / math.log(6), score, rank / 5, 0.3])
        unplaced = newest_token_features(5, torch.tensor(score), sorted_scores, 0.3, use_position=False)
        assert unplaced[0, 0].tolist() == pytest.approx([0.0, score, rank / 5, 0.3])  # the no-position ablation


def _warm_started_router(tiny, windows: torch.Tensor) -> RoutingController:
    config = recipe(warm_start_steps=400, warm_start_lr=2e-2)
    ctl = _controller(tiny.config, SCHEDULE, TokenRouter())
    with routed_model(tiny, ctl):
        features, decisions = teacher_features(tiny, ctl, windows, __import__("random").Random(0), config,
                                               progress=False)
    warm_start(ctl.router, features, decisions, config, progress=False)
    return ctl


def test_warm_started_router_follows_its_sparsity_input_and_keeps_the_first_token(tiny):
    """Fitted to the static teacher at sampled schedule scales, the router's skip rate moves with a scaled schedule
    (argmax, no budget imposed) and it computes each row's first token, as the teacher does."""
    torch.manual_seed(0)
    ctl = _warm_started_router(tiny, _ids(32, batch=12, seed=5))
    held_out = _ids(32, batch=4, seed=6)
    token_sparsity = []
    with routed_model(tiny, ctl):
        for scale in (0.6, 1.0, 1.4):
            ctl.with_schedule([s * scale for s in SCHEDULE])
            measured = measure_routing(tiny, ctl, held_out)
            token_sparsity.append(measured["token_sparsity"])
            assert measured["first_token_computed_fraction"] >= 0.9
    assert token_sparsity[0] < token_sparsity[1] < token_sparsity[2], token_sparsity  # monotone in its input


def test_model_selection_keeps_the_best_router_including_the_start(tiny):
    """Joint training that only makes the held-out score worse ends with the router it started from (identity input
    moments, so the standardised coordinates change no weight)."""
    torch.manual_seed(0)
    ctl = _controller(tiny.config, SCHEDULE, TokenRouter())
    start = {k: v.clone() for k, v in ctl.router.state_dict().items()}
    scores = iter(range(100))
    with routed_model(tiny, ctl):
        history = train_router(tiny, ctl, _ids(32, batch=4), recipe(learning_rate=1e-1, select_every=2),
                               select=lambda: {"loss": float(next(scores))}, progress=False,
                               moments=(torch.zeros(4), torch.ones(4)))
    assert [h["step"] for h in history["selection"]] == [0, 2, 4]
    assert len(history["loss_total"]) == 4 and history["loss_total"][0] > 0
    for key, value in ctl.router.state_dict().items():
        assert torch.equal(value, start[key]), key


def test_standardised_model_selection_restores_the_best_router_in_raw_coordinates(tiny):
    """Joint training takes the selection snapshots in standardised coordinates; the router
    that comes out must compute what the best-scored one computed while it was scored."""
    torch.manual_seed(0)
    ctl = _warm_started_router(tiny, _ids(32, batch=4, seed=5))
    features = torch.rand(256, 4) * torch.tensor([1.0, 20.0, 1.0, 0.5])
    scored = []

    def select():
        scored.append(ctl.router(features).detach().clone())
        return {"loss": [3.0, 1.0, 2.0][len(scored) - 1]}  # the check at step 2 is the best

    moments = (features.mean(0), features.std(0))
    with routed_model(tiny, ctl):
        train_router(tiny, ctl, _ids(32, batch=4), recipe(learning_rate=5e-2, select_every=2),
                     select=select, progress=False, moments=moments)
    assert len(scored) == 3 and not torch.allclose(scored[0], scored[1])
    out = ctl.router(features).detach()
    torch.testing.assert_close(out, scored[1], atol=1e-3, rtol=1e-4)  # fold/unfold rounding only
    assert (out - scored[2]).abs().max() > 1e-2 and (out - scored[0]).abs().max() > 1e-2
    assert not ctl.router._forward_pre_hooks


def test_logit_bce_keeps_the_gradient_of_a_saturated_wrong_prediction():
    """The warm start's BCE, computed from the logit difference, equals the BCE of P(compute) where P is not
    saturated; saturated and wrong (P(compute) ~4e-18 at a gap of 40, or exactly 1 in float32 at a gap of 20, where
    the probability form's gradient vanishes or is ~2,000× too large), its gradient stays ±(1 - smoothing)."""
    import torch.nn.functional as F

    targets, weights = torch.tensor([0.95, 0.05, 0.95]), torch.tensor([1.0, 2.0, 0.5])
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.1]])
    torch.testing.assert_close(weighted_bce(logits, targets, weights),
                               F.binary_cross_entropy(torch.softmax(logits, -1)[..., 0], targets, weight=weights))
    for pair, target in (([-20.0, 20.0], 0.95), ([10.0, -10.0], 0.05)):
        saturated = torch.tensor([pair], requires_grad=True)
        weighted_bce(saturated, torch.tensor([target]), torch.ones(1)).backward()
        p_compute = 0.0 if pair[0] < pair[1] else 1.0  # saturated: P(compute) is 0 or 1
        expected = p_compute - target  # d/d(l_compute − l_skip) = P − target: −0.95, then +0.95
        torch.testing.assert_close(saturated.grad, torch.tensor([[expected, -expected]]), rtol=1e-4, atol=1e-4)


def test_every_committed_ftp_artifact_is_reached_by_its_key():
    """Each committed FTP artifact's key is what its fields give today (no field leaks into the key, none is lost):
    a learned router's key records the fixed recipe (`FIXED_RECIPE`), the static and random routers' keys no
    router-training field; the current recipe's three seeds are found with no options."""
    import json
    from pathlib import Path

    from bench.artifacts import COMMITTED_DIR, CalibrationSettings, artifact_key, key_hash
    from methods.ftp.method import FIXED_RECIPE, NOT_IN_KEY, recorded_fields

    committed = sorted(Path("methods/artifacts").glob("ftp-*/artifact.json"))
    assert len(committed) >= 7
    for path in committed:
        fields = json.loads(path.read_text())["key"]["fields"]
        if fields.get("router") == "learned":
            keyed = {k: v for k, v in FIXED_RECIPE.items() if k not in NOT_IN_KEY}
            assert {k: fields.get(k) for k in keyed} == keyed, path.parent.name
        assert make_method("ftp", **recorded_fields(fields)).calibration_config() == fields, path.parent.name
    current = make_method("ftp", sparsity=0.25).calibration_config()
    assert {k: current[k] for k in ("train_min_seq_len", "train_seq_len", "learning_rate", "select_every")} == {
        "train_min_seq_len": 16, "train_seq_len": 512, "learning_rate": 3e-4, "select_every": 20}
    for seed in (0, 1, 2):
        method = make_method("ftp", sparsity=0.25, seed=seed)
        key = artifact_key("smollm2-135m", method, CalibrationSettings.for_method(method, seed=seed))
        assert (COMMITTED_DIR / f"ftp-{key_hash(key)}").is_dir(), seed


def test_committed_ftp_cells_keep_their_identity():
    """A result cell is named by its identity, which holds the method's `config()`: every FTP cell of the verdict
    store is what its method gives today (fields less the fixed recipe), so a rerun finds it instead of computing
    it again."""
    import json
    from pathlib import Path

    from bench.fileutil import json_digest
    from methods.ftp.method import recorded_fields

    cells = [json.loads(p.read_text()) for p in
             sorted(Path("results/studies/verdict_smollm2/cells").glob("*/_cell.json"))]
    ftp = [c for c in cells if c["identity"]["method"].startswith("ftp")]
    assert len(ftp) >= 30
    for cell in ftp:
        identity = cell["identity"]
        assert make_method(identity["method"], **recorded_fields(identity["params"])).config() == identity["params"], \
            cell["cell"]
        hashed = {k: v for k, v in identity.items() if k not in ("stats", "host")}  # recorded beside it (runner)
        assert json_digest(hashed) == cell["cell"]


def test_training_windows_cover_the_lengths_between_the_minimum_and_the_full_row():
    """Without a minimum a training row is used whole (and no random number is drawn); with one, lengths are drawn
    from [min, full] and each window is a prefix of its row."""
    import random

    from methods.base import MethodConfigError
    from methods.ftp.training import training_window

    row = torch.arange(512)
    rng = random.Random(0)
    assert training_window(row, rng, recipe(min_window=0)) is row and rng.random() == random.Random(0).random()
    lengths = [len(training_window(row, rng, recipe(min_window=64))) for _ in range(400)]
    assert min(lengths) >= 64 and max(lengths) <= 512 and max(lengths) - min(lengths) > 300
    assert torch.equal(training_window(row, random.Random(1), recipe(min_window=64)),
                       row[: len(training_window(row, random.Random(1), recipe(min_window=64)))])
    with pytest.raises(MethodConfigError, match="train_min_seq_len"):
        make_method("ftp", sparsity=0.25, train_min_seq_len=600)


def test_router_training_fields_stay_out_of_the_static_artifact_key():
    static, learned = make_method("ftp-static", sparsity=0.25), make_method("ftp", sparsity=0.25)
    assert "distill_target" not in static.calibration_config() and "distill_target" in learned.calibration_config()
    assert (make_method("ftp-static", sparsity=0.25, learning_rate=1e-4).calibration_config()
            == static.calibration_config())


def test_committed_ftp_artifact_uses_the_papers_rule():
    """The shipped ftp artifact (default model, c = 0.25, seed 0) is found by key and was matched by the schedule
    scale alone (no threshold), with the held-out measurements recorded."""
    from bench.artifacts import COMMITTED_DIR, CalibrationSettings, artifact_key, key_hash, load_artifact_dir

    method = make_method("ftp", sparsity=0.25)
    key = artifact_key("smollm2-135m", method, CalibrationSettings.for_method(method, seed=0))
    artifact, _meta = load_artifact_dir(COMMITTED_DIR / f"ftp-{key_hash(key)}")
    assert "compute_threshold" not in artifact
    assert abs(artifact["measured_compute_sparsity"] - 0.25) <= method.rescale_tolerance
    for name in ("heldout_lm_loss", "heldout_static_lm_loss", "first_token_computed_fraction"):
        assert isinstance(artifact[name], float), name


@pytest.fixture
def real_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       num_hidden_layers=30, head_dim=64)
