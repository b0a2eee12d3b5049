"""Input-activation covariances of target layers on a calibration corpus (LoRA-Null).

The corpus is a local text source: a .txt file whose documents are separated by blank lines, or a
.json/.jsonl file of records with a text field. Documents are joined by blank lines, tokenized
once, and `n_samples` windows of `seq_len` tokens are drawn with a seeded generator. For every
target layer, each window's input activations X are scaled by |max(X)| and C += XᵀX in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from oplora.io import file_sha256
from oplora.resources import resolve


@dataclass(frozen=True)
class CalibrationSettings:
    """Text that stands for "pre-trained knowledge" (LoRA-Null). Official run: NQ-open, 256×2048, seed 233."""

    source: str | None = None  # .txt (documents separated by blank lines) or .json/.jsonl
    field: str = "text"  # record field holding the text, for json/jsonl sources
    n_samples: int = 256
    seq_len: int = 2048
    seed: int = 233


def read_documents(source: str | Path, field: str = "text") -> list[str]:
    path = Path(resolve(str(source)))
    if not path.is_file():
        raise FileNotFoundError(f"calibration source {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl"):
        try:
            lines = [line for line in text.splitlines() if line.strip()]
            records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in lines]
            docs = [str(r[field]) for r in records]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"calibration source {path}: cannot read field {field!r} from every record "
                             f"({err})") from err
    else:
        docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"calibration source {path} holds no text")
    return docs


def source_digest(source: str | Path) -> str:
    return file_sha256(resolve(str(source)))


def windows(tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(docs), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if len(ids) <= seq_len:
        return ids[None, :]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def covariances(model: torch.nn.Module, layers: dict[str, torch.nn.Module],
                batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """C = Σ_windows (X/|max X|)ᵀ(X/|max X|) of every layer's input, float32, on the layer's device."""
    covs: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().float()
            for sample in x.reshape(x.shape[0], -1, x.shape[-1]):
                sample = sample / sample.max().abs().clamp_min(torch.finfo(torch.float32).tiny)
                c = covs.get(name)
                covs[name] = sample.T @ sample if c is None else c.addmm_(sample.T, sample)

        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for window in tqdm(batches, desc="calibration", unit="window"):
            model(input_ids=window[None].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, c in covs.items():
        if not torch.isfinite(c).all():
            raise FloatingPointError(f"calibration covariance of {name} is not finite")
    return covs
