import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["WANDB_MODE"] = "offline"  # tests never reach a W&B server, whatever the shell says (disabled stays)

import pytest  # noqa: E402

from helpers import start_cluster  # noqa: E402
from oplora.demo_data import MC_TASK  # noqa: E402
from oplora.models import smollm2_dir, tiny_dir  # noqa: E402
from oplora.svd import SVDCache  # noqa: E402

ARCHS = ("llama", "qwen2")


@pytest.fixture(scope="session")
def svd(tmp_path_factory) -> SVDCache:
    return SVDCache(tmp_path_factory.mktemp("svd-cache"))


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    """Plain-text calibration corpus: short factual questions separated by blank lines."""
    path = tmp_path_factory.mktemp("calibration") / "questions.txt"
    countries = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "India", "Chile", "Spain"]
    docs = [f"what is the capital of {c}? who wrote the national anthem of {c}?" for c in countries * 8]
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dirs():
    """Tiny model directories; the rank tests rely on v_proj being 32×64 (2 KV heads of 16)."""
    dirs = {a: tiny_dir(a) for a in ARCHS}
    for directory in dirs.values():
        config = json.loads((directory / "config.json").read_text())
        assert (config["hidden_size"], config["num_key_value_heads"], config["num_attention_heads"]) == (64, 2, 4)
    return dirs


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_dir()


RECORDS = {  # one real-schema record per training set (SPEC §2); the tests vary the numbers
    "commonsense170k": lambda i: {
        "instruction": f"Please choose the correct answer to the question: Which is heavier, {i} kg of iron or "
                       f"{i + 1} kg of feathers?\n\nAnswer1: iron Answer2: feathers\n\nAnswer format: answer1/answer2",
        "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
    "metamath100k": lambda i: {
        "type": "GSM_Rephrased", "query": f"What is {i} plus {2 * i}?", "original_question": "",
        "response": f"{i} plus {2 * i} is {3 * i}.\nThe answer is: {3 * i}"},
    "codefeedback": lambda i: {
        "query": f"Write a Python function that returns {i} times its argument.",
        "answer": f"```python\ndef times_{i}(x):\n    return {i} * x\n```",
        "lang": "javascript" if i % 4 == 3 else "python"},  # 36 of 48 in the Python subset
}


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """{data config name: local jsonl path} with 48 records in each dataset's real schema."""
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for name, record in RECORDS.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(record(i)) + "\n" for i in range(48)))
    return paths


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Canada", "Ottawa"), ("India", "New Delhi")]


@pytest.fixture(scope="session")
def tasks(tmp_path_factory):
    """Two local multiple-choice lm_eval tasks (YAML + jsonl): capitals and sums."""
    root = tmp_path_factory.mktemp("tasks")
    rows = {
        "toy_capitals": [{"prompt": f"Question: What is the capital of {c}?\nAnswer:", "label": i % 3,
                          "choices": [(cap if j == i % 3 else CAPITALS[(i + j + 1) % 10][1]) for j in range(3)]}
                         for i, (c, cap) in enumerate(CAPITALS)],
        "toy_sums": [{"prompt": f"Question: What is {i} plus {i + 2}?\nAnswer:", "label": i % 2,
                      "choices": [str(2 * i + 2), str(2 * i + 5)][:: 1 if i % 2 == 0 else -1]} for i in range(8)],
    }
    for name, records in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (root / f"{name}.yaml").write_text(MC_TASK.format(name=name, data=root / f"{name}.jsonl", version=1,
                                                          delimiter=" "))
    return root


@pytest.fixture(scope="session")
def cluster():
    """The local cluster; skip with the script's message when it cannot run."""
    reason = start_cluster()
    if reason:
        pytest.skip(reason)
