"""The embedded demo: its offline data, and a reduced demo (two methods, few steps) end to end."""

import json
from pathlib import Path

import pytest

from helpers import compose
from oplora import bigbench
from oplora.demo_data import countries
from oplora.io import file_sha256
from oplora.pipeline import run, summary
from oplora.resources import resolve


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_demo_data_is_consistent():
    train = jsonl(resolve("oplora:demo-train"))
    tasks = Path(resolve("oplora:demo-tasks"))
    continents = {c["name"]: c["continent"] for c in countries()}
    named = lambda prompt: prompt.split("Which continent is ")[1].split(" in?")[0]  # noqa: E731
    trained = {named(r["instruction"]) for r in train}
    assert all(continents[named(r["instruction"])] == r["output"] for r in train)
    held_out = jsonl(tasks / "demo_continents.jsonl")
    assert {named(d["prompt"]) for d in held_out}.isdisjoint(trained) and len(held_out) + len(train) == len(continents)
    assert all(d["choices"][d["label"]] == continents[named(d["prompt"])] for d in held_out)
    assert Path(resolve("oplora:demo-calibration")).stat().st_size
    with pytest.raises(ValueError, match="valid: .*oplora:demo-train"):
        resolve("oplora:demo-nothing")


def test_bigbench_tasks_are_the_registry_release_served_through_lm_eval():
    root = Path(resolve("oplora:bigbench-tasks"))
    source = json.loads((root / "SOURCE.json").read_text())
    assert file_sha256(bigbench.archive()) == source["archive_sha256"] == bigbench.ARCHIVE_SHA256
    raw = bigbench.read_tasks({"social_iqa", "strategyqa"})
    assert {k: sha for k, (_, sha) in raw.items()} == {k: source["tasks"][k]["sha256"] for k in raw}
    siqa = jsonl(root / "social_iqa.jsonl")
    # BIG-bench's social_iqa is SIQA's validation set: its first question is allenai/social_i_qa validation row 0
    assert siqa[0] == {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
                       "question": "What does Tracy need to do before this?", "answerA": "Make a new plan",
                       "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}
    three = [e for e in raw["social_iqa"][0]["examples"] if len(e["target_scores"]) == 3]
    assert len(siqa) == len(three) == 1950
    for doc, example in zip(siqa, three, strict=True):  # context + question is BIG-bench's input, nothing lost
        assert f"{doc['context']} {doc['question']}" == example["input"].strip()
        assert example["target_scores"][doc["answer" + "ABC"[int(doc["label"]) - 1]]] == 1
    strategy, examples = jsonl(root / "strategyqa.jsonl"), raw["strategyqa"][0]["examples"]
    prompts = [bigbench.bigbench_prompt(raw["strategyqa"][0], e) for e in examples]
    assert sorted(d["prompt"] for d in strategy) == sorted(prompts)  # every example once, in a seeded order
    by_prompt = dict(zip(prompts, examples, strict=True))
    assert all(by_prompt[d["prompt"]]["target_scores"][d["choices"][d["label"]]] == 1 for d in strategy)
    assert strategy[0]["prompt"].startswith("Q: ") and strategy[0]["prompt"].endswith("\nA:")

    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=[str(root)], include_defaults=False)
    task = get_task_dict(["bigbench_social_iqa"], manager)["bigbench_social_iqa"]
    doc = task.validation_docs()[0]
    # lm_eval's own social_iqa prompt, choices and target over this data
    assert task.doc_to_text(doc) == "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does " \
                                    "Tracy need to do before this?\nA:"
    assert task.doc_to_choice(doc) == ["Make a new plan", "Go home and see Riley", "Find somewhere to go"]
    assert task.doc_to_target(doc) == 2 and task.config.target_delimiter == " "
    held = jsonl(root / "heldout.jsonl")
    assert len(held) > 400 and {h["source"] for h in held} <= set(bigbench.HELDOUT_SOURCES)
    assert not {h["source"] for h in held} & set(bigbench.CANDIDATES)


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end(smollm2, tmp_path):
    overrides = ["experiment=demo", "pipeline.methods=[lora,oplora16]", "pipeline.seeds=[1,2]",
                 "pipeline.rho_ks=[8,16]", "data.limit=8", "train.epochs=1", "train.batch_size=4",
                 "train.micro_batch_size=4", "eval.lm_eval.limit=12",
                 "eval.kl.limit=6", f"output_dir={tmp_path}/runs/${{method.label}}/seed${{seed}}",
                 f"pipeline.results_dir={tmp_path}/t", "wandb=disabled"]
    report = run(compose(*overrides), overrides)
    assert report["failed"] == {}, summary(report)
    out = tmp_path / "t"
    collected = json.loads((out / "collect.json").read_text())
    columns = [c["label"] for c in compose(*overrides).eval.columns]
    assert list(collected["rows"]) == ["Base", "LoRA", "OPLoRA-16"] and "KL ×100" in columns
    assert all(list(row) == columns and None not in row.values() for row in collected["rows"].values())
    assert collected["rows"]["Base"]["KL ×100"] == 0 < collected["rows"]["LoRA"]["KL ×100"]
    assert collected["stats"]["LoRA"]["KL ×100"]["n"] == 2 and collected["stats"]["LoRA"]["KL ×100"]["std"] > 0
    assert collected["rho"]["OPLoRA-16"]["16"] < 1e-10 < collected["rho"]["LoRA"]["16"]
    table = (out / "table.md").read_text()
    assert "| Base |" in table and "| OPLoRA-16 |" in table and " ± " in table
    pairs = json.loads((out / "paired.json").read_text())["pairs"]
    assert set(pairs) == {"OPLoRA-16 − LoRA", "LoRA − Base"}
    for column in columns:  # every column: a difference inside its t-interval over both seeds
        found = pairs["LoRA − Base"][column]
        assert found["low"] <= found["diff"] <= found["high"] and found["seeds"] == 2 and len(found["per_seed"]) == 2
    # every prompt's KL is positive: the bootstrap over questions (seeds fixed) excludes 0
    assert pairs["LoRA − Base"]["KL ×100"]["cond_low"] > 0 and "Forget avg" in pairs["OPLoRA-16 − LoRA"]
    assert (out / "figure2.png").stat().st_size > 10_000
