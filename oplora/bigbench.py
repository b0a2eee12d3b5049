"""BIG-bench tasks served offline to lm_eval: optional forgetting benchmarks of the demo (`eval=demo_bigbench`).

The data is BIG-bench's own release, `bigbench==1.0.0` (a 358 MB sdist). The package registry dropped it in late
November 2026, so it is optional: a user who has the archive names it with OPLORA_BIGBENCH_ARCHIVE, and it is checked
against its pinned sha256 (`oplora.artifacts`; its dependencies are never installed). Each task's
`bigbench/benchmark_tasks/<task>/task.json` is read straight from the archive and written as jsonl with an lm_eval
task YAML beside it (`oplora:bigbench-tasks`); `SOURCE.json` records the archive's and every task file's sha256.

- `social_iqa` is the SIQA validation set (1,954 questions; the 4 whose duplicate answers BIG-bench merged into two
  choices are left out), served with lm_eval's own `social_iqa` task (its prompt, choices and target) over this data.
- every other task: multiple choice over the `target_scores` keys, after the prompt BIG-bench's own JSON tasks build
  (task prefix, "Q: " input, appended choices, "A:"), its examples shuffled once with a fixed seed.

`scripts/select_demo_tasks.py` measures the base model on every candidate (with the WordNet tasks of
`oplora.wordnet`, the demo's default forgetting benchmarks) and keeps the tasks it answers above chance by at least
4 standard errors (`results/demo/task_selection.md`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tarfile
from pathlib import Path

from oplora import artifacts
from oplora.cache import Cache
from oplora.demo_data import MC_TASK
from oplora.io import build_once, file_sha256

ARCHIVE = artifacts.ARTIFACTS["bigbench"]
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/{}/task.json"
VERSION = 4
CANDIDATES = (  # English multiple-choice tasks with short inputs, at most 7 choices and at least 200 questions
    "social_iqa", "strategyqa", "sports_understanding", "navigate", "winowhy", "epistemic_reasoning",
    "logical_fallacy_detection", "metaphor_boolean", "implicatures", "intent_recognition", "movie_recommendation",
    "ruin_names", "date_understanding", "disambiguation_qa", "anachronisms",
    "misconceptions", "physics",
)
SEED = 233
SIQA_SPLIT = re.compile(r"^(?P<context>.*[.!?\"'])\s+(?P<question>[^.!?]*\?)$", re.S)
SIQA_INCLUDE = "_siqa_lm_eval_yaml"  # lm_eval's own siqa.yaml, copied (no .yaml suffix: not a second task)
SIQA_TASK = """include: {include}
task: bigbench_social_iqa
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
training_split: null
validation_split: validation
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: {version}
"""


def read_tasks(names: set[str]) -> dict[str, tuple[dict, str]]:
    """{task: (its task.json, that file's sha256)} read from the archive in one pass."""
    import hashlib

    wanted = {MEMBER.format(name): name for name in names}
    found = {}
    with tarfile.open(artifacts.path(ARCHIVE.name)) as tar:
        for member in tar:
            if member.name in wanted:
                raw = tar.extractfile(member).read()
                found[wanted[member.name]] = (json.loads(raw), hashlib.sha256(raw).hexdigest())
    if missing := sorted(names - set(found)):
        raise KeyError(f"{ARCHIVE.filename} has no task.json for {missing}")
    return found


def answer(example: dict) -> str:
    return max(example["target_scores"], key=example["target_scores"].get)


def bigbench_prompt(task: dict, example: dict) -> str:
    """The prompt BIG-bench's JSON tasks build (zero-shot): task prefix, input prefix, input, the choices when the task
    appends them, output prefix (BIG-bench's defaults: "\\nQ: ", "\\nA: ", "\\n  choice: ")."""
    text = task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + example["input"]
    if task.get("append_choices_to_input", True):
        text += "".join(task.get("choice_prefix", "\n  choice: ") + c for c in example["target_scores"])
    return (text + task.get("example_output_prefix", "\nA: ")).strip()


def mc_docs(task: dict) -> list[dict]:
    """BIG-bench examples as {prompt, choices, label} (the correct choice: the highest target score), shuffled with a
    fixed seed (several tasks list their examples sorted by answer, and `limit` takes the first ones)."""
    docs = [{"prompt": bigbench_prompt(task, e), "choices": list(e["target_scores"]),
             "label": list(e["target_scores"]).index(answer(e))} for e in task["examples"]]
    random.Random(SEED).shuffle(docs)
    return docs


def siqa_docs(task: dict) -> list[dict]:
    """BIG-bench's social_iqa back in SIQA's schema (context, question, answerA–C, label "1"–"3"), as lm_eval's
    social_iqa task reads it. BIG-bench's input is SIQA's context and question joined by a space."""
    docs = []
    for e in task["examples"]:
        choices = list(e["target_scores"])
        if len(choices) != 3:  # two equal answers became one dict key: not SIQA's three choices any more
            continue
        parts = SIQA_SPLIT.match(e["input"].strip())
        docs.append({"context": parts["context"], "question": parts["question"],
                     **{f"answer{x}": c for x, c in zip("ABC", choices, strict=True)},
                     "label": str(choices.index(answer(e)) + 1)})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make(root: Path, final: Path) -> None:
    """Every candidate task into `root`; the YAMLs point at their data under `final`."""
    tasks = read_tasks(set(CANDIDATES))
    source = {"requirement": ARCHIVE.requirement, "archive": ARCHIVE.filename, "archive_sha256": ARCHIVE.sha256,
              "tasks": {}}
    for name in CANDIDATES:
        task, sha = tasks[name]
        docs = siqa_docs(task) if name == "social_iqa" else mc_docs(task)
        write_jsonl(root / f"{name}.jsonl", docs)
        origin = f"{ARCHIVE.requirement} {MEMBER.format(name).split('/', 1)[1]} sha256:{sha}"
        data = final / f"{name}.jsonl"
        task_yaml = (SIQA_TASK.format(data=data, version=VERSION, include=SIQA_INCLUDE) if name == "social_iqa"
                     else MC_TASK.format(name=f"bigbench_{name}", data=data, version=VERSION, delimiter=" "))
        (root / f"{name}.yaml").write_text(task_yaml + f"  source: {json.dumps(origin)}\n")
        source["tasks"][name] = {"member": MEMBER.format(name), "sha256": sha, "examples": len(task["examples"]),
                                 "documents": len(docs)}
    import lm_eval

    siqa_yaml = Path(lm_eval.__file__).parent / "tasks" / "siqa" / "siqa.yaml"
    shutil.copyfile(siqa_yaml, root / SIQA_INCLUDE)
    source["lm_eval_siqa_yaml"] = {"lm_eval": lm_eval.__version__, "sha256": file_sha256(siqa_yaml)}
    (root / "SOURCE.json").write_text(json.dumps(source, indent=2))


def build() -> Path:
    """The task directory (built once, atomically)."""
    root = Cache.default().bigbench / f"tasks-v{VERSION}"
    return build_once(root, lambda tmp: make(tmp, root), done="SOURCE.json")

