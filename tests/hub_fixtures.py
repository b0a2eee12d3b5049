"""The hub repositories the paper's six table experiments download, served by `tests/fakehub.py` under their real ids
with a few rows each, in the real repos' schema (fields and types, config and split names, file layout and the
README `configs:` block of parquet repos).

- base models: meta-llama/Llama-2-7b-hf (gated, with a decoy .bin shard next to the safetensors) and Qwen/Qwen2.5-7B,
  tiny random models of the same architectures;
- training sets: zwhe99/commonsense_170k, meta-math/MetaMathQA, m-a-p/CodeFeedback-Filtered-Instruction;
- LoRA-Null's calibration corpus google-research-datasets/nq_open, the MATH test set
  DigitalLearningGmbH/MATH-lighteval;
- every dataset lm_eval 0.4.13 loads for boolq, piqa, social_iqa, hellaswag, winogrande, arc_easy, arc_challenge,
  openbookqa, mathqa, race and mbpp (the rows are valid for each task's doc_to_text / doc_to_choice / process_docs).

`mbpp_plus_release(n)` is a MbppPlus jsonl (evalplus 0.3.1's release schema) whose canonical solutions pass.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets import ClassLabel, Features, List, Value
from fakehub import Repo

Rows = list[dict]


def parquet(rows: Rows, features: Features | None = None) -> bytes:
    """Parquet bytes with the features in the schema metadata, as `Dataset.to_parquet` writes them."""
    buffer = io.BytesIO()
    pq.write_table(datasets.Dataset.from_list(rows, features=features).data.table, buffer)
    return buffer.getvalue()


def parquet_repo(repo_id: str, configs: dict[str, dict[str, Rows]], features: Features | None = None) -> Repo:
    """A repo as push_to_hub and the hub's parquet conversion write it: `<config>/<split>-00000-of-00001.parquet`
    (`data/` for the default config) and a README whose `configs:` block lists them."""
    files, card = {}, ["---", "configs:"]
    for name, splits in configs.items():
        directory = "data" if name == "default" else name
        card += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            files[f"{directory}/{split}-00000-of-00001.parquet"] = parquet(rows, features)
            card += [f"  - split: {split}", f"    path: {directory}/{split}-*"]
    files["README.md"] = "\n".join([*card, "---", ""]).encode()
    return Repo("dataset", repo_id, files)


def json_repo(repo_id: str, filename: str, rows: Rows, license_: str) -> Repo:
    """A repo holding one .json (a list of records) or .jsonl file and a README without configs."""
    lines = [json.dumps(r) for r in rows]
    text = "\n".join(lines) + "\n" if filename.endswith(".jsonl") else "[\n" + ",\n".join(lines) + "\n]"
    return Repo("dataset", repo_id, {filename: text.encode(), "README.md": f"---\nlicense: {license_}\n---\n".encode()})


def model_repo(repo_id: str, directory: Path, gated: bool = False, extra: dict[str, bytes] | None = None) -> Repo:
    return Repo("model", repo_id, {**{p.name: p for p in Path(directory).iterdir() if p.is_file()}, **(extra or {})},
                gated=gated)


# --- training sets ---------------------------------------------------------------------------------------------------

def commonsense_170k() -> Repo:
    items = [("Please choose the correct answer to the question: Where do you keep milk cold?\n\n"
              "Answer1: oven Answer2: fridge Answer3: drawer\n\nAnswer format: answer1/answer2/answer3", "answer2"),
             ("Please answer the following question with true or false, question: is the sun a star?\n\n"
              "Answer format: true/false", "true"),
             ("Please choose the correct solution to the question: To dry wet hands,\n\n"
              "Solution1: use a towel\n\nSolution2: use a sponge full of water\n\nAnswer format: solution1/solution2",
              "solution1"),
             ("Please choose the correct answer to fill in the blank to complete the given sentence: Tom gave Ann "
              "his coat because _ was cold.\n\nOption1: Tom\n\nOption2: Ann\n\nAnswer format: option1/option2",
              "option2")]
    rows = [{"instruction": q, "input": "", "output": f"the correct answer is {a}", "answer": a} for q, a in items * 2]
    return parquet_repo("zwhe99/commonsense_170k", {"default": {"train": rows}})


def metamathqa() -> Repo:
    rows = [{"type": kind, "query": f"What is {a} plus {b}?", "original_question": f"What is {a} plus {b}?",
             "response": f"We add {a} and {b} to get {a + b}.\nThe answer is: {a + b}"}
            for kind, a, b in [("GSM_Rephrased", 2, 3), ("MATH_AnsAug", 7, 5), ("GSM_SV", 10, 4), ("MATH_FOBAR", 6, 6),
                               ("GSM_AnsAug", 1, 8), ("MATH_Rephrased", 9, 9)]]
    return json_repo("meta-math/MetaMathQA", "MetaMathQA-395K.json", rows, "mit")


def codefeedback() -> Repo:
    items = [("python", "Write a Python function that returns the square of a number.",
              "```python\ndef square(x):\n    return x * x\n```"),
             ("javascript", "Write a JavaScript function that adds two numbers.",
              "```javascript\nfunction add(a, b) {\n  return a + b;\n}\n```"),
             ("python", "Reverse a string in Python.", "```python\ndef reverse(s):\n    return s[::-1]\n```"),
             ("sql", "Select every user older than 30.", "```sql\nSELECT * FROM users WHERE age > 30;\n```"),
             ("java", "Print hello in Java.",
              "```java\nclass Main {\n  public static void main(String[] a) {\n    System.out.println(\"hello\");\n"
              "  }\n}\n```"),
             ("python", "Sum a list of numbers in Python.", "```python\ndef total(xs):\n    return sum(xs)\n```"),
             ("c++", "Return the larger of two ints in C++.",
              "```cpp\nint larger(int a, int b) { return a > b ? a : b; }\n```")]
    rows = [{"query": q, "answer": a, "resource": resource, "lang": lang}
            for (lang, q, a), resource in zip(items, ["evol", "glaive", "sharegpt", "wizardcoder", "evol", "glaive",
                                                      "sharegpt"], strict=True)]
    return json_repo("m-a-p/CodeFeedback-Filtered-Instruction", "CodeFeedback-Filtered-Instruction.jsonl", rows,
                     "apache-2.0")


# --- calibration corpus and MATH -------------------------------------------------------------------------------------

PLACES = ["france", "japan", "kenya", "peru", "norway", "egypt", "canada", "india", "chile", "spain", "italy", "ghana",
          "brazil", "mexico", "china", "greece", "poland", "turkey", "cuba", "nepal", "iran", "iraq", "fiji", "mali",
          "chad"]
FORMS = ["what is the capital of {}", "who is the head of state of {}", "what currency is used in {}",
         "when did {} become independent", "what language is spoken in {}", "what is the largest city in {}",
         "how many people live in {}", "what is the highest mountain in {}"]


def nq_open() -> Repo:
    questions = [form.format(place) for form in FORMS for place in PLACES]  # 200
    rows = [{"question": q, "answer": [f"answer {i}"]} for i, q in enumerate(questions)]
    return parquet_repo("google-research-datasets/nq_open", {"nq_open": {"train": rows, "validation": rows[:8]}})


def math_lighteval() -> Repo:
    def row(a: int, b: int, kind: str, level: int) -> dict:
        return {"problem": f"Compute ${a} \\cdot {b}$.", "level": f"Level {level}", "type": kind,
                "solution": f"We multiply: ${a} \\cdot {b} = {a * b}$. The answer is $\\boxed{{{a * b}}}$."}

    kinds = ["Algebra", "Prealgebra", "Number Theory", "Counting & Probability"]
    return parquet_repo("DigitalLearningGmbH/MATH-lighteval", {"default": {
        "train": [row(a, a + 2, kinds[a % 4], a % 5 + 1) for a in range(2, 8)],
        "test": [row(a, a + 3, kinds[a % 4], a % 5 + 1) for a in range(3, 9)]}})


# --- lm_eval tasks ---------------------------------------------------------------------------------------------------

def super_glue_boolq() -> Repo:
    features = Features({"question": Value("string"), "passage": Value("string"), "idx": Value("int32"),
                         "label": ClassLabel(names=["False", "True"])})
    facts = [("is water wet", "Water makes things wet.", 1), ("is fire cold", "Fire is hot.", 0),
             ("do cats bark", "Cats meow; dogs bark.", 0), ("is paris in france", "Paris is the capital of France.", 1)]

    def rows(test: bool = False) -> Rows:
        return [{"question": q, "passage": p, "idx": i, "label": -1 if test else label}
                for i, (q, p, label) in enumerate(facts)]

    return parquet_repo("aps/super_glue", {"boolq": {"train": rows(), "validation": rows(), "test": rows(True)}},
                        features)


def piqa() -> Repo:
    items = [("To open a jar,", "twist the lid.", "hit it with a feather.", 0),
             ("To cool soup,", "heat it up.", "let it stand.", 1),
             ("To light a room,", "switch on the lamp.", "close the door.", 0),
             ("To keep bread fresh,", "leave it in the sun.", "store it in a bag.", 1)]
    rows = [{"goal": g, "sol1": s1, "sol2": s2, "label": label} for g, s1, s2, label in items]
    return parquet_repo("baber/piqa", {"default": {"train": rows, "validation": rows,
                                                   "test": [{**r, "label": -1} for r in rows]}})


def siqa() -> Repo:
    items = [("Alex gave Sam a gift.", "How would Sam feel?", "happy", "angry", "bored", "1"),
             ("Jo lost the keys.", "What will Jo want to do?", "sleep", "look for them", "sing", "2"),
             ("Kim won the race.", "How would Kim feel?", "sad", "tired", "proud", "3"),
             ("Lee cooked dinner.", "Why did Lee do this?", "to eat", "to run", "to swim", "1")]
    rows = [dict(zip(["context", "question", "answerA", "answerB", "answerC", "label"], item, strict=True))
            for item in items]
    return parquet_repo("lighteval/siqa", {"default": {"train": rows, "validation": rows}})


def hellaswag() -> Repo:
    items = [("Baking cookies", "A woman mixes flour and sugar in a bowl.", "she",
              ["puts the dough on a tray.", "drives a car [title] away.", "paints the wall.", "swims in a lake."], 0),
             ("Washing dishes", "A man fills the sink with water.", "he",
              ["reads a book.", "scrubs the plates.", "climbs a tree.", "flies a kite."], 1),
             ("Playing guitar", "A boy sits with a guitar.", "he",
              ["eats the guitar.", "sleeps.", "strums the strings.", "jumps rope."], 2),
             ("Running a marathon", "Runners line up at the start.", "they",
              ["sit down.", "go home.", "watch tv.", "start running when the gun fires."], 3)]

    def rows(split: str) -> Rows:
        return [{"ind": i, "activity_label": act, "ctx_a": a, "ctx_b": b, "ctx": f"{a} {b}", "endings": endings,
                 "source_id": f"activitynet~v_{i:05d}", "split": split, "split_type": "indomain",
                 "label": "" if split == "test" else str(label)}
                for i, (act, a, b, endings, label) in enumerate(items)]

    return parquet_repo("Rowan/hellaswag", {"default": {s: rows(s) for s in ("train", "validation", "test")}})


def winogrande() -> Repo:
    items = [("Sarah helped Maria because _ was kind.", "Sarah", "Maria", "1"),
             ("The trophy did not fit in the case because _ was too small.", "trophy", "case", "2"),
             ("John called Bill since _ needed advice.", "John", "Bill", "1"),
             ("The cup fell off the shelf because _ was slippery.", "table", "cup", "2")]
    rows = [dict(zip(["sentence", "option1", "option2", "answer"], item, strict=True)) for item in items]
    return parquet_repo("allenai/winogrande", {"winogrande_xl": {
        "train": rows, "validation": rows, "test": [{**r, "answer": ""} for r in rows]}})


def mc_rows(items: list[tuple[str, list[str], str]], question_field: str, prefix: str) -> Rows:
    """ARC / OpenBookQA rows: choices {text, label} with letter labels, answerKey a letter."""
    return [{"id": f"{prefix}_{i}", question_field: q, "choices": {"text": texts, "label": list("ABCD")[:len(texts)]},
             "answerKey": key} for i, (q, texts, key) in enumerate(items)]


MC_ITEMS = [("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
            ("What melts ice?", ["heat", "cold", "darkness", "sound"], "A"),
            ("Which is a mammal?", ["shark", "trout", "whale", "frog"], "C"),
            ("What does a thermometer measure?", ["mass", "length", "speed", "temperature"], "D")]


def ai2_arc() -> Repo:
    return parquet_repo("allenai/ai2_arc", {
        config: {split: mc_rows(MC_ITEMS, "question", f"{config}-{split}") for split in ("train", "test", "validation")}
        for config in ("ARC-Challenge", "ARC-Easy")})


def openbookqa() -> Repo:
    return parquet_repo("allenai/openbookqa", {"main": {
        split: mc_rows(MC_ITEMS, "question_stem", split) for split in ("train", "validation", "test")}})


def math_qa() -> Repo:
    def row(a: int, b: int) -> dict:
        options = [a + b, a + b + 1, a * b, a - b, 0]
        return {"Problem": f"what is {a} plus {b} ?", "Rationale": f"\"{a} + {b} = {a + b} answer : a\"",
                "options": " , ".join(f"{letter} ) {o}" for letter, o in zip("abcde", options, strict=True)),
                "correct": "a", "annotated_formula": f"add({a}, {b})", "linear_formula": "add(n0,n1)|",
                "category": "general"}

    rows = [row(a, a + 5) for a in range(10, 14)]
    return parquet_repo("regisss/math_qa", {"default": {"train": rows, "validation": rows, "test": rows}})


def race() -> Repo:
    article = "Tom lives in a small town. Every morning he walks his dog to the park and buys bread for breakfast."
    problems = [{"answer": "A", "options": ["his dog", "his cat", "a bird", "a horse"],
                 "question": "What does Tom walk every morning?"},
                {"answer": "C", "options": ["milk", "eggs", "bread", "fish"], "question": "Tom buys  _  ."},
                {"answer": "B", "options": ["a city", "a small town", "a farm", "a ship"],
                 "question": "Where does Tom live?"}]
    rows = [{"article": article, "problems": repr(problems[: i + 1])} for i in range(len(problems))]
    return parquet_repo("EleutherAI/race", {"high": {"test": rows}})


MBPP_FEATURES = Features({"task_id": Value("int32"), "text": Value("string"), "code": Value("string"),
                          "test_list": List(Value("string")), "test_setup_code": Value("string"),
                          "challenge_test_list": List(Value("string"))})
# (MBPP+ id, entry point, text, code, arguments of the asserts, more arguments for MBPP+)
PROBLEMS = [
    (3, "is_not_prime", "Write a python function to identify non-prime numbers.",
     "import math\ndef is_not_prime(n):\n    if n < 2:\n        return True\n"
     "    for i in range(2, int(math.sqrt(n)) + 1):\n        if n % i == 0:\n            return True\n"
     "    return False\n",
     [[2], [10], [35], [37]], [[1], [97], [100]]),
    (4, "heap_queue_largest", "Write a function to find the n largest integers from a given list of numbers, returned "
     "in descending order.",
     "import heapq as hq\ndef heap_queue_largest(nums, n):\n    return hq.nlargest(n, nums)\n",
     [[[25, 35, 22, 85, 14, 65, 75, 22, 58], 3], [[25, 35, 22, 85, 14, 65, 75, 22, 58], 2], [[1, 5, 3], 1]],
     [[[9, 8, 7, 6], 4]]),
    (6, "differ_At_One_Bit_Pos", "Write a python function to check whether the two numbers differ at one bit "
     "position only or not.",
     "def differ_At_One_Bit_Pos(a, b):\n    x = a ^ b\n    return x != 0 and x & (x - 1) == 0\n",
     [[13, 9], [15, 8], [2, 4]], [[0, 1], [7, 7]]),
    (17, "square_perimeter", "Write a function that returns the perimeter of a square given its side length as input.",
     "def square_perimeter(a):\n    return 4 * a\n", [[10], [5], [4]], [[0], [123]]),
    (8, "square_nums", "Write a function to find squares of individual elements in a list.",
     "def square_nums(nums):\n    return [x ** 2 for x in nums]\n",
     [[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], [[10, 20, 30]], [[12, 15]]], [[[]], [[-3]]]),
]


def run(code: str, entry_point: str, args: list):
    scope: dict = {}
    exec(code, scope)  # our own canonical solutions, to write the expected values of the asserts
    return scope[entry_point](*args)


def asserts(entry_point: str, code: str, inputs: list[list]) -> list[str]:
    return [f"assert {entry_point}({', '.join(map(repr, args))}) == {run(code, entry_point, args)!r}"
            for args in inputs]


def mbpp() -> Repo:
    def rows(offset: int) -> Rows:
        return [{"task_id": offset + i, "text": text, "code": code, "test_list": asserts(entry, code, inputs)[:3],
                 "test_setup_code": "", "challenge_test_list": []}
                for i, (_, entry, text, code, inputs, _) in enumerate(PROBLEMS)]

    return parquet_repo("google-research-datasets/mbpp", {"full": {
        "train": rows(601), "test": rows(11), "validation": rows(511), "prompt": rows(1)}}, MBPP_FEATURES)


def mbpp_plus_release(n: int = len(PROBLEMS)) -> bytes:
    """The first `n` problems as MbppPlus jsonl (evalplus 0.3.1: task_id "Mbpp/<id>", a docstring prompt ending in one
    assert, base_input / plus_input argument lists, atol, contract, assertion)."""
    records = []
    for task_id, entry, text, code, inputs, plus in PROBLEMS[:n]:
        first = asserts(entry, code, inputs[:1])[0]
        records.append({"task_id": f"Mbpp/{task_id}", "prompt": f'"""\n{text}\n{first}\n"""\n', "entry_point": entry,
                        "canonical_solution": f"\n{code}", "base_input": inputs, "plus_input": plus, "atol": 0,
                        "contract": "", "assertion": "\n".join(asserts(entry, code, inputs))})
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def paper_repos(tiny_models: dict[str, Path]) -> list[Repo]:
    """Every repo the six table experiments download; `tiny_models` maps "llama" and "qwen2" to model directories."""
    decoy = {"pytorch_model-00001-of-00002.bin": bytes(range(256)) * 16}  # the real repo has .bin shards too
    return [model_repo("meta-llama/Llama-2-7b-hf", tiny_models["llama"], gated=True, extra=decoy),
            model_repo("Qwen/Qwen2.5-7B", tiny_models["qwen2"]),
            commonsense_170k(), metamathqa(), codefeedback(), nq_open(), math_lighteval(),
            super_glue_boolq(), piqa(), siqa(), hellaswag(), winogrande(), ai2_arc(), openbookqa(), math_qa(), race(),
            mbpp()]
