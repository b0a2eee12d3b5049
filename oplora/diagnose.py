"""How much an adapter's update touches the dominant singular subspace of the ORIGINAL weights.

ΔW is by default the effective update against the original W: W_res + s·B A − W = s(B A − B₀A₀) for the
base-mutating methods (PiSSA, MiLoRA, LoRA-Null), what the exported adapter holds. The other reading, the trained
product s·B A including its initial value s·B₀A₀ (which PiSSA puts in the top singular directions by construction),
is `initial=` the initial adapter (`--initial DIR`): the report then says `"delta": "trained"`. For LoRA and OPLoRA
both readings are the same.
For each adapted matrix W (m×n) with update ΔW and top singular triples (u_i, σ_i, v_i) of W:

- rho[k]            = ‖U_kᵀ ΔW‖²_F / ‖ΔW‖²_F                      (the paper's ρ_k, figure 2a)
- preservation_error[k] = max_{i≤k} |u_iᵀ (W+ΔW) v_i − u_iᵀ W v_i| / σ_1   (shift of each preserved σ_i)
- triple_error[k]  = max_{i≤k} max(‖ΔW v_i‖, ‖ΔWᵀ u_i‖) / σ_1   (how far (u_i, σ_i, v_i) stops being
                     a singular triple of W+ΔW)
- delta_v_ratio[k] = ‖ΔW V_k‖_F / ‖ΔW‖_F

Everything is computed in float64 from the adapter's rank-r factors (`factor_quantities`: U_kᵀB, A V_k and
r×r Gram matrices, never the m×n ΔW), one base weight read from safetensors at a time (`oplora.models.LazyWeights`); the
report also aggregates each quantity over modules.

The measurement does not trust the training's SVD cache: W is read from the base model's own files, and every
triple taken from the cache is verified against that W on read (checksums, residuals, orthonormality, no missing
top triple: `oplora.svd.verify`); an entry that fails is recomputed from W, with a warning naming the file.

    python -m oplora.diagnose BASE ADAPTER --k 8 16 32 64 128 [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from oplora.cache import ENV, Cache
from oplora.device import compute_dtype
from oplora.io import atomic_write_text, content_hash, read_json
from oplora.methods.base import ADAPTER, PEFT_PREFIX, lora_layers
from oplora.models import LazyWeights, unreadable, weights_digest
from oplora.record import cell_hash
from oplora.resources import resolve
from oplora.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunDir
from oplora.svd import MODES, SVDCache


class Factors(NamedTuple):
    """ΔW = scaling · B A without forming it: B m×r, A r×n (a dense ΔW is Factors(ΔW, I, 1))."""

    B: torch.Tensor
    A: torch.Tensor
    scaling: float = 1.0

    @classmethod
    def dense(cls, delta: torch.Tensor) -> "Factors":
        return cls(delta, torch.eye(delta.shape[1], dtype=delta.dtype, device=delta.device))


def rho(delta: torch.Tensor, U: torch.Tensor, ks: list[int]) -> dict[int, float]:
    """ρ_k of a dense ΔW (benchmarks, and the reference the factor form is tested against)."""
    d = delta.double()
    energy = torch.cumsum(((U.double().T @ d) ** 2).sum(dim=1), dim=0)  # ‖U_jᵀΔW‖² for j = 1..K
    total = (d**2).sum()
    return {k: float(energy[k - 1] / total) if total > 0 else 0.0 for k in ks}


def factor_quantities(delta: Factors, U: torch.Tensor, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything the diagnostics need, in float64 from the rank-r factors (O((m+n)·r·K + (m+n)·r²)).

    X = U_Kᵀ B, Y = A V_K, G = A Aᵀ, H = BᵀB:  ‖u_iᵀ ΔW‖² = ‖ΔWᵀ u_i‖² = s²·(X G Xᵀ)_ii,
    ‖ΔW‖²_F = s²·tr(H G), ΔW V_K = s·B Y, u_iᵀ ΔW v_i = s·(X Y)_ii.
    """
    B, A = delta.B.double().to(U.device), delta.A.double().to(U.device)
    s = float(delta.scaling)
    X, G = U.T @ B, A @ A.T
    row_energy = s**2 * ((X @ G) * X).sum(1)  # ‖u_iᵀΔW‖², i = 1..K
    total = s**2 * ((B.T @ B) * G).sum()
    energy = torch.cumsum(row_energy, dim=0)
    Y = A @ V
    return {"total": total, "row_energy": row_energy, "rho": energy / total if total > 0 else torch.zeros_like(energy),
            "dV_norm": s * (B @ Y).norm(dim=0),  # ‖ΔW v_i‖
            "shift": s * (X * Y.T).sum(1)}  # u_iᵀ ΔW v_i


def diagnose_matrix(W: torch.Tensor, delta: Factors | torch.Tensor, ks: list[int], svd: SVDCache,
                    name: str = "") -> dict:
    ks = [k for k in ks if k < min(W.shape)]
    if not ks:
        return {"shape": list(W.shape), "note": f"every requested k is >= min{tuple(W.shape)}"}
    delta = delta if isinstance(delta, Factors) else Factors.dense(delta)
    U, S, V, _ = svd.top(W, max(ks), name)
    q = factor_quantities(delta, U.double(), V.double())
    sigma_1, norm = float(S[0]), float(q["total"].sqrt())
    shift = torch.cummax(q["shift"].abs(), dim=0).values / sigma_1  # max over i ≤ j, for every j
    triple = torch.cummax(torch.maximum(q["dV_norm"], q["row_energy"].sqrt()), dim=0).values / sigma_1
    leak = torch.cumsum(q["dV_norm"] ** 2, dim=0).sqrt() / norm if norm > 0 else torch.zeros_like(shift)
    per_k = lambda values: {str(k): float(values[k - 1]) for k in ks}  # noqa: E731
    return {
        "shape": list(W.shape),
        "sigma_1": sigma_1,
        "delta_norm": norm,
        "rho": per_k(q["rho"]),
        "preservation_error": per_k(shift),
        "triple_error": per_k(triple),
        "delta_v_ratio": per_k(leak),
    }


def diagnose(original: Mapping[str, torch.Tensor], deltas: Mapping[str, Factors | torch.Tensor], ks: list[int],
             svd: SVDCache | None = None) -> dict:
    """Per-module diagnostics and their aggregate over modules (mean and max of each, per k).

    One matrix at a time: `original` may be a `LazyWeights`, and `deltas` factors (`adapter_factors`).
    """
    svd = svd or SVDCache.default()
    modules = {name: diagnose_matrix(original[name], deltas[name], ks, svd, name)
               for name in tqdm(sorted(deltas), desc="diagnose", unit="matrix")}
    aggregate = {}
    for key in ("rho", "preservation_error", "triple_error", "delta_v_ratio"):
        for k in map(str, ks):
            values = [m[key][k] for m in modules.values() if k in m.get(key, {})]
            if values:
                aggregate.setdefault(f"{key}_mean", {})[k] = sum(values) / len(values)
                aggregate.setdefault(f"{key}_max", {})[k] = max(values)
    return {"ks": ks, "aggregate": aggregate, "modules": modules}


def diagnose_adapter(base: str | Path, adapter: str | Path, ks: list[int], svd: SVDCache,
                     dtype: torch.dtype | None = None, initial: str | Path | None = None) -> dict:
    """`diagnose` of a saved adapter against the base's own files, one matrix in memory at a time; with `initial`
    (the initial adapter of a base-mutating method), of the trained s·B A = s(B A − B₀A₀) + s·B₀A₀."""
    factors = adapter_factors(adapter)
    if initial is not None:
        initial_factors = adapter_factors(initial)
        factors = {name: stacked(f, initial_factors[name]) for name, f in factors.items()}
    report = diagnose(LazyWeights(base, sorted(factors), dtype), factors, sorted(set(ks)), svd)
    return {"delta": "trained" if initial is not None else "effective", **report}


def stacked(first: Factors, second: Factors) -> Factors:
    """The factors of first + second (rank r₁ + r₂): [s₁B₁, s₂B₂] · [A₁; A₂]."""
    B = torch.cat([first.scaling * first.B.double(), second.scaling * second.B.double()], dim=1)
    return Factors(B, torch.cat([first.A.double(), second.A.double()], dim=0))


def adapter_factors(adapter: str | Path) -> dict[str, Factors]:
    """ΔW = s·B A of every module of a saved plain PEFT LoRA adapter, as factors (never the m×n product)."""
    adapter = Path(adapter)
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise unreadable(adapter / ADAPTER_CONFIG, err) from err
    special = [key for key in ("use_dora", "rank_pattern", "alpha_pattern") if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA" or special:
        raise ValueError(f"{adapter}: only plain LoRA adapters (no DoRA, rank or alpha patterns) are supported")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (r**0.5 if config.get("use_rslora") else r)
    try:
        tensors = load_file(adapter / ADAPTER_WEIGHTS)
    except SafetensorError as err:
        raise unreadable(adapter / ADAPTER_WEIGHTS, err) from err
    factors = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            factors[module] = Factors(A.T, B.T, scaling) if config.get("fan_in_fan_out") else Factors(B, A, scaling)
    if not factors:
        raise ValueError(f"{adapter}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return factors


def adapter_deltas(adapter: str | Path) -> dict[str, torch.Tensor]:
    """ΔW = s·B A (float64, dense) of every module of a saved plain PEFT LoRA adapter."""
    return {name: f.scaling * (f.B.double() @ f.A.double()) for name, f in adapter_factors(adapter).items()}


def model_deltas(model, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Effective updates W_base + s·B A − W_original of an in-memory PEFT model (any method)."""
    with torch.no_grad():
        return {name: layer.base_layer.weight.double() + layer.get_delta_weight(ADAPTER).double()
                - original[name].double().to(layer.base_layer.weight.device)
                for name, layer in lora_layers(model)}


def diagnose_step(cfg: DictConfig) -> bool:
    """ρ_k (and the other diagnostics) of a trained cell's exported adapter against the original weights."""
    run = RunDir(cfg.output_dir)
    record = run.trained_record(cell_hash(cfg))
    if record is None:
        raise FileNotFoundError(f"{run.root} holds no finished training of this config ({run.record} is missing or "
                                "records another config): train the cell first")
    run.check_adapter(record)
    base = resolve(cfg.model.path)
    if weights_digest(base) != record["base_digest"]:
        raise ValueError(f"{base} is not the base model {run.record} was trained on (its weights differ): "
                         "diagnose the adapter against its own base")
    key = content_hash({"adapter_sha256": record["adapter_sha256"], "base": record["base_digest"],
                        "ks": list(cfg.pipeline.rho_ks)})
    if (read_json(run.diagnose) or {}).get("hash") == key:
        return False
    result = diagnose_adapter(base, run.adapter, list(cfg.pipeline.rho_ks), SVDCache(Cache.of(cfg).root),
                              getattr(torch, compute_dtype(cfg.model)))
    atomic_write_text(run.diagnose, json.dumps({"hash": key, "adapter_sha256": record["adapter_sha256"], **result},
                                               indent=2))
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m oplora.diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="base model directory or hub id (the ORIGINAL weights)")
    parser.add_argument("adapter", help="plain PEFT LoRA adapter directory")
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--out", help="write the JSON report here instead of stdout")
    parser.add_argument("--initial", help="the initial adapter of PiSSA / MiLoRA / LoRA-Null: measure the trained "
                                          "s·B A (with its initial value) instead of the effective update")
    parser.add_argument("--svd-mode", default="exact", choices=MODES)
    parser.add_argument("--device", default="auto", help="where the SVD and its verification run (auto: CUDA if any)")
    parser.add_argument("--cache", help=f"the cache's root, holding svd/ (default: ${ENV} or ~/.cache/oplora)")
    args = parser.parse_args(argv)
    report = diagnose_adapter(args.base, args.adapter, args.k, SVDCache(args.cache, args.svd_mode, device=args.device),
                              initial=args.initial)
    report.update(base=str(args.base), adapter=str(args.adapter))
    text = json.dumps(report, indent=2)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
