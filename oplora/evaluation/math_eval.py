"""Math stage: GSM8K and MATH exact match with PiSSA / MetaMath's prompt, decoding and scoring.

The question goes into the Alpaca prompt the models were trained with, followed by " Let's think step
by step."; decoding is greedy up to `max_new_tokens`; the answer is what follows the last
"The answer is: " (`math_score`). Every generation and verdict is saved next to the result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from oplora.device import release_gpu_memory, resolve_device
from oplora.evaluation import math_score
from oplora.evaluation.common import (
    binomial_stderr,
    check_generations,
    generation_backend,
    vllm_memory_fraction,
)
from oplora.evaluation.stage import Stage, register
from oplora.io import atomic_write_text
from oplora.prompt import PROMPT
from oplora.resources import resolve

log = logging.getLogger(__name__)
SCORERS = {
    "gsm8k": (math_score.gsm8k_gold, math_score.gsm8k_prediction, math_score.gsm8k_correct),
    "math": (math_score.math_gold, math_score.math_prediction, math_score.math_correct),
}


def load_rows(spec: dict, limit: int | None) -> list[dict]:
    """Rows of a local .json/.jsonl file or a hub dataset, checked for the question and answer fields."""
    path = resolve(spec["path"])
    if Path(path).suffix in (".json", ".jsonl"):
        if not Path(path).exists():
            raise FileNotFoundError(f"math task data {path} does not exist")
        text = Path(path).read_text()
        try:
            rows = json.loads(text) if path.endswith(".json") else [json.loads(x) for x in text.splitlines() if x]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    else:
        from datasets import load_dataset

        rows = list(load_dataset(path, spec.get("name"), split=spec["split"]))
    rows = rows[:limit] if limit else rows
    for i, row in enumerate(rows):
        missing = [spec[f] for f in ("question", "answer") if spec[f] not in row]
        if missing:
            raise KeyError(f"{path} row {i} has no field {missing[0]!r} (fields: {', '.join(row)})")
    return rows


def prompt(question: str, suffix: str) -> str:
    return PROMPT.format(query=question) + suffix


def hf_generator(model_dir: str, dtype: str, trust_remote_code: bool):
    """HF `generate`, the model loaded once: batched greedy generation, longest prompts first, left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device().type
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", trust_remote_code=trust_remote_code)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code).to(device).eval()

    def generate(prompts: list[str], settings: dict) -> list[str]:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        size = settings["batch_size"]
        for start in tqdm(range(0, len(order), size), desc="generating", unit="batch"):
            batch = order[start:start + size]
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                tokens = model.generate(**enc, do_sample=False, max_new_tokens=settings["max_new_tokens"],
                                        pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(tokens[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts, strict=True):
                outputs[i] = text
        return outputs

    return generate


def vllm_generator(model_dir: str, dtype: str, trust_remote_code: bool):
    """One vLLM engine for every task of the stage, sized to the GPU memory that is free (`vllm_memory_fraction`)."""
    from vllm import LLM, SamplingParams

    release_gpu_memory()
    free, total = torch.cuda.mem_get_info()
    fraction = vllm_memory_fraction(free, total)
    log.info("vLLM engine: gpu_memory_utilization %.2f (%.1f of %.1f GiB free)", fraction, free / 2**30, total / 2**30)
    llm = LLM(model=model_dir, dtype=dtype, trust_remote_code=trust_remote_code, gpu_memory_utilization=fraction)

    def generate(prompts: list[str], settings: dict) -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=settings["max_new_tokens"])
        return [out.outputs[0].text for out in llm.generate(prompts, params)]

    return generate


GENERATORS = {"hf": hf_generator, "vllm": vllm_generator}


def score(spec: dict, rows: list[dict], completions: list[str]) -> tuple[list[dict], float]:
    gold_of, prediction_of, correct = SCORERS[spec["scorer"]]
    samples = []
    for i, (row, completion) in enumerate(zip(rows, completions, strict=True)):
        gold = gold_of(row[spec["answer"]])
        right = correct(completion, gold)
        samples.append({"doc_id": i, "question": row[spec["question"]], "gold": gold, "completion": completion,
                        "prediction": prediction_of(completion), "correct": right, "exact_match": float(right)})
    return samples, sum(s["correct"] for s in samples) / max(len(samples), 1)


@register
class Math(Stage):
    name = "math"
    version = 2  # 2: samples keyed by doc_id with their exact_match, as paired differences and a frontier read them
    generates = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = generation_backend(self.settings["backend"])
        self.generate = None  # built on the first task, then shared by the others (GSM8K and MATH: one engine)

    def close(self) -> None:
        self.generate = None  # the HF model or the vLLM engine it holds
        super().close()

    def run(self, task: str) -> dict:
        tasks = self.settings["tasks"]
        if task not in tasks:
            raise ValueError(f"unknown math task {task!r}; eval.math.tasks defines {', '.join(tasks)}")
        spec = tasks[task]
        if spec["scorer"] not in SCORERS:
            raise ValueError(f"unknown scorer {spec['scorer']!r}; valid: {', '.join(SCORERS)}")
        rows = load_rows(spec, self.limit)
        if self.generate is None:
            self.generate = GENERATORS[self.backend](self.model_dir, self.target.dtype, self.target.trust_remote_code)
        completions = self.generate([prompt(r[spec["question"]], self.settings["suffix"]) for r in rows],
                                    self.settings)
        check_generations(completions, f"math/{task}")
        samples, accuracy = score(spec, rows, completions)
        path = self.workdir / f"{task}.samples.jsonl"
        atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in samples))
        n = len(samples)
        return {"metrics": {task: {"metric": "exact_match", "value": accuracy, "stderr": binomial_stderr(accuracy, n),
                                   "n": n}},
                "details": {task: {"samples": str(path), "data": resolve(spec["path"]), "data_config": spec.get("name"),
                                   "split": spec["split"], "rows": n,
                                   "backend": self.backend, "correct": sum(s["correct"] for s in samples)}}}
