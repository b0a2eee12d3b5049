"""The embedded demo: its offline data, and a reduced demo (two methods, few steps) end to end."""

import io
import json
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import compose
from oplora import artifacts, bigbench, wordnet
from oplora.artifacts import ARTIFACTS
from oplora.demo_data import countries
from oplora.evaluation import harness
from oplora.io import file_sha256
from oplora.models import tiny_dir
from oplora.pipeline import run, summary
from oplora.resources import resolve

REPO = Path(__file__).resolve().parents[1]


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


def test_wordnet_tasks_are_built_from_the_pinned_debian_package():
    root = Path(resolve("oplora:wordnet-tasks"))
    source = json.loads((root / "SOURCE.json").read_text())
    assert source["sha256"] == ARTIFACTS["wordnet-base"].sha256 and source["artifact"] == "wordnet-base=1:3.0-37"
    net = wordnet.WordNet(artifacts.path("wordnet-base"))
    assert len(net.synsets) == 117659  # WordNet 3.0: 82,115 noun, 13,767 verb, 18,156 adjective, 3,621 adverb synsets
    dog = net.synsets["n", net.first_sense["dog", "n"]]
    assert dog.gloss.startswith("a member of the genus Canis") and "the dog barked all night" in dog.examples
    assert "canine" in wordnet.ancestor_words(net, dog) and "animal" in wordnet.ancestor_words(net, dog)
    docs = {name: jsonl(root / f"{name}.jsonl") for name in wordnet.TASKS}
    assert all(len(d) >= 1000 for d in docs.values())  # the selection measures 1,000 questions of each
    for rows in docs.values():
        for doc in rows:
            answer = doc["choices"][doc["label"]]
            others = [c for i, c in enumerate(doc["choices"]) if i != doc["label"]]
            assert len(set(doc["choices"])) == 4 and not set(others) & net.related(answer, pos(net, doc))
            assert answer not in wordnet.words(doc["prompt"]) and not set(others) & wordnet.words(doc["prompt"])
            assert "### Instruction" not in doc["prompt"]  # nothing of the fine-tuning prompt
    antonym = next(d for d in docs["wordnet_antonyms"] if d["prompt"] == "The opposite of beautiful is")
    assert antonym["choices"][antonym["label"]] == "ugly"
    used = {d["id"].split(".")[0] for rows in docs.values() for d in rows}
    held = jsonl(resolve("oplora:wordnet-heldout"))
    assert len(held) == 512 and all(len(h["text"]) >= 40 for h in held) and not {h["source"] for h in held} & used

    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=[str(root)], include_defaults=False)
    task = get_task_dict(["wordnet_hypernyms"], manager)["wordnet_hypernyms"]
    doc = task.test_docs()[0]
    assert task.doc_to_text(doc) == docs["wordnet_hypernyms"][0]["prompt"] and task.config.target_delimiter == " "
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == docs["wordnet_hypernyms"][0]["choices"][doc["label"]]


def pos(net, doc) -> str:
    """A question's part of speech: the synset its id names ("n01234567" or, for antonyms, "a01234567.2")."""
    return doc["id"][0] if doc["id"][0] != "s" else "a"


SIQA_EXAMPLE = {"input": "Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
                         "before this?",
                "target_scores": {"Make a new plan": 0, "Go home and see Riley": 0, "Find somewhere to go": 1}}


def bigbench_archive(path: Path) -> Path:
    """A bigbench-1.0.0.tar.gz of the release's layout with two tasks: social_iqa (one example merged to two
    choices, as BIG-bench did with 4) and a sorted binary task."""
    tasks = {"social_iqa": {"examples": [SIQA_EXAMPLE, {"input": "Alex sang. Why?", "target_scores": {"a": 1}}]},
             "strategyqa": {"task_prefix": "Answer. ", "examples": [
                 {"input": f"Is {i} even?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2)}}
                 for i in range(10)]}}
    with tarfile.open(path, "w:gz") as tar:
        for name, task in tasks.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(bigbench.MEMBER.format(name))
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_bigbench_tasks_come_only_from_a_supplied_archive(tmp_path, monkeypatch):
    """BIG-bench is optional: its archive, named by OPLORA_BIGBENCH_ARCHIVE and checked against the pin, becomes lm_eval
    tasks (SIQA through lm_eval's own social_iqa task). The archive here has the release's layout; the pin is its."""
    monkeypatch.setenv("OPLORA_CACHE", str(tmp_path / "cache"))
    archive = bigbench_archive(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setitem(ARTIFACTS, "bigbench", replace(ARTIFACTS["bigbench"], sha256=file_sha256(archive)))
    monkeypatch.setattr(bigbench, "ARCHIVE", ARTIFACTS["bigbench"])
    monkeypatch.setattr(bigbench, "CANDIDATES", ("social_iqa", "strategyqa"))
    monkeypatch.setenv("OPLORA_BIGBENCH_ARCHIVE", str(archive))
    root = Path(resolve("oplora:bigbench-tasks"))
    source = json.loads((root / "SOURCE.json").read_text())
    assert source["archive_sha256"] == file_sha256(archive) and source["tasks"]["social_iqa"]["documents"] == 1
    siqa = jsonl(root / "social_iqa.jsonl")
    assert siqa == [{"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
                     "question": "What does Tracy need to do before this?", "answerA": "Make a new plan",
                     "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3"}]
    strategy = jsonl(root / "strategyqa.jsonl")
    assert [d["prompt"] for d in strategy] != sorted(d["prompt"] for d in strategy)  # shuffled once, seeded
    number = lambda doc: int(doc["prompt"].split("Is ")[1].split()[0])  # noqa: E731
    assert all(d["choices"][d["label"]] == ("Yes" if number(d) % 2 == 0 else "No") for d in strategy)
    assert strategy[0]["prompt"].startswith("Answer. \nQ: Is ") and strategy[0]["prompt"].endswith("\nA:")

    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=[str(root)], include_defaults=False)
    task = get_task_dict(["bigbench_social_iqa"], manager)["bigbench_social_iqa"]
    doc = task.validation_docs()[0]
    # lm_eval's own social_iqa prompt, choices and target over this data
    assert task.doc_to_text(doc) == "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does " \
                                    "Tracy need to do before this?\nA:"
    assert task.doc_to_choice(doc) == ["Make a new plan", "Go home and see Riley", "Find somewhere to go"]
    assert task.doc_to_target(doc) == 2 and task.config.target_delimiter == " "


@pytest.mark.skipif(not os.environ.get("OPLORA_BIGBENCH_ARCHIVE"), reason="the BIG-bench archive is optional "
                    "(OPLORA_BIGBENCH_ARCHIVE); the registry dropped bigbench==1.0.0")
def test_the_real_bigbench_archive_gives_siqa_validation():
    root = Path(resolve("oplora:bigbench-tasks"))
    siqa = jsonl(root / "social_iqa.jsonl")
    # BIG-bench's social_iqa is SIQA's validation set: its first question is allenai/social_i_qa validation row 0
    assert len(siqa) == 1950 and siqa[0]["question"] == "What does Tracy need to do before this?"


def test_a_failed_fetch_leaves_the_results_directory_byte_identical(tmp_path):
    """The committed quick demo survives a run whose fetch fails: nothing but failed.json is written beside it."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "demo" / "quick", results)
    before = {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()}
    overrides = ["experiment=demo", "model.path=HuggingFaceTB/not-in-the-cache", f"pipeline.results_dir={results}",
                 f"output_dir={tmp_path}/runs/${{method.label}}/seed${{seed}}", "wandb=disabled"]
    report = run(compose(*overrides), overrides)
    assert "fetch" in report["failed"] and "collect" in report["failed"], summary(report)
    assert report["blocked"]["train"] and not report["ran"]["train"]
    after = {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()}
    failed = json.loads(after.pop(Path("failed.json")))
    assert after == before  # byte-identical
    assert "HuggingFaceTB/not-in-the-cache" in failed["steps"]["fetch"] and "make fetch" in failed["steps"]["fetch"]


def test_missing_forgetting_data_blanks_only_its_columns(data_files, tmp_path, monkeypatch):
    """The WordNet package cannot be had (a version the registry does not serve): training and the other columns go
    on, the WordNet columns show — with an error naming every place tried, and the complete table stays."""
    models = tiny_dir("llama").parent  # an empty cache but for the models (SmolLM2's conversion alone takes 20 s)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models)
    monkeypatch.setenv("OPLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPLORA_WORDNET_DEB", raising=False)
    monkeypatch.setitem(ARTIFACTS, "wordnet-base", replace(ARTIFACTS["wordnet-base"], version="1:3.0-999",
                                                           url=ARTIFACTS["wordnet-base"].url.replace("37", "999")))
    harness._include.cache_clear()
    overrides = ["experiment=demo", "model=tiny-llama", "pipeline.methods=[lora]", "pipeline.rho_ks=[8]",
                 "data.limit=8", "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4",
                 "eval.lm_eval.limit=4", f"pipeline.results_dir={tmp_path}/t",
                 f"output_dir={tmp_path}/runs/${{method.label}}/seed${{seed}}", "wandb=disabled"]
    try:
        report = run(compose(*overrides), overrides)
    finally:
        harness._include.cache_clear()
    assert report["ran"]["train"] == ["lora/seed1"] and report["ran"]["collect"] == ["all"], summary(report)
    assert "wordnet-base=1:3.0-999" in report["failed"]["fetch"] and "apt-get download" in report["failed"]["fetch"]
    assert "needed by columns Definitions, Hypernyms, Antonyms, Examples, KL ×100" in report["failed"]["fetch"]
    assert "Hugging Face" not in report["failed"]["fetch"]  # the real cause is named, not the hub
    assert report["failed"]["fetch"].count("Places tried") == 1  # one error per artifact, every place in it
    rows = json.loads((tmp_path / "t" / "collect.json").read_text())["rows"]
    assert rows["LoRA"]["Continents"] is not None and rows["Base"]["Continents"] is not None
    assert all(rows[m][c] is None for m in ("Base", "LoRA") for c in ("Definitions", "Antonyms", "KL ×100"))
    failure = json.loads((tmp_path / "runs" / "lora" / "seed1" / "failed" / "eval.json").read_text())
    assert failure["scope"] == {"kl": ["heldout"], "lm_eval": sorted(wordnet.TASKS)}
    assert "wordnet-base=1:3.0-999" in failure["error"]


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
