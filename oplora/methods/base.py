"""The method registry, the settings every method takes, and the checks done before any compute."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from oplora.registry import Registry

if TYPE_CHECKING:  # passed in, never imported: the SVD step (oplora.svd) asks the methods what they need
    from oplora.svd import SVDCache

PAPER_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj", "o_proj")
ADAPTER = "default"  # PEFT's adapter name
PEFT_PREFIX = "base_model.model."  # what PEFT puts before the wrapped model's module names
# A method config's keys that are not its options: which method, the config's own name (run directories, W&B, and
# pipeline.compare_to), how tables and figures show it, where it lives outside oplora.methods, whether it trains
IDENTITY = ("name", "label", "display", "color", "module", "trained")
PRESENTATION = ("display", "color")  # of those, how it is shown only: never part of what a cell computes
OWN_DROPOUT = "lora_dropout"  # a method config may set its own dropout instead of the train group's (PiSSA's code: 0)


@dataclass(frozen=True)
class AdapterSettings:
    """What every method takes (rank, alpha, dropout, targets), plus the method's own `options`."""

    method: str
    r: int = 32
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PAPER_TARGETS
    options: Mapping[str, Any] = field(default_factory=dict)  # checked against the method's `Options`

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class Download:
    """Something a method reads from the hub, fetched before any step runs (oplora.fetch)."""

    what: str  # e.g. "LoRA-Null calibration corpus"
    hub_id: str
    load: Callable[[], object]  # reads it as the method does (and downloads it, when online)


@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


class Method:
    """One adaptation method: a subclass sets `name`, and overrides what differs from plain LoRA.

    Its whole life is here: its own settings (`Options`, a dataclass filled from the method config),
    the checks before any compute, what it needs from the SVD cache, the initialisation of A, B (and
    of the base weight), and how its trained adapter is exported as plain PEFT LoRA.
    """

    name: str = ""
    mutates_base: bool = False  # True when the frozen base weight becomes W_res = W - s·B A
    Options: type = NoOptions
    # top-level config blocks its config reads by interpolation (`calibration: ${calibration}`): they reach a cell's
    # hash through its method config only, so changing one retrains only the cells of methods that read it
    shared_config: tuple[str, ...] = ()

    def options(self, settings: AdapterSettings):
        """The method's own settings, typed; unknown keys are refused with the valid ones."""
        valid = [f.name for f in fields(self.Options)]
        unknown = sorted(set(settings.options) - set(valid))
        if unknown:
            raise ValueError(f"method {self.name!r} has no setting(s) {unknown}; "
                             f"its settings are: {', '.join(valid) or 'none'}")
        return self.Options(**settings.options)

    def summary(self, settings: AdapterSettings) -> dict[str, Any]:
        """The fields its W&B runs carry (oplora.tracking): each option with a plain value, as `method_<option>`."""
        options = self.options(settings)
        return {f"method_{f.name}": value for f in fields(options)
                if isinstance(value := getattr(options, f.name), (bool, int, float, str, type(None)))}

    def downloads(self, settings: AdapterSettings) -> list[Download]:
        """What it reads from the hub besides the model and the data (fetched by the fetch step)."""
        return []

    def check(self, settings: AdapterSettings, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse impossible settings before any compute. `shapes` maps module name to (m, n)."""

    def svd_needs(self, settings: AdapterSettings, shape: tuple[int, int]) -> tuple[int, int]:
        """(top, bottom): how many of an m×n weight's largest and smallest singular triples it reads."""
        return 0, 0

    def initialize(self, model: PeftModel, settings: AdapterSettings, svd: SVDCache, tokenizer=None) -> None:
        """Set A, B (and the base weight, for base-mutating methods) of a freshly wrapped model."""

    def export(self, model: PeftModel, directory: Path, initial: Path | None) -> None:
        """Save the trained adapter into `directory` as plain PEFT LoRA on the ORIGINAL base.

        Default: PEFT's adapter as is, or, for a base-mutating method, PEFT's conversion against the
        initial adapter (ΔW = s(B A − B₀A₀) at rank 2r).
        """
        if self.mutates_base:
            if initial is None:
                raise ValueError(f"{self.name} changes the base weight: exporting it needs the initial adapter")
            model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(Path(initial).resolve()))
        else:
            model.save_pretrained(directory)


METHODS = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name` (which must be new and non-empty)."""
    return METHODS.register(cls)


def methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> Method:
    return METHODS.get(name)()


def method_of(method_cfg: DictConfig) -> Method:
    """The method a method config names; a method outside oplora.methods registers itself when its `module` is
    imported."""
    if method_cfg.get("module"):
        importlib.import_module(method_cfg.module)
    return get_method(method_cfg.name)


def shared_config() -> list[str]:
    """Every top-level config block a registered method's config reads (`Method.shared_config`)."""
    return sorted({block for cls in METHODS.classes.values() for block in cls.shared_config})


def adapter_settings(cfg: DictConfig) -> AdapterSettings:
    """The adapter a cell trains: the train group's rank, alpha, dropout (or the method config's own `lora_dropout`)
    and the method config's own options."""
    method = method_of(cfg.method)
    options = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items()
               if k not in (*IDENTITY, OWN_DROPOUT)}
    settings = AdapterSettings(method=method.name, r=cfg.train.lora_r, alpha=cfg.train.lora_alpha,
                               dropout=cfg.method.get(OWN_DROPOUT, cfg.train.lora_dropout),
                               target_modules=tuple(cfg.model.target_modules), options=options)
    method.options(settings)  # unknown settings fail here, before anything loads
    return settings


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
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name.removeprefix(PEFT_PREFIX), module


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


def build(model: torch.nn.Module, settings: AdapterSettings, svd: SVDCache, tokenizer=None) -> PeftModel:
    """Wrap `model` with the method's PEFT LoRA adapter, initialised and ready to train."""
    method = get_method(settings.method)
    method.options(settings)
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
    method.initialize(peft_model, settings, svd, tokenizer)
    return peft_model

