"""What OPLoRA costs next to LoRA: training step time, and top-k SVD time and accuracy.

    python scripts/bench_methods.py [--device cpu|cuda] [--preset cpu|7b] [--layers N] [--batch N] [--seq N]
                                    [--repeats N] [--sections steps svd] [--svd-mode exact|refined]
                                    [--out results/bench]

Section 1 builds a stack of Llama-shaped decoder blocks with random weights, times building the exact
SVD cache of every adapted matrix, then times a training step (forward + backward + AdamW) of LoRA,
OPLoRA-16, OPLoRA-128 and the paper's per-token projection, side by side in one process, round-robin
over the variants. Section 2 computes the top-k singular triples of a few matrices four ways and
reports the time, the triples' residual, and the leakage ρ_k of an OPLoRA update projected with them.
`methods-<preset>.json` and `methods-<preset>.md` are (re)written into --out after each section.

The cpu preset runs float32 on a small model (hidden 1024, 4 layers) and takes its section-2 matrices
from SmolLM2-135M plus one synthetic 4096×4096; the 7b preset uses the Llama-2-7B shape in bf16 on one
GPU and synthetic matrices of the 7B shapes. --layers, --batch and --seq resize the section-1 model and
its batch (OPLoRA's projection cost is per forward, so its share falls as tokens per step grow).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import median, quantiles

import peft
import torch
import transformers
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from oplora.device import default_dtype, resolve_device
from oplora.diagnose import rho
from oplora.io import atomic_write_text
from oplora.methods import AdapterSettings, build
from oplora.methods.base import ADAPTER, PAPER_TARGETS, lora_layers
from oplora.methods.oplora import Orthogonalize, per_token_delta
from oplora.models import smollm2_dir
from oplora.svd import MODES, SVDCache, triple_residual

R, ALPHA, DROPOUT, LR = 32, 32, 0.05, 1e-4
CACHE_K = 128  # the SVD cache is built for the largest projection rank the paper uses
WARMUP_STEPS = 2
TARGET_RATIO, PAPER_RATIO = 1.03, 1.19  # SPEC §4; the paper: 6 h 12 m vs 5 h 13 m
SMOLLM2_MATRICES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
                    "model.layers.0.mlp.down_proj.weight")


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    batch: int
    seq: int
    repeats: int  # timed steps per variant
    synthetic_shapes: tuple[tuple[int, int], ...]  # section 2: matrices with a decaying spectrum
    smollm2: bool  # section 2 also takes layer 0's q/up/down matrices of SmolLM2-135M
    ks: tuple[int, ...] = (16, 128)


PRESETS = {
    "cpu": Preset(hidden=1024, intermediate=2816, heads=16, layers=4, vocab=2048, batch=2, seq=256, repeats=15,
                  synthetic_shapes=((4096, 4096),), smollm2=True),
    "7b": Preset(hidden=4096, intermediate=11008, heads=32, layers=32, vocab=32000, batch=4, seq=512, repeats=10,
                 synthetic_shapes=((4096, 4096), (11008, 4096), (4096, 11008)), smollm2=False),
}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    k: int | None = None  # OPLoRA's projection rank
    per_token_k: int | None = None  # plain LoRA plus the paper's per-token projection of this rank


PER_TOKEN = Variant("per-token-128", "lora", per_token_k=128)
VARIANTS = (Variant("lora", "lora"), Variant("oplora-16", "oplora", k=16), Variant("oplora-128", "oplora", k=128),
            PER_TOKEN)


# -- shared helpers ---------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn, *args, **kwargs):
    """(seconds, result) of one call, with the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(device: str) -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


# -- section 1: training step time ------------------------------------------------------------
def base_model(preset: Preset, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Llama-shaped decoder blocks with random weights, created directly on the device."""
    config = LlamaConfig(vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                         num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                         num_key_value_heads=preset.heads, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_svd_cache(model: torch.nn.Module, svd: SVDCache, device: str) -> dict:
    """Time `SVDCache.top` on every adapted matrix of the model (each a cache miss), grouped by shape."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PAPER_TARGETS]
    by_shape: dict[str, list[float]] = {}
    for name, module in tqdm(targets, desc=f"SVD cache ({svd.mode}, k={CACHE_K})", unit="matrix"):
        seconds, _ = timed(device, svd.top, module.weight, CACHE_K, name)
        by_shape.setdefault("×".join(map(str, module.weight.shape)), []).append(seconds)
    return {
        "mode": svd.mode, "k": CACHE_K, "dtype": str(model.dtype).removeprefix("torch."), "matrices": len(targets),
        "total_s": sum(map(sum, by_shape.values())),
        "per_shape": {shape: {"count": len(t), "mean_s": sum(t) / len(t)} for shape, t in by_shape.items()},
    }


def remove_span(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """x − (x Q) Qᵀ on the last dimension: the paper's projection of every token."""
    return x - (x @ Q) @ Q.T


def add_per_token_projection(model, svd: SVDCache, k: int) -> None:
    """Project each LoRA layer's input onto ⊥V_k and its output onto ⊥U_k, token by token (per_token_delta)."""
    for name, layer in lora_layers(model):
        lora_A, lora_B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        top = svd.top(layer.base_layer.weight, k, name)
        U, V = (t.to(lora_A.weight.device, lora_A.weight.dtype) for t in (top.U, top.V))
        lora_A.register_forward_pre_hook(lambda module, args, V=V: (remove_span(args[0], V), *args[1:]))
        lora_B.register_forward_hook(lambda module, args, output, U=U: remove_span(output, U))


def check_per_token(model, svd: SVDCache, k: int) -> float:
    """Relative difference between the hooked LoRA path of one layer and `per_token_delta`."""
    name, layer = next(lora_layers(model))
    lora_A, lora_B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    top = svd.top(layer.base_layer.weight, k, name)
    x = torch.randn(8, lora_A.in_features, device=lora_A.weight.device, dtype=lora_A.weight.dtype)
    with torch.no_grad():
        hooked = (lora_B(lora_A(x)) * layer.scaling[ADAPTER]).float()
        reference = per_token_delta(x.float(), lora_A.weight.float(), lora_B.weight.float(),
                                    top.U.to(x.device), top.V.to(x.device), layer.scaling[ADAPTER])
    return float((hooked - reference).norm() / reference.norm())


def make_variant(base: torch.nn.Module, variant: Variant, svd: SVDCache):
    settings = AdapterSettings(method=variant.method, r=R, alpha=ALPHA, dropout=DROPOUT,
                               options={"k": variant.k} if variant.k else {})
    model = build(copy.deepcopy(base), settings, svd=svd)
    if variant.per_token_k:
        add_per_token_projection(model, svd, variant.per_token_k)
    return model.train()


def train_step(model, optimizer, batch: torch.Tensor) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(models: dict, batch: torch.Tensor, repeats: int, device: str) -> dict[str, list[float]]:
    """Warm every variant up, then time `repeats` steps of each, round-robin with a rotating order."""
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
                  for name, m in models.items()}
    for name, model in models.items():
        for _ in range(WARMUP_STEPS):
            train_step(model, optimizers[name], batch)
    names, times = list(models), {name: [] for name in models}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            seconds, _ = timed(device, train_step, models[name], optimizers[name], batch)
            times[name].append(seconds)
        print(f"  round {i + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    return times


def summarise(times: dict[str, list[float]], tokens: int) -> dict:
    """Median step time of each variant, and its ratio to LoRA as the median (and quartiles) of the ratios
    within each round, where the variants ran back to back: a paired estimate that drift on a shared
    machine cancels out of."""
    summary = {}
    for name, t in times.items():
        q1, q2, q3 = quantiles([a / b for a, b in zip(t, times["lora"], strict=True)], n=4, method="inclusive")
        summary[name] = {"median_s": median(t), "ratio_to_lora": q2, "ratio_quartiles": [q1, q3],
                         "tokens_per_s": tokens / median(t), "times_s": t}
    return summary


def step_verdict(variants: dict) -> str:
    """Met / not met when the slower OPLoRA's per-round quartiles lie on one side of the target."""
    worst = max(("oplora-16", "oplora-128"), key=lambda name: variants[name]["ratio_to_lora"])
    ratio, (q1, q3) = variants[worst]["ratio_to_lora"], variants[worst]["ratio_quartiles"]
    if q3 <= TARGET_RATIO:
        outcome = "met"
    elif q1 > TARGET_RATIO:
        outcome = "NOT met"
    else:
        outcome = "not resolved, the quartiles straddle it"
    return (f"slower OPLoRA ({worst}) {ratio:.3f}× LoRA, per-round quartiles {q1:.3f}–{q3:.3f} "
            f"(target ≤ {TARGET_RATIO}×: {outcome}); per-token projection "
            f"{variants[PER_TOKEN.name]['ratio_to_lora']:.3f}× (paper measured {PAPER_RATIO}×)")


def step_section(preset: Preset, device: str, dtype: torch.dtype, svd_mode: str = "exact") -> dict:
    base = base_model(preset, device, dtype)
    batch = torch.randint(preset.vocab, (preset.batch, preset.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        svd = SVDCache(tmp, mode=svd_mode, device=device)
        cache = build_svd_cache(base, svd, device)
        models = {v.name: make_variant(base, v, svd) for v in tqdm(VARIANTS, desc="build variants")}
        del base
        times = time_steps(models, batch, preset.repeats, device)
        check = check_per_token(models[PER_TOKEN.name], svd, PER_TOKEN.per_token_k)
    tokens = preset.batch * preset.seq
    variants = summarise(times, tokens)
    return {"dtype": str(dtype).removeprefix("torch."), "tokens_per_step": tokens, "svd_cache_build": cache,
            "variants": variants, "verdict": step_verdict(variants), "per_token_vs_per_token_delta": check}


# -- section 2: top-k SVD time and accuracy ---------------------------------------------------
def decaying_matrix(m: int, n: int, seed: int, device: str) -> torch.Tensor:
    """U diag(s) Vᵀ in float32: random orthonormal U, V from QR, s_i = i^-0.6 · (1 + 0.01·N(0, 1)), sorted."""
    g = torch.Generator(device).manual_seed(seed)
    rank = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, device=device))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, device=device))
    i = torch.arange(1, rank + 1, device=device, dtype=torch.float32)
    s = (i**-0.6 * (1 + 0.01 * torch.randn(rank, generator=g, device=device))).sort(descending=True).values
    return (U * s) @ V.T


def svd_matrices(preset: Preset, device: str) -> dict[str, torch.Tensor]:
    matrices = {}
    if preset.smollm2:
        with safe_open(smollm2_dir() / "model.safetensors", "pt") as f:
            for key in SMOLLM2_MATRICES:
                matrices[f"smollm2:{key.removeprefix('model.').removesuffix('.weight')}"] = f.get_tensor(key).to(device)
    for seed, (m, n) in enumerate(preset.synthetic_shapes):
        matrices[f"synthetic {m}×{n}"] = decaying_matrix(m, n, seed, device)
    return matrices


def exact_fp64(W, ks, device):
    """torch.linalg.svd in float64, once for all k."""
    seconds, (U, S, Vh) = timed(device, torch.linalg.svd, W.double(), full_matrices=False)
    return {k: (seconds, U[:, :k], S[:k], Vh[:k].T) for k in ks}


def lowrank_defaults(W, ks, device):
    """torch.svd_lowrank(W, q=k) in float32 with torch's defaults otherwise (niter=2), once per k."""
    results = {}
    for k in ks:
        seconds, (U, S, V) = timed(device, torch.svd_lowrank, W.float(), q=k)
        results[k] = (seconds, U, S, V)
    return results


def project_svd(mode: str):
    """The project's SVDCache in a fresh directory: one call for the largest k (cache write included)."""
    def run(W, ks, device):
        with tempfile.TemporaryDirectory() as tmp:
            svd = SVDCache(tmp, mode=mode)
            seconds, _ = timed(device, svd.top, W, max(ks))
            return {k: (seconds, *svd.top(W, k)[:3]) for k in ks}
    return run


APPROACHES = {  # exact-fp64 is the reference the leakage is measured against
    "exact-fp64": exact_fp64,
    "svd_lowrank-defaults": lowrank_defaults,
    "project-randomized": project_svd("randomized"),
    "project-exact": project_svd("exact"),
}


def leakage(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, U_exact: torch.Tensor) -> float:
    """ρ_k, against the exact U_k, of a random rank-R OPLoRA update projected (as the method does) with U, V."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(R, W.shape[1], generator=g).to(W.device)
    B = torch.randn(W.shape[0], R, generator=g).to(W.device)
    delta = Orthogonalize(U, "left").project(B).double() @ Orthogonalize(V, "right").project(A).double()
    k = U_exact.shape[1]
    return rho(delta, U_exact, [k])[k]


def svd_section(preset: Preset, device: str) -> list[dict]:
    rows = []
    for name, W in svd_matrices(preset, device).items():
        ks = [k for k in preset.ks if k < min(W.shape)]
        results = {}
        for approach, run in APPROACHES.items():
            print(f"  {name} {tuple(W.shape)}: {approach}", flush=True)
            torch.manual_seed(0)  # the randomized approaches draw their test matrices from the global generator
            results[approach] = run(W, ks, device)
        reference, W64 = results["exact-fp64"], W.double()
        for k in ks:
            for approach, by_k in results.items():
                seconds, U, S, V = by_k[k]
                row = {"matrix": name, "shape": list(W.shape), "k": k, "approach": approach, "seconds": seconds,
                       "residual": triple_residual(W64, U, S, V), "rho": leakage(W, U, V, reference[k][1])}
                print(f"    k={k} {approach}: {seconds:.2f}s residual {row['residual']:.1e} rho {row['rho']:.1e}",
                      flush=True)
                rows.append(row)
    return rows


# -- report -----------------------------------------------------------------------------------
SVD_LEGEND = f"""\
- exact-fp64: `torch.linalg.svd` in float64, once for all k; the reference for ρ_k.
- svd_lowrank-defaults: `torch.svd_lowrank(W, q=k)` in float32 with torch's other defaults (niter=2), once per k.
- project-randomized, project-exact: `SVDCache(mode=...).top(W, max k)` in a fresh cache directory; one call
  computes the top-128 triples for every k and includes hashing the matrix and writing the cache file.
- residual: `triple_residual(W, U, S, V)` of the returned top-k triples (relative to σ₁).
- ρ_k: `diagnose.rho` against the exact U_k of ΔW = (P̃_L B)(A P̃_R), a random rank-{R} update projected by
  OPLoRA's own `Orthogonalize` with the approach's U_k, V_k.
"""


def table(header: tuple[str, ...], align: str, rows: list[tuple]) -> list[str]:
    """A Markdown table; `align` holds one character per column, l or r."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def step_markdown(steps: dict) -> list[str]:
    cache = steps["svd_cache_build"]
    setup = (f"{steps['tokens_per_step']} tokens per step, {steps['dtype']}, r={R}, alpha={ALPHA}, dropout={DROPOUT}, "
             f"AdamW lr={LR}; {WARMUP_STEPS} warm-up steps per variant, then rounds of one timed step per variant "
             "(order rotating). × LoRA is the median over rounds of the ratio within a round.")
    variants = [(name, f"{v['median_s']:.3f}", f"{v['ratio_to_lora']:.3f}",
                 "{:.3f}–{:.3f}".format(*v["ratio_quartiles"]), f"{v['tokens_per_s']:.0f}")
                for name, v in steps["variants"].items()]
    shapes = [(shape, s["count"], f"{s['mean_s']:.2f}") for shape, s in cache["per_shape"].items()]
    return [
        "## 1. Training step time", "", setup, "",
        *table(("variant", "median s/step", "× LoRA", "× LoRA quartiles", "tokens/s"), "lrrrr", variants), "",
        f"**Verdict:** {steps['verdict']}.", "",
        f"Per-token hooks against `per_token_delta`: relative difference {steps['per_token_vs_per_token_delta']:.1e}.",
        "", f"### SVD cache build ({cache['mode']}, k={cache['k']}, {cache['dtype']} weights)", "",
        f"{cache['matrices']} matrices in {cache['total_s']:.1f} s.", "",
        *table(("shape", "count", "mean s"), "lrr", shapes), "",
    ]


def svd_markdown(rows: list[dict]) -> list[str]:
    cells = [(r["matrix"], r["k"], r["approach"], f"{r['seconds']:.2f}", f"{r['residual']:.1e}", f"{r['rho']:.1e}")
             for r in rows]
    return ["## 2. Top-k SVD time and accuracy", "", SVD_LEGEND,
            *table(("matrix", "k", "approach", "seconds", "residual", "ρ_k"), "lrlrrr", cells), ""]


def markdown(report: dict) -> str:
    m = report["machine"]
    hardware = f"GPU {m['gpu']}; " if m["gpu"] else ""
    preset = ", ".join(f"{key}={value}" for key, value in report["preset"].items())
    cpu = (f"CPU {m['cpu']} ({m['cpu_count']} cores), {m['torch_threads']} torch threads, "
           f"load average {m['load_average_at_start']:.2f} at start, {m['load_average_at_end']:.2f} at end "
           "(1-minute; above the core count means other work shared the CPU)")
    lines = [
        f"# Method benchmark, preset `{report['preset_name']}`", "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: {hardware}{cpu}; {m['platform']}",
        f"- software: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}",
        f"- preset: {preset}",
        f"- wall time: {report['wall_s']:.0f} s", "",
    ]
    if "steps" in report:
        lines += step_markdown(report["steps"])
    if "svd" in report:
        lines += svd_markdown(report["svd"])
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict, start: float) -> None:
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    stem = out / f"methods-{report['preset_name']}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(report))
    print(f"wrote {stem}.json and .md ({report['wall_s']:.0f} s so far)", flush=True)


RESIZABLE = ("layers", "batch", "seq", "repeats")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=resolve_device().type)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for field in RESIZABLE:
        parser.add_argument(f"--{field}", type=int, help=f"section-1 {field} (default: the preset's)")
    parser.add_argument("--sections", nargs="+", choices=["steps", "svd"], default=["steps", "svd"])
    parser.add_argument("--svd-mode", choices=MODES, default="exact", help="how section 1 builds its SVD cache")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    resized = {field: getattr(args, field) for field in RESIZABLE if getattr(args, field)}
    preset = Preset(**{**asdict(PRESETS[args.preset]), **resized})
    dtype = getattr(torch, default_dtype(args.device))
    start = time.perf_counter()
    report = {"command": shlex.join(["python", *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(args.device), "preset_name": args.preset, "preset": asdict(preset)}
    if "steps" in args.sections:
        print("section 1: training step time", flush=True)
        report["steps"] = step_section(preset, args.device, dtype, args.svd_mode)
        print(report["steps"]["verdict"], flush=True)
        write_report(args.out, report, start)
    if "svd" in args.sections:
        print("section 2: top-k SVD time and accuracy", flush=True)
        report["svd"] = svd_section(preset, args.device)
        write_report(args.out, report, start)


if __name__ == "__main__":
    main()
