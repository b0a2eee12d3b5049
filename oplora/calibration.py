"""Input-activation covariances of target layers on a calibration corpus (LoRA-Null).

The corpus is built as LoRA-Null's official code builds its NQ-open corpus: the documents (by default the
`question` field of the NQ-open training set from the hub, `google-research-datasets/nq_open`; or a local .txt
file whose documents are separated by blank lines, or a .json/.jsonl file of records with a text field) are
joined by blank lines; each of `n_samples` windows starts at a character offset drawn by `random.Random(seed)`,
the next `10 × seq_len` characters are tokenized as the tokenizer does by default (LLaMA-2's adds a BOS token,
Qwen2's does not: recorded) and the first `seq_len` tokens kept. For every distinct input of the target layers
(q/k/v_proj of a layer read the same tensor, as do up/gate_proj: found by tensor identity in forward pre-hooks),
each window's activations X are scaled by |max(X)| and C += XᵀX in float32 on the model's device; layers that
share an input share one C.

`null_spaces` turns the covariances into the eigenvectors of the r smallest eigenvalues (float64,
one `eigh` per distinct input, with progress) and caches them in the cache's `calibration/` (oplora.cache), keyed by
the model's weights, the corpus text's sha256 and the settings, so a resume or another training seed
reuses them without running the model; a JSON next to them records the corpus. Every read is verified (the xxh3-128
checksums stored with the tensors, one orthonormal n×r matrix per layer); a damaged file is named and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import xxhash
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from oplora.io import atomic_file, atomic_write_text, content_hash, tensor_checksums
from oplora.resources import is_hub_id, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings:
    """Text that stands for "pre-trained knowledge" (LoRA-Null). Official run: NQ-open questions, 256×2048, seed 233."""

    source: str | None = None  # a hub dataset id, or a local .txt (documents separated by blank lines) / .json/.jsonl
    name: str | None = None  # the hub dataset's config
    split: str = "train"  # the hub dataset's split
    field: str = "question"  # the record field holding the text (hub and json/jsonl sources)
    n_samples: int = 256
    seq_len: int = 2048
    seed: int = 233

    def __post_init__(self):
        for name in ("n_samples", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"calibration.{name}={value!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"calibration.seed={self.seed!r} must be an integer")


def read_documents(settings: CalibrationSettings) -> list[str]:
    """The corpus's documents: a local file's, or the `field` of a hub dataset (cached by `make fetch`)."""
    if is_hub_id(settings.source):
        from datasets import load_dataset

        try:
            records = load_dataset(settings.source, settings.name, split=settings.split)
        except Exception as err:  # offline and not cached, unknown id, …: each library has its own error types
            raise FileNotFoundError(f"calibration corpus {settings.source} ({settings.name}, {settings.split}) cannot "
                                    f"be loaded: {type(err).__name__}: {err}. Fetch it on a node with internet (make "
                                    "fetch experiment=…) or set calibration.source to a local file") from err
        if settings.field not in records.column_names:
            raise ValueError(f"calibration source {settings.source} has no field {settings.field!r}; its fields are "
                             f"{records.column_names} (set calibration.field)")
        docs = [str(d).strip() for d in records[settings.field]]
        return [d for d in docs if d] or _empty(settings.source)
    path = Path(resolve(settings.source))
    if not path.is_file():
        raise FileNotFoundError(f"calibration source {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".json", ".jsonl"):
        try:
            lines = [line for line in text.splitlines() if line.strip()]
            records = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in lines]
            docs = [str(r[settings.field]) for r in records]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"calibration source {path}: cannot read field {settings.field!r} from every record "
                             f"({err})") from err
    else:
        docs = text.split("\n\n")
    docs = [d.strip() for d in docs]
    return [d for d in docs if d] or _empty(path)


def _empty(source) -> list[str]:
    raise ValueError(f"calibration source {source} holds no text")


def corpus(settings: CalibrationSettings) -> str:
    """The documents joined by blank lines (the official construction)."""
    return "\n\n".join(read_documents(settings))


def windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """`n_samples` token windows of (at most) `seq_len`: each from a seeded character offset, tokenized with the
    tokenizer's default special tokens, as LoRA-Null's official `get_calib_data` does."""
    draw = random.Random(seed)
    result = []
    for _ in range(n_samples):
        start = draw.randint(0, max(len(text) - seq_len - 1, 0))
        ids = tokenizer(text[start:start + seq_len * 10], return_tensors="pt").input_ids[0]
        result.append(ids[:seq_len])
    return result


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
                settings: CalibrationSettings, r: int, directory: Path) -> dict[str, torch.Tensor]:
    """Each layer's U_null: eigenvectors (float64, n×r) of the r smallest eigenvalues of its input covariance C.

    Cached in `directory/<key>.safetensors` (the cache's calibration/, oplora.cache), key = (weights, corpus sha256,
    the settings, r, layer names); a cached entry is read without running the model. `<key>.json` records the
    corpus: source, sha256, windows, and whether a BOS token starts each window.
    """
    text = corpus(settings)
    digest = hashlib.sha256(text.encode()).hexdigest()
    key = content_hash({"weights": weights_identity(model), "corpus_sha256": digest, "r": r, "layers": sorted(layers),
                        **{k: v for k, v in asdict(settings).items() if k != "source"}})
    path = directory / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # ranks of one job, or concurrent cells, compute it once
        cached = read_cache(path, list(layers), r)
        if cached is not None:
            log.info("LoRA-Null null spaces read from %s", path)
            return cached
        batches = windows(tokenizer, text, settings.n_samples, settings.seq_len, settings.seed)
        bos = tokenizer.bos_token_id is not None and all(int(w[0]) == tokenizer.bos_token_id for w in batches)
        record = {**asdict(settings), "corpus_sha256": digest, "corpus_chars": len(text), "windows": len(batches),
                  "tokens": sum(len(w) for w in batches), "bos_starts_each_window": bos}
        log.info("LoRA-Null calibration: %s", record)
        covs = covariances(model, layers, batches)
        distinct = {id(c): c for c in covs.values()}
        nulls = {i: torch.linalg.eigh(c.double()).eigenvectors[:, :r].cpu()  # ascending eigenvalues
                 for i, c in tqdm(distinct.items(), desc="eigendecompositions", unit="input")}
        result = {name: nulls[id(c)].clone().contiguous() for name, c in covs.items()}
        atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2))
        with atomic_file(path) as tmp:
            save_file(result, tmp, metadata={"key": key, "corpus_sha256": digest,
                                             "checksums": json.dumps(tensor_checksums(result))})
    return result


ORTHONORMAL_TOLERANCE = 1e-10  # U_null is float64 eigenvectors: |UᵀU − I| is near 1e-15


def read_cache(path: Path, layers: list[str], r: int) -> dict[str, torch.Tensor] | None:
    """The null spaces cached at `path`, verified: the checksums stored with them match, every layer has one, and each
    is an orthonormal n×r matrix. None when there is no file; a damaged one is named in a warning (then recomputed)."""
    if not path.exists():
        return None
    try:
        nulls = load_file(path)
        with safe_open(path, "pt") as f:
            checksums = json.loads((f.metadata() or {}).get("checksums", "null"))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        problem = f"cannot be read: {type(err).__name__}: {err}"
    else:
        problem = damage(nulls, checksums, layers, r)
    if problem is None:
        return nulls
    log.warning("LoRA-Null calibration cache %s fails verification (%s): recomputing it", path, problem)
    return None


def damage(nulls: dict[str, torch.Tensor], checksums: dict | None, layers: list[str], r: int) -> str | None:
    """What is wrong with cached null spaces, or None (see `read_cache`)."""
    if checksums is None:
        return "no stored checksums (written by an older version)"
    if bad := [name for name, found in tensor_checksums(nulls).items() if checksums.get(name) != found]:
        return f"checksum mismatch in {', '.join(bad)}"
    if sorted(nulls) != sorted(layers):
        return "null spaces of other layers"
    for name, U in nulls.items():
        if U.dim() != 2 or U.shape[1] != r:
            return f"U_null of {name} is {tuple(U.shape)}, not n×{r}"
        gap = float((U.T @ U - torch.eye(r, dtype=U.dtype)).abs().max())
        if not gap <= ORTHONORMAL_TOLERANCE:
            return f"U_null of {name} is not orthonormal: max |UᵀU − I| = {gap:.1e}"
    return None
