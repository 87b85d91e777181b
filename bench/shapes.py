"""Decoder shapes of models without the network: the shipped studies' models (values of their config.json files),
else a local directory's config.json or the Hugging Face cache. `--dry-run`, the budgets (bench.budgets) and the
plan size methods from a shape before any model is loaded; nothing here imports torch."""

from __future__ import annotations

from types import SimpleNamespace

KNOWN_SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "gemma3-270m": {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256},
    "meta-llama/Llama-2-7b-hf": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "Qwen/Qwen1.5-7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32},
}


def model_shape(model: str):
    """The decoder shape of `model` without the network: the table above, a local directory's config.json, or the
    Hugging Face cache; None when none of them has it."""
    if model in KNOWN_SHAPES:
        return SimpleNamespace(**KNOWN_SHAPES[model])
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None
