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

from oplora.device import resolve_device
from oplora.io import atomic_dir
from oplora.methods import get_method
from oplora.rundir import ADAPTER_WEIGHTS


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
        bad = [k for k, t in load_file(tmp / ADAPTER_WEIGHTS).items() if not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(f"refusing to export a broken adapter to {directory}: {len(bad)} tensors hold "
                                     f"NaN/inf values (e.g. {bad[0]})")
    return directory


def merge(base: str | Path, adapter: str | Path, directory: str | Path, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "auto") -> Path:
    """Base + exported adapter merged and saved as a full model directory in `dtype` (for generation).

    On a GPU ("auto": when there is one) the base is loaded straight onto it in `dtype` and W + ΔW is rounded
    once (bf16 at 7B: 13.5 GB of GPU memory, no host copy of the model); on the CPU it merges in float32 and
    casts at the end.
    """
    device = resolve_device(device)
    load_dtype = dtype if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=load_dtype, device_map={"": str(device)})
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().to(dtype)
    with atomic_dir(directory) as tmp:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return Path(directory)
