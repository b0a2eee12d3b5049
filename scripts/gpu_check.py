"""One command that checks every stage on a GPU and writes its figures (`make gpu-check`, ≤ 8 min on one GPU).

    python scripts/gpu_check.py [--out results/bench]           # needs CUDA; refuses without it
    python scripts/gpu_check.py --device cpu --smoke --out DIR  # the same code at toy sizes on the CPU (a test)

Parts, each timed, written to `gpu-check.{md,json}` in --out after each part:

1. step time on a Llama-2-7B-shaped stack (bf16; LoRA, OPLoRA-16, OPLoRA-128, the paper's per-token projection;
   `bench_methods.step_section`, 4 layers at batch 4 × 512 tokens);
2. the SVD cache of 160 matrices of the 7B shapes (σ_i ∝ i^-0.5) in refined mode on the GPU: total time, the
   largest residual, and the leakage ρ_k of an OPLoRA update projected with the cached triples, against an exact
   float64 SVD of one matrix per shape;
3. a short bf16 DeepSpeed ZeRO-2 training of every method on SmolLM2 (the demo data), each in its own process,
   and ρ_k / preservation error of the saved OPLoRA adapters (`oplora.diagnose`);
4. merged (bf16, merged on the GPU) against unmerged (PEFT) on the same prompts: next-token agreement, largest
   log-probability difference, and identical greedy tokens;
5. vLLM greedy generation from the merged model against HF's, when vLLM is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # noqa: E402

from oplora.diagnose import diagnose_adapter, rho  # noqa: E402
from oplora.io import atomic_write_text  # noqa: E402
from oplora.methods.oplora import Orthogonalize  # noqa: E402
from oplora.svd import SVDCache, triple_residual  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = ("lora", "pissa", "milora", "lora_null", "oplora16", "oplora128")
SEVEN_B_SHAPES = {(4096, 4096): 96, (11008, 4096): 32, (4096, 11008): 32}
PROMPTS = ["Which continent is Peru in?", "The capital of France is", "def add(a, b):", "Water boils at"]


class Sizes:
    """What each part runs: the GPU check, or toy sizes of the same code for the CPU smoke test."""

    def __init__(self, smoke: bool):
        self.step_preset = (replace(bench_methods.PRESETS["cpu"], hidden=256, intermediate=512, heads=4, layers=1,
                                    vocab=256, batch=1, seq=16, repeats=2) if smoke
                            else replace(bench_methods.PRESETS["7b"], layers=4, batch=4, seq=512, repeats=6))
        self.svd_shapes = {(192, 128): 2, (128, 192): 2} if smoke else SEVEN_B_SHAPES
        self.svd_k = 16 if smoke else 128
        self.model = "tiny-llama" if smoke else "smollm2-135m"
        self.methods = ("oplora16",) if smoke else METHODS
        self.steps = 3 if smoke else 10  # the first step's learning rate is 0 (warm-up)
        self.deepspeed = "none" if smoke else "zero2"
        self.new_tokens = 4 if smoke else 32


def synthetic(m: int, n: int, seed: int, device: str) -> torch.Tensor:
    """U diag(i^-0.5) Vᵀ, float32, random orthonormal U and V: a slowly decaying spectrum."""
    g = torch.Generator(device).manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, device=device)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, device=device)).Q
    return (U * torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -0.5) @ V.T


def exact_top_u(W: torch.Tensor, k: int) -> torch.Tensor:
    """The exact top-k left singular vectors in float64, from `eigh` of the smaller Gram matrix (the reference).

    Its error in span(U_k) is about ε·σ₁²/(σ_k² − σ_{k+1}²) ≈ 1e-12 here, far below what is measured.
    """
    W64 = W.double()
    if W.shape[0] <= W.shape[1]:
        return torch.linalg.eigh(W64 @ W64.T).eigenvectors[:, -k:]
    V = torch.linalg.eigh(W64.T @ W64).eigenvectors[:, -k:]
    return torch.linalg.qr(W64 @ V).Q


def part_steps(sizes: Sizes, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return bench_methods.step_section(sizes.step_preset, device, dtype, svd_mode="refined")


def part_svd(sizes: Sizes, device: str, work: Path) -> dict:
    svd, k = SVDCache(work / "svd", mode="refined", device=device), sizes.svd_k
    seconds, worst, leaks, seed = 0.0, 0.0, [], 0
    for (m, n), count in sizes.svd_shapes.items():
        for i in range(count):
            W = synthetic(m, n, seed, device)
            seed += 1
            spent, top = bench_methods.timed(device, svd.top, W, k)
            seconds, worst = seconds + spent, max(worst, triple_residual(W, *top[:3]))
            if i == 0:  # the leakage of an OPLoRA update projected with the cached triples, against exact ones
                U_exact = exact_top_u(W, k)
                g = torch.Generator(device).manual_seed(0)
                A, B = (torch.randn(s, generator=g, device=device) for s in ((32, n), (m, 32)))
                delta = (Orthogonalize(top.U, "left").project(B).double()
                         @ Orthogonalize(top.V, "right").project(A).double())
                leaks.append({"shape": f"{m}x{n}", "rho": rho(delta, U_exact, [k])[k]})
    return {"matrices": sum(sizes.svd_shapes.values()), "k": k, "seconds": seconds, "max_residual": worst,
            "leakage": leaks, "target": "≤ 330 s (the paper's 5.5 min) and ρ_k ≤ 1e-10"}


def train_cell(sizes: Sizes, method: str, work: Path) -> Path:
    output = work / "runs" / method
    command = [sys.executable, "-m", "oplora.train", "experiment=demo", f"model={sizes.model}", f"method={method}",
               f"deepspeed={sizes.deepspeed}", f"train.max_steps={sizes.steps}", "wandb=disabled",
               f"output_dir={output}", f"cache_dir={work / 'cache'}"]
    subprocess.run(command, check=True, cwd=REPO)  # one process per cell: DeepSpeed releases its GPU memory
    return output


def part_training(sizes: Sizes, device: str, work: Path) -> dict:
    from oplora.config import compose
    from oplora.resources import resolve

    base = resolve(compose([f"model={sizes.model}"]).model.path)
    cells = {}
    for method in sizes.methods:
        start = time.perf_counter()
        output = train_cell(sizes, method, work)
        cells[method] = {"train_s": time.perf_counter() - start}
        if method.startswith("oplora"):
            k = int(method.removeprefix("oplora"))
            report = diagnose_adapter(base, output / "adapter", [k], SVDCache(work / "cache", device=device))
            cells[method].update({key: report["aggregate"][f"{key}_max"][str(k)]
                                  for key in ("rho", "preservation_error", "triple_error")})
            cells[method]["delta_norm_max"] = max(m["delta_norm"] for m in report["modules"].values())
    return {"model": sizes.model, "steps": sizes.steps, "deepspeed": sizes.deepspeed, "cells": cells,
            "adapter": str(work / "runs" / sizes.methods[-1] / "adapter"), "base": str(base)}


def greedy(model, tokenizer, device: str, new_tokens: int) -> list[list[int]]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, batch.input_ids.shape[1]:].tolist()


@torch.no_grad()
def part_merge(sizes: Sizes, device: str, work: Path, trained: dict) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oplora.export import merge

    base, adapter, dtype = trained["base"], trained["adapter"], torch.bfloat16
    start = time.perf_counter()
    merged_dir = merge(base, adapter, work / "merged", dtype, device=device)
    merge_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device), adapter)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(device)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    logp = [m.eval()(**batch).logits.float().log_softmax(-1) for m in (unmerged, merged)]
    mask = batch.attention_mask.bool()
    agree = (logp[0].argmax(-1) == logp[1].argmax(-1))[mask].float().mean()
    tokens = [greedy(m, tokenizer, device, sizes.new_tokens) for m in (unmerged, merged)]
    return {"merge_s": merge_s, "dtype": "bfloat16", "next_token_agreement": float(agree),
            "max_logprob_diff": float((logp[0] - logp[1]).abs()[mask].max()),
            "greedy_identical": sum(a == b for a, b in zip(*tokens, strict=True)), "prompts": len(PROMPTS),
            "merged_dir": str(merged_dir), "hf_tokens": tokens[1]}


def part_vllm(sizes: Sizes, merged: dict) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed (see SPEC §5 for the versions that fit the lock)"}
    from vllm import LLM, SamplingParams

    llm = LLM(model=merged["merged_dir"], dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=sizes.new_tokens))
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    pairs = zip(tokens, merged["hf_tokens"], strict=True)
    same = [sum(a == b for a, b in zip(v, h, strict=False)) / max(len(h), 1) for v, h in pairs]
    return {"token_agreement_with_hf": sum(same) / len(same), "identical": sum(s == 1 for s in same)}


# -- report ----------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = [f"# GPU check{' (CPU smoke run)' if report['smoke'] else ''}", "", f"- command: `{report['command']}`",
             f"- date: {report['date']}; device: {report['device_name']}; torch {torch.__version__}",
             f"- wall time: {report['wall_s']:.0f} s", ""]
    if "steps" in report:
        s = report["steps"]
        lines += ["## 1. Step time (7B-shaped stack)", "", f"{s['tokens_per_step']} tokens per step, {s['dtype']}", "",
                  "| variant | s/step | × LoRA |", "|---|---:|---:|"]
        lines += [f"| {n} | {v['median_s']:.4f} | {v['ratio_to_lora']:.3f} |" for n, v in s["variants"].items()]
        lines += ["", f"**Verdict:** {s['verdict']}", ""]
    if "svd" in report:
        s = report["svd"]
        lines += ["## 2. SVD cache (refined mode)", "",
                  f"{s['matrices']} matrices, top {s['k']}: **{s['seconds']:.1f} s**, largest residual "
                  f"{s['max_residual']:.1e}; target {s['target']}.", "",
                  *(f"- ρ_{s['k']} against the exact SVD, {x['shape']}: {x['rho']:.1e}" for x in s["leakage"]), ""]
    if "training" in report:
        t = report["training"]
        lines += [f"## 3. Training ({t['model']}, {t['steps']} steps, deepspeed={t['deepspeed']})", "",
                  "| method | train s | ρ_k max | preservation max | triple max | max ‖ΔW‖_F |",
                  "|---|---:|---:|---:|---:|---:|"]
        for method, c in t["cells"].items():
            extra = [f"{c[key]:.1e}" if key in c else "—"
                     for key in ("rho", "preservation_error", "triple_error", "delta_norm_max")]
            lines.append(f"| {method} | {c['train_s']:.0f} | " + " | ".join(extra) + " |")
        lines.append("")
    if "merge" in report:
        m = report["merge"]
        lines += ["## 4. Merged vs unmerged (bf16)", "",
                  f"merge {m['merge_s']:.1f} s; next-token agreement {m['next_token_agreement']:.3f}, largest "
                  f"log-prob difference {m['max_logprob_diff']:.3f}, identical greedy continuations "
                  f"{m['greedy_identical']}/{m['prompts']}", ""]
    if "vllm" in report:
        lines += ["## 5. vLLM", "", json.dumps(report["vllm"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and torch.cuda.is_available() is False here (a CPU wheel, no GPU, or a "
              "driver older than the CUDA build; see README 'GPU check'). The GPU figures stay missing; "
              "`--device cpu --smoke` runs the same code at toy sizes.", file=sys.stderr)
        return 2
    sizes, start = Sizes(args.smoke), time.perf_counter()
    stem = args.out / ("gpu-check-smoke" if args.smoke else "gpu-check")
    report = {"command": " ".join(["python", *sys.argv]), "smoke": args.smoke,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}

    def save(part: str, result: dict) -> dict:
        report[part] = result
        report["wall_s"] = time.perf_counter() - start
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        atomic_write_text(stem.with_suffix(".md"), markdown(report))
        print(f"{part} done ({report['wall_s']:.0f} s)", flush=True)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save("steps", part_steps(sizes, args.device))
        save("svd", part_svd(sizes, args.device, work))
        trained = save("training", part_training(sizes, args.device, work))
        merged = save("merge", part_merge(sizes, args.device, work, trained))
        save("vllm", part_vllm(sizes, merged) if args.device == "cuda" else {"skipped": "CPU run"})
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
