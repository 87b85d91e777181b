"""SDTP on a tiny random LLaMA (8 layers, stages before layers 2, 4, 6)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from bench.flops import LayerFlopCoefficients, count_flops
from bench.models import TINY_ARCHITECTURES, tiny_llama, tiny_model
from methods import make_method
from methods.base import CalibrationSet, MethodConfigError, scoring
from methods.sdtp import SDTP, keep_ratio_for_sparsity, planned_compute_sparsity, prompt_length
from methods.sdtp.pruning import select_kept
from methods.sdtp.training import (
    MASKED_ATTENTION,
    PruningPlan,
    pairwise_agreement,
    ranking_loss,
    simulated_forward,
    token_saliency,
)

STAGES = [2, 4, 6]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=8)


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def arch_model8(request):
    """The `model` shape on each tiny architecture (bench.models.tiny_model)."""
    return tiny_model(request.param, num_layers=8)


def make_sdtp(model, keep_ratio: float = 0.7, **fields) -> SDTP:
    method = SDTP(keep_ratio=keep_ratio, first_stage_layer=2, stage_interval=2, progress=False, **fields)
    method.load_artifact(method.predictors_to_artifact(model.config, method.new_predictors(model.config)))
    return method


def prompt(seq_len: int = 40, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def kept_positions(model, method, ids, scored=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, logit_positions) of one pruned forward."""
    with method.apply(model), torch.no_grad(), \
            scoring(torch.zeros_like(ids, dtype=torch.bool) if scored is None else scored) as ctx:
        logits = model(ids, use_cache=False).logits
    return logits, ctx.logit_positions


class PlantedPredictor(torch.nn.Module):
    """Scores by original position through the runtime: one 'hot' token gets a huge keep logit."""

    def __init__(self, runtime, hot: int, flops_like) -> None:
        super().__init__()
        self.runtime, self.hot, self.flops_like = runtime, hot, flops_like

    def forward(self, hidden_states):
        positions = self.runtime.kept.float()
        keep = torch.where(positions == self.hot, 1e4, -positions)  # otherwise prefer early tokens
        return torch.stack([keep, torch.zeros_like(keep)], -1)


def test_sparsity_translation_matches_methods_md():
    smol = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                       num_hidden_layers=30)
    stages = list(range(3, 30, 3))
    assert planned_compute_sparsity(0.941, smol, stages, 512) == pytest.approx(0.25, abs=0.002)
    assert planned_compute_sparsity(0.9, smol, stages, 512) == pytest.approx(0.376, abs=0.002)
    per_token = 2 * 576 * 144 + 2 * 144 * 2
    r = keep_ratio_for_sparsity(0.25, smol, stages, 512, per_token)
    assert planned_compute_sparsity(r, smol, stages, 512, per_token) == pytest.approx(0.25, abs=1e-6)
    assert 0.93 < r < 0.941  # the predictors' FLOPs cost a little extra pruning
    method = SDTP(sparsity=0.25)
    assert method.stages(30) == stages
    assert method.resolved_keep_ratio(smol) == pytest.approx(r)
    assert SDTP(sparsity=0.0).resolved_keep_ratio(smol) == 1.0


def test_select_kept_protected_and_budget():
    scores = torch.tensor([[5.0, 1.0, 9.0, 2.0, 8.0, 0.0]])
    protected = torch.tensor([[False, True, False, False, False, False]])
    assert select_kept(scores, protected, 3).tolist() == [[1, 2, 4]]
    assert select_kept(scores, protected, 0).tolist() == [[1]]  # protected alone exceed the budget
    eligible = torch.tensor([[True, True, False, True, True, True]])
    assert select_kept(scores, protected, 3, eligible).tolist() == [[0, 1, 4]]


def test_gather_keeps_original_positions(model):
    method = make_sdtp(model)
    ids = prompt()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(index):
        def hook(module, args, kwargs):
            seen[index] = (kwargs["position_ids"].clone(), kwargs["position_embeddings"][0].clone())
        return hook

    with method.apply(model), scoring(torch.zeros_like(ids, dtype=torch.bool)) as ctx:
        handles = [model.model.layers[i].layer.register_forward_pre_hook(record(i), with_kwargs=True)
                   for i in range(2, 8)]
        model(ids, use_cache=False)
        for handle in handles:
            handle.remove()
    full_cos, _ = model.model.rotary_emb(model.model.embed_tokens(ids), torch.arange(40)[None])
    sizes = []
    for index in range(2, 8):
        positions, cos = seen[index]
        assert bool((positions[:, 1:] > positions[:, :-1]).all())  # order preserved
        torch.testing.assert_close(cos, full_cos[0, positions[0]][None])
        sizes.append(positions.shape[1])
    assert sizes == [28, 28, 20, 20, 14, 14]  # ⌈0.7^s·40⌉
    assert seen[7][0][0].tolist() == ctx.logit_positions[0].nonzero().flatten().tolist()
    assert ctx.logit_positions[0, :4].all() and ctx.logit_positions[0, -4:].all()  # sinks, last 10%


def test_planted_score_is_kept(model):
    method = make_sdtp(model, keep_ratio=0.7)
    ids = prompt()
    hot = 30  # a middle token: early tokens win otherwise, so it survives only through its score
    with method.apply(model), torch.no_grad(), scoring(torch.zeros_like(ids, dtype=torch.bool)) as ctx:
        for index in STAGES:
            wrapper = model.model.layers[index]
            wrapper.predictor = PlantedPredictor(method._runtime, hot, wrapper.predictor)
        model(ids, use_cache=False)
    survivors = ctx.logit_positions[0].nonzero().flatten().tolist()
    assert hot in survivors
    # final budget ⌈0.7³·40⌉ = 14: sinks 0..3 and the last 4 protected, the hot one, the 5 earliest others
    assert survivors == [0, 1, 2, 3, 4, 5, 6, 7, 8, hot, 36, 37, 38, 39]


def test_scored_positions_never_dropped(model):
    method = make_sdtp(model, keep_ratio=0.5)
    ids = prompt(seq_len=60, batch=2)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[0, [10, 11, 30]] = True
    scored[1, [20, 45]] = True
    _, real = kept_positions(model, method, ids, scored)
    assert bool(real[scored].all())
    # per-row budgets: ⌈0.5³·60⌉ = 8 < the protected 4 + 6 + scored, so each row keeps its own protected set
    assert real.sum(1).tolist() == [13, 12]


def test_executed_flops_equal_analytic_schedule(model):
    method = make_sdtp(model)
    ids = prompt(seq_len=50)
    with method.apply(model):
        report = count_flops(model, ids)
        stats = method.stats()
    coeff = LayerFlopCoefficients.from_config(model.config)
    n0 = 50
    budgets = [n0] + [math.ceil(0.7 ** s * n0) for s in (1, 2, 3)]
    per_layer = [budgets[sum(1 for s in STAGES if s <= layer)] for layer in range(8)]
    assert [round(k * n0) for k in stats["per_layer_computed_fraction"]] == per_layer
    width = model.config.hidden_size // 4
    predictor = sum(budgets[s] for s in range(3)) * (2 * model.config.hidden_size * width + 2 * width * 2)
    expected = sum(coeff.layer(n) for n in per_layer) + predictor
    assert report.decoder == expected
    assert stats["compute_sparsity"] == pytest.approx(1 - expected / (8 * coeff.layer(n0)))
    assert report.decoder < 0.75 * count_flops(model, ids).decoder  # dense


def test_ranking_loss_prefers_the_saliency_order():
    saliency = torch.tensor([[0.1, 0.9, 0.4, 0.7, 0.2]])
    centred = saliency - saliency.mean()
    losses = [float(ranking_loss(centred * margin, saliency)) for margin in (0.5, 1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.05
    assert float(ranking_loss(-centred, saliency)) > float(ranking_loss(centred, saliency))
    assert float(ranking_loss(torch.zeros(1, 5), saliency)) == pytest.approx(math.log(2))
    valid = torch.tensor([[True, True, False, True, True]])  # pairs with an absent token do not count
    wrong_absent = centred.clone()
    wrong_absent[0, 2] = -100.0
    assert float(ranking_loss(wrong_absent, saliency, valid)) == pytest.approx(
        float(ranking_loss(centred, saliency, valid)))


def test_keep_ratio_one_is_the_dense_model(model):
    method = make_sdtp(model, keep_ratio=1.0)
    ids = prompt(seq_len=33, batch=2)
    with torch.no_grad():
        dense = model(ids, use_cache=False).logits
    logits, real = kept_positions(model, method, ids)
    assert bool(real.all())
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, dense)  # restored on exit


def test_generate_with_cache_equals_uncached_pruned_forward(arch_model8):
    model = arch_model8
    method = make_sdtp(model)
    ids = prompt(seq_len=40, seed=3)
    steps = 8
    with method.apply(model), torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                             pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
        sequence = ids
        for step in range(steps):
            with prompt_length(40):  # generated tokens: protected, outside the budget
                logits = model(sequence, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, rtol=1e-4, atol=1e-4)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], 1)
        assert out.sequences.tolist() == sequence.tolist()
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        assert [cache.get_seq_length(i) for i in range(8)] == [40, 40, 28, 28, 20, 20, 14, 14]
        chunk = prompt(seq_len=3, seed=4)  # a multi-token continuation: per-layer masks from cache lengths
        cached = model(chunk, past_key_values=cache, use_cache=True).logits
        with prompt_length(40):
            reference = model(torch.cat([ids, chunk], 1), use_cache=False).logits[:, 40:]
        torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-4)
        assert method.stats()["decode_forwards"] == steps - 1 + 1


def test_inference_equals_masked_training_simulation(arch_model8):
    model = arch_model8
    """The gathered forward and the masked simulation (no noise) make the same decisions and logits."""
    method = make_sdtp(model, keep_ratio=0.6)
    ids = prompt(seq_len=48, seed=5)
    logits, real = kept_positions(model, method, ids)
    predictors = method.load_predictors(model.config)
    plan = PruningPlan(tuple(STAGES), 0.6, 4, 0.1)
    original = model.config._attn_implementation
    model.set_attn_implementation(MASKED_ATTENTION)
    try:
        with torch.no_grad():
            sim = simulated_forward(model, predictors, ids, plan)
            simulated = model.lm_head(model.model.norm(sim.hidden))
    finally:
        model.set_attn_implementation(original)
    assert sim.survivors.tolist() == real.tolist()
    torch.testing.assert_close(logits[real], simulated[real], rtol=1e-4, atol=1e-4)


def test_saliency_is_gradient_times_input_of_the_model_forward(arch_model8):
    model = arch_model8
    ids = prompt(seq_len=24, seed=6)
    saliency = token_saliency(model, ids, STAGES)
    captured = {}

    def capture(index):
        def hook(module, args, kwargs):
            args[0].retain_grad()
            captured[index] = args[0]
        return hook

    handles = [model.model.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in STAGES]
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum().backward()
    for handle in handles:
        handle.remove()
    for stage, index in enumerate(STAGES):
        h = captured[index]
        raw = (h.grad * h).sum(-1).abs()
        torch.testing.assert_close(saliency[stage], raw / raw.amax(-1, keepdim=True), rtol=1e-4, atol=1e-5)
        assert float(saliency[stage].max()) == pytest.approx(1.0)


def test_calibrate_trains_reproducibly(model):
    calibration = CalibrationSet.from_tensor(prompt(seq_len=48, batch=4, seed=7), "tiny")
    artifacts = []
    for _ in range(2):
        method = SDTP(sparsity=0.3, first_stage_layer=2, stage_interval=2, train_seq_len=32, epochs=2,
                      progress=False)
        artifacts.append(method.calibrate(model, None, calibration))
    first, second = artifacts
    assert first["stage_layers"] == STAGES and first["training_steps"] == 8 and first["training_seq_len"] == 32
    assert 0 < first["keep_ratio"] < 1 and math.isfinite(first["final_loss"])
    assert model.config._attn_implementation == "sdpa"  # restored after training
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 12  # 3 stages × fc1/fc2 weight and bias
    initial = method.predictors_to_artifact(model.config, method.new_predictors(model.config))
    assert not torch.equal(first["predictor.2.fc1.weight"], initial["predictor.2.fc1.weight"])  # it trained
    for key in tensors:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    method.load_artifact(first)
    _, real = kept_positions(model, method, prompt(seq_len=48))
    assert 0 < int(real.sum()) < 48


def test_pairwise_agreement_is_one_zero_and_a_half_on_known_orders():
    saliency = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert pairwise_agreement(saliency * 2, saliency, valid) == (1.0, 6)
    assert pairwise_agreement(-saliency, saliency, valid) == (0.0, 6)
    assert pairwise_agreement(torch.zeros(1, 4), saliency, valid) == (0.5, 6)
    only_two = torch.tensor([[True, True, False, False]])
    assert pairwise_agreement(torch.tensor([[1.0, 0.0, 5.0, 5.0]]), saliency, only_two) == (0.0, 1)


def test_calibration_records_the_heldout_ranking_accuracy(model):
    """Rows past train_sequences are held out: the artifact says how well each stage's predictor orders their
    tokens against the gradient saliency; with every row trained on there is nothing to say."""
    calibration = CalibrationSet.from_tensor(prompt(seq_len=48, batch=6, seed=7), "tiny")
    method = SDTP(sparsity=0.3, first_stage_layer=2, stage_interval=2, train_sequences=4, train_seq_len=32,
                  progress=False)
    artifact = method.calibrate(model, None, calibration)
    assert artifact["heldout_rows"] == 2 and len(artifact["heldout_rank_accuracy"]) == len(STAGES)
    assert all(0.0 <= a <= 1.0 for a in artifact["heldout_rank_accuracy"])
    every_row = SDTP(sparsity=0.3, first_stage_layer=2, stage_interval=2, train_sequences=6, train_seq_len=32,
                     progress=False).calibrate(model, None, calibration)
    assert "heldout_rank_accuracy" not in every_row


def test_batch_rows_match_single_rows(model):
    method = make_sdtp(model)
    ids = prompt(seq_len=40, batch=2, seed=8)
    logits, real = kept_positions(model, method, ids)
    for row in range(2):
        single, single_real = kept_positions(model, method, ids[row: row + 1])
        assert single_real[0].tolist() == real[row].tolist()
        torch.testing.assert_close(single[0][single_real[0]], logits[row][real[row]], rtol=1e-4, atol=1e-4)


def test_left_padded_batches_and_bad_fields_raise(model):
    method = make_sdtp(model)
    ids = prompt(seq_len=20, batch=2)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :5] = 0
    with method.apply(model), pytest.raises(MethodConfigError, match="right-padded"):
        model(ids, attention_mask=attention_mask, use_cache=False)
    with pytest.raises(MethodConfigError, match="preset"):
        SDTP(preset="gpu")
    with pytest.raises(MethodConfigError, match="first_stage_layer"):
        SDTP(first_stage_layer=0)
    with pytest.raises(MethodConfigError, match="keep_ratio"):
        SDTP(keep_ratio=1.5)
    paper = SDTP(preset="paper", epochs=3)
    assert (paper.epochs, paper.learning_rate, paper.train_seq_len) == (3, 1e-4, 512)
    assert make_method("sdtp").preset == "cpu"
    other = SDTP(first_stage_layer=3, stage_interval=3)
    other.load_artifact(method.artifact)
    with pytest.raises(MethodConfigError, match="recalibrate"), other.apply(model):
        pass


def test_eager_attention_gets_explicit_masks(model):
    """Without SDPA's is_causal, the wrappers build the causal mask of the kept rows (and the decoding mask)."""
    eager = tiny_llama(num_layers=8, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    method = make_sdtp(model)
    ids = prompt(seq_len=40, seed=9)
    logits, real = kept_positions(model, method, ids)
    eager_logits, eager_real = kept_positions(eager, method, ids)
    assert eager_real.tolist() == real.tolist()
    torch.testing.assert_close(eager_logits[real], logits[real], rtol=1e-4, atol=1e-4)
    with method.apply(eager), torch.no_grad():
        out = eager.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        with prompt_length(40):
            reference = eager(out[:, :-1], use_cache=False).logits[:, 39:].argmax(-1)
    assert out[0, 40:].tolist() == reference[0].tolist()
