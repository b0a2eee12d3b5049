"""The method registry, the settings every method takes, and the checks done before any compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from oplora.svd import SVDCache

PAPER_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj", "o_proj")
ADAPTER = "default"


@dataclass(frozen=True)
class CalibrationSettings:
    """Text that stands for "pre-trained knowledge" (LoRA-Null). Official run: NQ-open, 256×2048, seed 233."""

    source: str | None = None  # .txt (documents separated by blank lines) or .json/.jsonl
    field: str = "text"  # record field holding the text, for json/jsonl sources
    n_samples: int = 256
    seq_len: int = 2048
    seed: int = 233


@dataclass(frozen=True)
class AdapterSettings:
    method: str
    r: int = 32
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PAPER_TARGETS
    k: int | None = None  # OPLoRA: number of preserved singular triples
    null_version: str = "v1"  # LoRA-Null: v1 trains A and B, v2 freezes A
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class Method:
    """One adaptation method. Subclasses set `name` and override `check` / `initialize`."""

    name: str = ""
    mutates_base: bool = False  # True when the frozen base weight becomes W_res = W - s·B A

    def check(self, settings: AdapterSettings, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse impossible settings before any compute. `shapes` maps module name to (m, n)."""

    def initialize(self, model: PeftModel, settings: AdapterSettings, svd: SVDCache, tokenizer=None) -> None:
        """Set A, B (and the base weight, for base-mutating methods) of a freshly wrapped model."""


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls()
    return cls


def methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(methods())}")
    return _REGISTRY[name]


def target_shapes(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer whose last name component is a target; every target must exist."""
    shapes, linear_kinds = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kind = name.rsplit(".", 1)[-1]
            linear_kinds.add(kind)
            if kind in targets:
                shapes[name] = tuple(module.weight.shape)
    missing = [t for t in targets if t not in {n.rsplit(".", 1)[-1] for n in shapes}]
    if missing:
        raise ValueError(
            f"target module(s) {missing} not found in {type(model).__name__}; "
            f"its linear layers are: {', '.join(sorted(linear_kinds))}"
        )
    return shapes


def check_rank(settings: AdapterSettings, shapes: dict[str, tuple[int, int]]) -> None:
    if settings.r < 1:
        raise ValueError(f"rank r must be positive, got {settings.r}")
    for name, (m, n) in shapes.items():
        if settings.r > min(m, n):
            raise ValueError(f"rank r={settings.r} exceeds min(m, n)={min(m, n)} of {name} ({m}×{n})")


def lora_layers(model: PeftModel) -> Iterator[tuple[str, LoraLayer]]:
    """(module name in the base model, LoRA layer) for every adapted linear layer."""
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name.removeprefix(prefix), module


def absorb_svd_part(layer: LoraLayer, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """PiSSA-style init from a rank-r part U diag(S) Vᵀ of W: s·B A equals that part, base becomes W - s·B A."""
    scaling = layer.scaling[ADAPTER]
    root = torch.sqrt(S.double() / scaling)
    A = (root[:, None] * V.double().T).float()
    B = (U.double() * root[None, :]).float()
    weight = layer.base_layer.weight
    lora_A, lora_B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    with torch.no_grad():
        lora_A.copy_(A.to(lora_A.dtype))
        lora_B.copy_(B.to(lora_B.dtype))
        # subtract exactly what the adapter will add back, in the adapter's precision
        part = scaling * (lora_B.double() @ lora_A.double())
        weight.copy_((weight.double() - part.to(weight.device)).to(weight.dtype))


def build(
    model: torch.nn.Module,
    settings: AdapterSettings,
    svd: SVDCache | None = None,
    tokenizer=None,
) -> PeftModel:
    """Wrap `model` with the method's PEFT LoRA adapter, initialised and ready to train."""
    method = get_method(settings.method)
    shapes = target_shapes(model, tuple(settings.target_modules))
    check_rank(settings, shapes)
    method.check(settings, shapes)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        init_lora_weights=True,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    method.initialize(peft_model, settings, svd or SVDCache.default(), tokenizer)
    return peft_model

