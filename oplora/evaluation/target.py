"""What an evaluation stage evaluates: a base model plus, optionally, an exported PEFT adapter."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oplora.device import release_gpu_memory
from oplora.export import merge
from oplora.io import atomic_write_text, file_sha256
from oplora.rundir import ADAPTER_WEIGHTS


@dataclass(frozen=True)
class Target:
    base: str                   # model directory or hub id
    adapter: str | None = None  # plain PEFT adapter on `base` (None: the base model itself)
    dtype: str = "float32"
    trust_remote_code: bool = False

    def identity(self) -> dict:
        """Base, adapter and the adapter's content hash: what a result was computed from."""
        return {**asdict(self), "adapter_sha256": file_sha256(Path(self.adapter) / ADAPTER_WEIGHTS)
                if self.adapter else None}


def merged_dir(target: Target, directory: Path) -> str:
    """Base + adapter merged once into `directory` (rebuilt when the adapter or dtype changed)."""
    if target.adapter is None:
        return target.base
    marker = directory / "oplora_merge.json"
    identity = target.identity()
    if marker.exists() and json.loads(marker.read_text()) == identity:
        return str(directory)
    shutil.rmtree(directory, ignore_errors=True)
    merge(target.base, target.adapter, directory, dtype=getattr(torch, target.dtype))
    release_gpu_memory()  # the merge held the model on the GPU (13.5 GB at 7B); vLLM sizes itself from what is free
    atomic_write_text(marker, json.dumps(identity, indent=2))
    return str(directory)
