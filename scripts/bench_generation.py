"""Why generation stages merge first: greedy decoding with the adapter merged vs left as a PEFT wrapper.

    python scripts/bench_generation.py [--device cpu|cuda] [--model DIR] [--batch 8] [--new-tokens 32]
                                       [--rounds 5] [--out results/bench]

Builds an OPLoRA-16 adapter (r=32, the paper's five target modules, a random non-zero update) on
SmolLM2-135M (or --model), exports it as plain PEFT, then decodes the same prompts with
`PeftModel.from_pretrained(base, adapter)` (unmerged: every adapted layer adds its low-rank path per
token) and with `merge_and_unload()`, alternating in rounds in one process. Reports tokens/s of each,
their ratio per round (median and range) and whether both produced the same tokens.
`generation-<device>.json` and `.md` are written into --out.
"""

from __future__ import annotations

import argparse
import json
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

from oplora.export import export_adapter
from oplora.io import atomic_write_text, cache_root
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
    model = build(model, settings, SVDCache(cache_root()))
    torch.manual_seed(0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].parametrizations.weight.original, std=1e-3)
    return export_adapter(model, "oplora", out)


def decode(model, encoded, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**encoded, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="base model directory (default: SmolLM2-135M from the wheel)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model_dir = args.model or str(smollm2_dir())
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
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
    stem = args.out / f"generation-{args.device}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
