"""Save any method's result as a plain PEFT LoRA adapter on the ORIGINAL base, and merge it.

- LoRA: PEFT's own adapter.
- OPLoRA: rank r with the projected factors B' = P_L B, A' = A P_R in float32; no project code is
  needed to load it.
- PiSSA / MiLoRA / LoRA-Null: PEFT's conversion against the initial adapter (saved by
  `save_initial` before training), ΔW = s(B A − B₀A₀) at rank 2r.

Directories are written next to their target and renamed into place (`oplora.io.atomic_dir`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from oplora.io import atomic_dir
from oplora.methods.base import ADAPTER, lora_layers
from oplora.methods.oplora import is_projected, projected_factors


def save_initial(model: PeftModel, directory: str | Path) -> Path:
    """Snapshot the adapter at init; base-mutating methods need it to export on the original base."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
    return Path(directory)


def _projected_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in lora_layers(model):
        A, B = projected_factors(layer)
        state[f"base_model.model.{name}.lora_A.{ADAPTER}.weight"] = A.cpu()
        state[f"base_model.model.{name}.lora_B.{ADAPTER}.weight"] = B.cpu()
    return state


def export_adapter(model: PeftModel, directory: str | Path, initial: str | Path | None = None) -> Path:
    """Write `model`'s adapter as a plain PEFT LoRA adapter that applies to the original base."""
    directory = Path(directory)
    projected = any(is_projected(layer) for _, layer in lora_layers(model))
    with atomic_dir(directory) as tmp:
        if projected:
            model.save_pretrained(tmp, state_dict=_projected_state_dict(model))
        elif initial is not None:
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(Path(initial).resolve()))
        else:
            model.save_pretrained(tmp)
    return directory


def merge(base: str | Path, adapter: str | Path, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Base + exported adapter merged in float32 and saved as a full model directory (for generation)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(dtype)
    with atomic_dir(directory) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return Path(directory)
