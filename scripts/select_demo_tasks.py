"""Choose the demo's forgetting tasks: measure the base model on every candidate and keep those it answers above chance
by at least 4 standard errors. Writes results/demo/task_selection.{json,md}.

    .venv/bin/python scripts/select_demo_tasks.py [questions per task, default 1000]

The candidates are the WordNet tasks (oplora/wordnet.py, from Debian's wordnet-base) and, when the BIG-bench archive
is at hand (OPLORA_BIGBENCH_ARCHIVE, oplora/artifacts.py), BIG-bench's English multiple-choice tasks
(oplora/bigbench.py).
"""

import json
import sys
from collections import Counter
from pathlib import Path

from oplora import artifacts, bigbench, wordnet
from oplora.evaluation.harness import evaluate_task, load_lm
from oplora.evaluation.target import Target
from oplora.io import atomic_write_text
from oplora.resources import resolve

RULE = ("metric >= chance + 4 * stderr, chance = the better of a uniform guess and always giving the most "
        "frequent answer")


def chance(docs: list[dict]) -> float:
    """The better of two answers that know nothing: a uniform guess over each document's choices, and always giving
    the most frequent correct answer (binary tasks with fixed answers such as Valid/Invalid are often unbalanced)."""
    uniform = sum(1 / len(d["choices"]) if "choices" in d else 1 / 3 for d in docs) / len(docs)
    answers = Counter(d["choices"][d["label"]] for d in docs if "choices" in d)
    return max(uniform, answers.most_common(1)[0][1] / len(docs) if answers else 0.0)


def candidates() -> dict[str, tuple[Path, str, dict]]:
    """{lm_eval task: (its YAML directory, its data file's stem, the directory's SOURCE.json)}: WordNet's tasks, and
    BIG-bench's when its archive can be had."""
    root = wordnet.build()
    found = {name: (root, name, json.loads((root / "SOURCE.json").read_text())) for name in wordnet.TASKS}
    try:
        root = bigbench.build()
    except artifacts.ArtifactUnavailable as err:
        print(f"BIG-bench candidates skipped: {err}", file=sys.stderr)
        return found
    source = json.loads((root / "SOURCE.json").read_text())
    return found | {f"bigbench_{name}": (root, name, source) for name in bigbench.CANDIDATES}


def select(model: str = "oplora:smollm2-135m-instruct", limit: int = 1000, metric: str = "acc_norm",
           out: Path = Path("results/demo/task_selection")) -> list[str]:
    """Measure the base model on the first `limit` questions of every candidate; keep the tasks where its
    `metric` is at least chance + 4 standard errors. Writes `<out>.json` and `<out>.md` after every task, and resumes
    from them (a task measured with the same model, metric, limit and data is not measured again); returns the kept
    tasks."""
    tasks = candidates()
    header = {"model": model, "metric": metric, "limit": limit, "rule": RULE}
    done = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    rows = {name: row for name, row in done.get("tasks", {}).items()
            if {k: done.get(k) for k in header} == header and row.get("source") == tasks.get(name, (0, 0, None))[2]}
    settings = {"include_path": sorted({str(root) for root, _, _ in tasks.values()}), "metrics": [metric],
                "num_fewshot": {}, "allow_code_execution": False, "batch_size": 8, "cpu_batch_size": 8,
                "add_bos_token": False, "sandbox": "none"}
    lm = load_lm(Target(resolve(model), None, "bfloat16"), settings, None)  # the demo evaluates in bfloat16
    for name, (root, stem, source) in tasks.items():
        if name in rows:
            continue
        docs = [json.loads(line) for line in open(root / f"{stem}.jsonl")][:limit]
        found = evaluate_task(lm, name, settings, limit, Path(out.parent / "selection-samples.jsonl"))
        result = found["metrics"][name]
        level = chance(docs)
        rows[name] = {"n": len(docs), "chance": level, metric: result["value"], "stderr": result["stderr"],
                      "acc": found["details"][name]["results"].get("acc,none"),
                      "z": (result["value"] - level) / result["stderr"],
                      "kept": result["value"] >= level + 4 * result["stderr"], "source": source}
        print(name, {k: v for k, v in rows[name].items() if k != "source"}, flush=True)
        write(out, header, rows)
    Path(out.parent / "selection-samples.jsonl").unlink(missing_ok=True)
    return write(out, header, rows)


def write(out: Path, header: dict, rows: dict) -> list[str]:
    """The record so far: `<out>.json` and its table `<out>.md`; the kept tasks."""
    model, metric, limit = header["model"], header["metric"], header["limit"]
    kept = [name for name, row in rows.items() if row["kept"]]
    record = {**header, "tasks": rows, "kept": kept}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2))
    lines = [f"# Forgetting-task candidates measured on the base model ({model}, first {limit} questions, {metric})",
             "", f"Kept: {RULE} (`scripts/select_demo_tasks.py`). Sources: each task's `source` in the JSON record.",
             "", f"| task | n | chance | {metric} | acc | stderr | z | kept |", "|:--|--:|--:|--:|--:|--:|--:|:--|"]
    lines += [f"| {name} | {r['n']} | {100 * r['chance']:.1f} | {100 * r[metric]:.1f} | {100 * (r['acc'] or 0):.1f} "
              f"| {100 * r['stderr']:.1f} | {r['z']:.1f} | {'yes' if r['kept'] else 'no'} |"
              for name, r in rows.items()]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return kept


if __name__ == "__main__":
    print("kept:", select(limit=int(sys.argv[1]) if sys.argv[1:] else 1000))
