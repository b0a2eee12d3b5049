"""The embedded demo: its offline data, and a reduced demo (two methods, few steps) end to end."""

import json
from pathlib import Path

import pytest

from helpers import compose
from oplora.demo_data import countries
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
    capitals = {c["name"]: c["capital"] for c in countries()}
    for doc in jsonl(tasks / "demo_capitals.jsonl"):
        country = doc["prompt"].split("capital of ")[1].split("?")[0]
        assert doc["choices"][doc["label"]] == capitals[country] and len(set(doc["choices"])) == 4
    assert (tasks / "demo_currencies.yaml").exists() and Path(resolve("oplora:demo-calibration")).stat().st_size
    with pytest.raises(ValueError, match="valid: .*oplora:demo-train"):
        resolve("oplora:demo-nothing")


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end(smollm2, tmp_path):
    overrides = ["experiment=demo", "pipeline.methods=[lora,oplora16]", "pipeline.rho_ks=[8,16]", "data.limit=8",
                 "train.batch_size=4", "train.micro_batch_size=4", "eval.limit=12", "eval.math.limit=1",
                 "eval.math.max_new_tokens=8", "eval.evalplus.limit=1", "eval.evalplus.max_new_tokens=8",
                 f"output_dir={tmp_path}/runs/${{method.label}}/seed${{seed}}", f"pipeline.results_dir={tmp_path}/t",
                 "wandb=disabled"]
    report = run(compose(*overrides), overrides)
    assert report["failed"] == {}, summary(report)
    collected = json.loads((tmp_path / "t" / "collect.json").read_text())
    assert list(collected["rows"]) == ["Base", "LoRA", "OPLoRA-16"]
    columns = ["Continents", "Capitals", "Currencies", "GSM8K", "HumanEval"]
    assert all(list(row) == columns and None not in row.values() for row in collected["rows"].values())
    assert collected["rows"]["Base"]["Capitals"] > 50  # the forgetting task is well above chance (25 %)
    assert collected["rho"]["OPLoRA-16"]["16"] < 1e-10 < collected["rho"]["LoRA"]["16"]
    table = (tmp_path / "t" / "table.md").read_text()
    assert "| Base |" in table and "| OPLoRA-16 |" in table
    assert (tmp_path / "t" / "figure2.png").stat().st_size > 10_000
