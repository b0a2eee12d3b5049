"""The KL stage (the demo's continuous forgetting score) and the paired bootstrap of oplora.paired."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from oplora import paired
from oplora.evaluation.drift import KL, token_kl
from oplora.evaluation.target import Target
from oplora.paired import Items, intervals, matrix, t_interval, to_markdown
from oplora.rundir import RunDir
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
    result = KL(Target(base_dir, adapter), settings, None, tmp_path / "work").run("held")
    rows = [json.loads(line) for line in open(tmp_path / "work" / "held.samples.jsonl")]
    per_prompt, nll_increase = [r["kl"] for r in rows], [r["nll_increase"] for r in rows]

    # the same number computed one prompt at a time, without padding, from the two models' probabilities
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                            adapter).eval()
    expected, expected_nll = [], []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            p = torch.softmax(base(ids).logits.double(), -1)
            q = torch.softmax(tuned_model(ids).logits.double(), -1)
            expected.append(float((p * (p.log() - q.log())).sum(-1).mean()))
            following = ids[0, 1:]  # the text's own next tokens: the tuned model's NLL minus the base model's
            expected_nll.append(float((p[0, :-1].log() - q[0, :-1].log()).gather(-1, following[:, None]).mean()))
    assert per_prompt == pytest.approx(expected, rel=1e-4, abs=1e-7)  # padding in a batch changes nothing
    assert nll_increase == pytest.approx(expected_nll, rel=1e-4, abs=1e-6)
    assert result["metrics"]["held_nll"]["value"] == pytest.approx(np.mean(expected_nll), rel=1e-4, abs=1e-7)
    assert min(per_prompt) > 0
    metric = result["metrics"]["held"]
    assert metric["value"] == pytest.approx(np.mean(expected), rel=1e-4) and metric["n"] == len(PROMPTS)
    assert metric["stderr"] == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(len(PROMPTS)), rel=1e-6)


def test_kl_of_a_model_with_itself_is_zero(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    kl, nll = token_kl(model, model, ids, mask)
    assert kl.abs().max() < 1e-6 and nll.abs().max() < 1e-6


def test_base_row_scores_zero_without_loading_a_model(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 7, "text": "hello there"}\n{"id": 8, "text": "general kenobi"}\n')
    settings = {"batch_size": 4, "cpu_batch_size": 4, "max_length": 8, "tasks": {"held": {"path": str(prompts)}}}
    result = KL(Target("no/such-model"), settings, None, tmp_path).run("held")
    assert result["metrics"]["held"]["value"] == 0.0 and not result["details"]["held"]["computed"]


T_975_2 = 4.302652729911275  # t_{0.975, 2}: the 97.5 % quantile of Student's t with 2 degrees of freedom


def seeds_with_means(means: dict[int, float], questions: int, rng, spread: float = 1.0) -> Items:
    """{seed: {question: value}} whose per-seed mean is exactly `means[seed]` (zero-mean noise around it)."""
    out = {}
    for s, m in means.items():
        noise = rng.normal(0, spread, questions)
        out[s] = {str(q): float(m + v) for q, v in enumerate(noise - noise.mean())}
    return out


def test_paired_interval_is_a_t_interval_over_seeds_beside_a_conditional_bootstrap():
    rng = np.random.default_rng(1)
    ref = {s: {str(q): float(rng.integers(0, 2)) for q in range(400)} for s in (1, 2, 3)}
    shift = seeds_with_means({1: 1.0, 2: 2.0, 3: 6.0}, 400, rng, spread=2.0)
    ours = {s: {q: ref[s][q] + shift[s][q] for q in ref[s]} for s in ref}
    forget_b = {s: {q: v + 3.0 * s for q, v in qs.items()} for s, qs in ref.items()}  # per seed: +3, +6, +9
    found = intervals({"A": matrix(ours, ref), "B": matrix(forget_b, ref), "C": matrix(ref, ref)}, forget=["A", "B"])

    # by hand: per-seed differences 1, 2, 6 -> mean 3, sd √((4 + 1 + 9) / 2) = √7, half-width t · √7 / √3
    a = found["A"]
    half = T_975_2 * math.sqrt(7) / math.sqrt(3)
    assert a["per_seed"] == pytest.approx({"1": 1.0, "2": 2.0, "3": 6.0}) and a["diff"] == pytest.approx(3.0)
    assert (a["low"], a["high"]) == pytest.approx((3 - half, 3 + half)) and a["low"] == pytest.approx(-3.5725, abs=1e-4)
    assert not a["excludes_zero"] and a["seeds"] == 3 and a["questions"] == 400
    # the question bootstrap, seeds fixed: about ± 1.96 · 2 / √(400 · 3) around 3 -- far narrower, and not the star
    assert a["cond_low"] < 3 < a["cond_high"] and 2.5 < a["cond_low"] and a["cond_high"] < 3.5
    assert t_interval([1.0, 2.0, 6.0]) == pytest.approx((3 - half, 3 + half))

    # the forgetting average: per seed the mean over its columns, (1 + 3) / 2, (2 + 6) / 2, (6 + 9) / 2; then t
    avg = found[FORGET_AVG]
    per_seed = [2.0, 4.0, 7.5]
    sd = math.sqrt(sum((x - np.mean(per_seed)) ** 2 for x in per_seed) / 2)
    assert avg["per_seed"] == pytest.approx({"1": 2.0, "2": 4.0, "3": 7.5}) and avg["diff"] == pytest.approx(4.5)
    assert (avg["low"], avg["high"]) == pytest.approx((4.5 - T_975_2 * sd / math.sqrt(3),
                                                       4.5 + T_975_2 * sd / math.sqrt(3)))
    assert avg["questions"] == 800 and avg["sd"] is None

    b = found["B"]  # a constant shift within each seed: no question spread, the seeds' spread only
    assert b["cond_low"] == pytest.approx(6.0) and b["cond_high"] == pytest.approx(6.0) and b["low"] < 6 < b["high"]
    same = found["C"]
    assert same["diff"] == same["low"] == same["high"] == same["cond_low"] == same["cond_high"] == 0.0
    assert not same["excludes_zero"]
    clear = intervals({"A": matrix(seeds_with_means({1: 5.0, 2: 5.2, 3: 4.9}, 50, rng), ref)}, forget=[])
    assert clear["A"]["excludes_zero"] and clear["A"]["low"] > 0 and FORGET_AVG not in clear

    one = intervals({"A": matrix({1: ours[1]}, {1: ref[1]})}, forget=["A"])["A"]  # one seed: no interval over seeds
    assert one["low"] is None and one["high"] is None and not one["excludes_zero"] and one["cond_low"] > 0
    text = to_markdown({"X − Y": {"A": one}, "Z − Y": {"A": a}, "W − Y": clear}, ["A"], "title")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| X − Y"] == f"| X − Y | 1 | {one['diff']:+.2f} " \
                              f"({one['cond_low']:+.2f}, {one['cond_high']:+.2f}) |"
    assert rows["| Z − Y"] == f"| Z − Y | 3 | +3.00 [{a['low']:+.2f}, {a['high']:+.2f}] " \
                              f"({a['cond_low']:+.2f}, {a['cond_high']:+.2f}) |"
    assert f"{clear['A']['high']:+.2f}]* (" in rows["| W − Y"] and "conditional on the seeds" in text

    for base in ({42: ref[1]}, {1: ref[1]}):  # the base row: one evaluation, paired with every seed of the method
        paired_with = matrix(ours, base)
        assert paired_with.seeds == [1, 2, 3] and paired_with.values.shape == (3, 400)
        assert paired_with.values[2].tolist() != paired_with.values[0].tolist()
    assert matrix({1: {"a": 1.0}}, {2: {"b": 0.0}, 3: {"b": 0.0}}) is None  # nothing in common


def test_paired_table_of_the_full_demo_loses_the_kl_star_of_lora_null(tmp_path):
    """The SIQA-era full demo (results/demo/full/long.csv at 58a19f8): LoRA-Null − LoRA in KL ×100 per seed is
    +242.1, +423.4, +796.0. The bootstrap over seeds and questions gave [+243, +791]*; over the three seeds the
    t-interval is [−214, +1189], no star."""
    kl = {"LoRA": {1: 136.5125592648983, 2: 175.31695783138275, 3: 187.05041381716728},
          "LoRA-Null": {1: 378.62662518024445, 2: 598.7311198711395, 3: 983.0921890735626}}
    rng = np.random.default_rng(0)
    columns = [{"label": "KL ×100", "stage": "kl", "task": "heldout", "role": "drift", "scale": 100}]
    cells, methods = {}, {}
    for label, name in (("LoRA", "lora"), ("LoRA-Null", "lora_null")):
        methods[label] = OmegaConf.create({"name": name, "display": label})
        for seed, values in seeds_with_means(kl[label], 200, rng, spread=50.0).items():
            run = RunDir(tmp_path / name / str(seed))
            samples = run.eval_result("kl").with_name("heldout.samples.jsonl")
            samples.parent.mkdir(parents=True)
            samples.write_text("".join(json.dumps({"doc_id": q, "kl": v / 100}) + "\n" for q, v in values.items()))
            run.eval_result("kl").write_text(json.dumps({"metrics": {"heldout": {"metric": "kl"}},
                                                         "details": {"heldout": {"samples": str(samples)}}}))
            cells[(name, seed)] = OmegaConf.create({"output_dir": str(run.root), "seed": seed,
                                                    "method": methods[label]})
    cfg = OmegaConf.create({"pipeline": {"compare_to": "lora"}, "eval": {"columns": columns}})
    as_written = lambda c, stage: json.loads(RunDir(c.output_dir).eval_result(stage).read_text())  # noqa: E731
    pairs = paired.compare(cfg, cells, "LoRA", None, read=as_written)

    found = pairs["LoRA-Null − LoRA"]["KL ×100"]
    per_seed = [kl["LoRA-Null"][s] - kl["LoRA"][s] for s in (1, 2, 3)]
    mean = sum(per_seed) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in per_seed) / 2)
    assert per_seed == pytest.approx([242.114, 423.414, 796.042], abs=1e-3)
    assert (found["low"], found["high"]) == pytest.approx((mean - T_975_2 * sd / math.sqrt(3),
                                                           mean + T_975_2 * sd / math.sqrt(3)))
    assert (round(found["low"]), round(found["high"])) == (-214, 1189) and not found["excludes_zero"]
    assert found["diff"] == pytest.approx(487.19, abs=0.01) and found["per_seed"] == pytest.approx(
        {str(s): d for s, d in zip((1, 2, 3), per_seed, strict=True)})
    table = paired.to_markdown(pairs, ["KL ×100"], "demo full")
    row = next(line for line in table.splitlines() if line.startswith("| LoRA-Null"))
    assert "[-214.37, +1188.75] (" in row and "*" not in row
