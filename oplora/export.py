"""Save any method's result as a plain PEFT LoRA adapter on the ORIGINAL base, and merge it.

Each method says how (`Method.export`): LoRA saves PEFT's adapter as is; OPLoRA saves the projected
factors B' = P_L B, A' = A P_R in float32; PiSSA / MiLoRA / LoRA-Null use PEFT's conversion against the
initial adapter (saved by `save_initial` before training), ΔW = s(B A − B₀A₀) at rank 2r.

Directories are written next to their target and renamed into place (`oplora.io.atomic_dir`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from oplora.io import atomic_dir
from oplora.methods import get_method


def save_initial(model: PeftModel, directory: str | Path) -> Path:
    """Snapshot the adapter at init; base-mutating methods need it to export on the original base."""
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
    return Path(directory)


def export_adapter(model: PeftModel, method: str, directory: str | Path, initial: str | Path | None = None) -> Path:
    """Write `model`'s adapter, trained with `method`, as a plain PEFT LoRA adapter on the original base."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        get_method(method).export(model, tmp, Path(initial) if initial else None)
        bad = [k for k, t in load_file(tmp / "adapter_model.safetensors").items() if not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(f"refusing to export a broken adapter to {directory}: {len(bad)} tensors hold "
                                     f"NaN/inf values (e.g. {bad[0]})")
    return directory


def merge(base: str | Path, adapter: str | Path, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Base + exported adapter merged in float32 and saved as a full model directory (for generation)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(dtype)
    with atomic_dir(directory) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return Path(directory)
