"""Input-activation covariances of target layers on a calibration corpus (LoRA-Null).

The corpus is a local text source: a .txt file whose documents are separated by blank lines, or a
.json/.jsonl file of records with a text field. Documents are joined by blank lines, tokenized
once, and `n_samples` windows of `seq_len` tokens are drawn with a seeded generator. For every
distinct input of the target layers (q/k/v_proj of a layer read the same tensor, as do up/gate_proj:
found by tensor identity in forward pre-hooks), each window's activations X are scaled by |max(X)|
and C += XᵀX in float32 on the model's device; layers that share an input share one C.

`null_spaces` turns the covariances into the eigenvectors of the r smallest eigenvalues (float64,
one `eigh` per distinct input, with progress) and caches them under `root/calibration/`, keyed by
the model's weights, the corpus's sha256 and the settings, so a resume or another training seed
reuses them without running the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import xxhash
from filelock import FileLock
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from oplora.io import atomic_file, file_sha256
from oplora.record import content_hash
from oplora.resources import resolve

log = logging.getLogger(__name__)


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
    """C = Σ_windows (X/|max X|)ᵀ(X/|max X|) of every layer's input, float32, on the model's device.

    Layers whose forward receives the very same input tensor share one C (the same tensor object in the result).
    """
    covs: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}  # layer → the layer whose covariance it shares
    inputs: dict[int, tuple[torch.Tensor, str]] = {}  # this window's inputs seen so far (kept alive: ids stay unique)

    def hook(name):
        def accumulate(module, args):
            first = inputs.get(id(args[0]))
            if first is not None:
                shared[name] = first[1]
                return
            inputs[id(args[0])] = (args[0], name)
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
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, c in covs.items():
        if not torch.isfinite(c).all():
            raise FloatingPointError(f"calibration covariance of {name} is not finite")
    return {**covs, **{name: covs[first] for name, first in shared.items()}}


def weights_identity(model: torch.nn.Module) -> str:
    """xxh3-128 over the names and bytes of every parameter and buffer except LoRA's (the frozen model)."""
    digest = xxhash.xxh3_128()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if "lora_" not in name:
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()


def null_spaces(model: torch.nn.Module, layers: dict[str, torch.nn.Module], tokenizer,
                settings: CalibrationSettings, r: int, root: Path) -> dict[str, torch.Tensor]:
    """Each layer's U_null: eigenvectors (float64, n×r) of the r smallest eigenvalues of its input covariance C.

    Cached in `root/calibration/<key>.safetensors`, key = (weights, corpus sha256, field, n_samples, seq_len,
    seed, r, layer names); a cached entry is read without running the model.
    """
    corpus = source_digest(settings.source)
    key = content_hash({"weights": weights_identity(model), "corpus_sha256": corpus, "r": r, "layers": sorted(layers),
                        **{k: v for k, v in asdict(settings).items() if k != "source"}})
    path = root / "calibration" / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # ranks of one job, or concurrent cells, compute it once
        if path.exists():
            log.info("LoRA-Null null spaces read from %s", path)
            return load_file(path)
        docs = read_documents(settings.source, settings.field)
        batches = windows(tokenizer, docs, settings.n_samples, settings.seq_len, settings.seed)
        log.info("LoRA-Null calibration: %d windows of %d tokens from %s (sha256 %s)",
                 len(batches), batches.shape[1], settings.source, corpus)
        covs = covariances(model, layers, batches)
        distinct = {id(c): c for c in covs.values()}
        nulls = {i: torch.linalg.eigh(c.double()).eigenvectors[:, :r].cpu()  # ascending eigenvalues
                 for i, c in tqdm(distinct.items(), desc="eigendecompositions", unit="input")}
        result = {name: nulls[id(c)].clone().contiguous() for name, c in covs.items()}
        with atomic_file(path) as tmp:
            save_file(result, tmp, metadata={"key": key, "corpus_sha256": corpus})
    return result
