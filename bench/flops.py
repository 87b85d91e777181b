"""Executed FLOPs of the decoder blocks, measured with FlopCounterMode, and the analytic formula it is
checked against (methods.md §5). Compute sparsity c = 1 - F_exec / F_dense on the same input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from methods.flop_coefficients import LayerFlopCoefficients, analytic_decoder_flops  # noqa: F401 (re-exported)

_REGISTERED = False


def register_cpu_sdpa_flops() -> None:
    """torch's counter knows the CUDA SDPA kernels but not the CPU flash kernel; count it the same way."""
    global _REGISTERED
    if _REGISTERED:
        return
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    from torch.utils.flop_counter import flop_registry

    if op not in flop_registry and op.default not in flop_registry:
        @register_flop_formula(op, get_raw=False)
        def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    _REGISTERED = True


@dataclass(frozen=True)
class FlopReport:
    total: int  # everything executed in the forward
    lm_head: int  # excluded from the decoder count
    decoder: int  # total - lm_head: decoder blocks, plus any router/predictor a method runs


def _split(counter: FlopCounterMode) -> tuple[int, int]:
    """(total, LM head) FLOPs of what the counter saw; the head is found by module name."""
    per_module = counter.get_flop_counts()
    total = int(sum(per_module.get("Global", {}).values()))
    lm_head = sum(int(sum(ops.values())) for name, ops in per_module.items() if name.endswith(".lm_head"))
    return total, lm_head


def counted_forward(model, **call):
    """(the model's output, executed decoder FLOPs) of one forward under FlopCounterMode."""
    register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        out = model(**call)
    total, lm_head = _split(counter)
    return out, total - lm_head


def padded_lengths(call: dict) -> list[int] | None:
    """Each row's length when a forward's rows are right-padded (a 2-D attention mask with zeros), else None."""
    mask = call.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    return [int(n) for n in mask.sum(-1).tolist()]


class RowFlops:
    """Executed and dense decoder FLOPs of each forward, every row counted as it costs alone.

    Unpadded forwards, and methods without their own account (`method_flops` None or returning None):
    FlopCounterMode on the forward, against the dense model's count on the same [batch, width]. Right-padded rows
    of a sequence-dependent method: its own per-row account (`Method.executed_flops`, which tests check equals
    FlopCounterMode on unpadded rows), against the dense model's on each row's own length, so a batch's padding
    counts on neither side."""

    def __init__(self, dense_flops: Callable[[int, int], int],
                 method_flops: Callable[[], int | None] | None = None) -> None:
        self.dense_flops = dense_flops
        self.method_flops = method_flops

    def forward(self, model, **call) -> tuple[object, int, int]:
        """(the model's output, executed, dense) of one forward."""
        lengths = padded_lengths(call)
        batch, width = (int(n) for n in call["input_ids"].shape)
        dense = self.dense_flops(batch, width) if lengths is None else sum(self.dense_flops(1, n) for n in lengths)
        before = None if self.method_flops is None else self.method_flops()
        if before is None or lengths is None:
            out, executed = counted_forward(model, **call)
            return out, executed, dense
        out = model(**call)
        return out, self.method_flops() - before, dense


def count_flops(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> FlopReport:
    """Runs one forward under FlopCounterMode and splits off the LM head (embeddings cost no FLOPs)."""
    register_cpu_sdpa_flops()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    total, lm_head = _split(counter)
    return FlopReport(total=total, lm_head=lm_head, decoder=total - lm_head)


# --- analytic formula: methods.flop_coefficients (methods use it to plan their budgets) -------------------
def ptflops_decoder_flops(model, input_ids: torch.Tensor) -> int:
    """Independent cross-check with ptflops' aten backend (MACs × 2), LM head subtracted analytically.

    ptflops knows mm/bmm/addmm but no attention kernel, so the CPU/CUDA SDPA ops are given to it as custom
    MAC formulas (two batched matmuls each)."""
    from ptflops import get_model_complexity_info

    def sdpa_macs(inputs, outputs) -> int:
        return sdpa_flop_count(inputs[0].shape, inputs[1].shape, inputs[2].shape) // 2

    aten = torch.ops.aten
    hooks = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_macs,
             aten._scaled_dot_product_flash_attention: sdpa_macs,
             aten._scaled_dot_product_efficient_attention: sdpa_macs,
             aten._scaled_dot_product_cudnn_attention: sdpa_macs}
    # ptflops' dispatch mode sees nothing under inference_mode; no_grad is enough.
    with torch.no_grad():
        macs, _params = get_model_complexity_info(
            model, (input_ids.shape[1],), input_constructor=lambda _res: {"input_ids": input_ids, "use_cache": False},
            as_strings=False, print_per_layer_stat=False, backend="aten", custom_modules_hooks=hooks)
    if macs is None:
        raise RuntimeError("ptflops failed to count this model")
    n = input_ids.numel()
    lm_head_flops = 2 * n * model.config.hidden_size * model.config.vocab_size
    return int(2 * macs) - lm_head_flops


def compute_sparsity(pruned: FlopReport, dense: FlopReport) -> float:
    return 1.0 - pruned.decoder / dense.decoder
