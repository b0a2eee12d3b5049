"""The KL stage (the demo's continuous forgetting score) and the paired bootstrap of oplora.paired."""

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from oplora.evaluation.drift import Stage, token_kl
from oplora.evaluation.target import Target
from oplora.paired import bootstrap, matrix
from oplora.tables import FORGET_AVG

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Which planet is the largest in the solar system?",
           "A short one.", "Water boils at one hundred degrees Celsius at sea level, which is why cooks at altitude "
           "need longer to boil an egg."]


@pytest.fixture(scope="module")
def tuned(tiny_dirs, tmp_path_factory):
    """The tiny Llama with a LoRA adapter whose B is random (so the tuned model differs), exported."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return str(tiny_dirs["llama"]), str(out)


def test_kl_is_the_mean_over_real_tokens_of_the_exact_divergence(tuned, tmp_path):
    base_dir, adapter = tuned
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(PROMPTS)))
    settings = {"batch_size": 4, "cpu_batch_size": 3, "max_length": 64, "tasks": {"held": {"path": str(prompts)}}}
    result = Stage(Target(base_dir, adapter), settings, None, tmp_path / "work").run("held")
    per_prompt = [json.loads(line)["kl"] for line in open(tmp_path / "work" / "held.samples.jsonl")]

    # the same number computed one prompt at a time, without padding, from the two models' probabilities
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                            adapter).eval()
    expected = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            p = torch.softmax(base(ids).logits.double(), -1)
            q = torch.softmax(tuned_model(ids).logits.double(), -1)
            expected.append(float((p * (p.log() - q.log())).sum(-1).mean()))
    assert per_prompt == pytest.approx(expected, rel=1e-4, abs=1e-7)  # padding in a batch changes nothing
    assert min(per_prompt) > 0
    metric = result["metrics"]["held"]
    assert metric["value"] == pytest.approx(np.mean(expected), rel=1e-4) and metric["n"] == len(PROMPTS)
    assert metric["stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(len(PROMPTS)), rel=1e-6)


def test_kl_of_a_model_with_itself_is_zero(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    assert token_kl(model, model, ids, mask).abs().max() < 1e-6


def test_base_row_scores_zero_without_loading_a_model(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 7, "text": "hello there"}\n{"id": 8, "text": "general kenobi"}\n')
    settings = {"batch_size": 4, "cpu_batch_size": 4, "max_length": 8, "tasks": {"held": {"path": str(prompts)}}}
    result = Stage(Target("no/such-model"), settings, None, tmp_path).run("held")
    assert result["metrics"]["held"]["value"] == 0.0 and not result["details"]["held"]["computed"]


def test_paired_bootstrap_pairs_seeds_and_questions():
    rng = np.random.default_rng(1)
    ref = {s: {str(q): float(rng.integers(0, 2)) for q in range(400)} for s in (1, 2, 3)}
    shifted = {s: {q: v + 1.0 for q, v in qs.items()} for s, qs in ref.items()}
    exact = bootstrap({"A": matrix(shifted, ref)}, forget=["A"])
    assert exact["A"]["diff"] == exact["A"]["low"] == exact["A"]["high"] == 1.0  # a constant shift has no spread
    assert exact[FORGET_AVG]["diff"] == 1.0 and exact["A"]["seeds"] == 3 and exact["A"]["questions"] == 400
    noisy = {s: {q: v + float(rng.normal(0.5, 2.0)) for q, v in qs.items()} for s, qs in ref.items()}
    found = bootstrap({"A": matrix(noisy, ref), "B": matrix(ref, ref)}, forget=["A", "B"])
    assert found["A"]["low"] < found["A"]["diff"] < found["A"]["high"] and found["A"]["low"] > 0.2
    assert found["A"]["high"] - found["A"]["low"] < 4 * 1.96 * 2.0 / math.sqrt(1200)  # about ±1.96·σ/√(n·seeds)
    assert found["B"]["diff"] == found["B"]["low"] == found["B"]["high"] == 0.0
    assert found[FORGET_AVG]["diff"] == pytest.approx((found["A"]["diff"] + 0.0) / 2)
    for base in ({42: ref[1]}, {1: ref[1]}):  # the base row: one evaluation, paired with every seed of the method
        assert matrix(shifted, base).shape == (3, 400) and matrix(shifted, base)[2].tolist() != [1.0] * 400
    assert matrix({1: {"a": 1.0}}, {2: {"b": 0.0}, 3: {"b": 0.0}}) is None  # nothing in common
