"""Choose the demo's forgetting tasks: measure the base model on every BIG-bench candidate (oplora/bigbench.py) and
keep those it answers above chance by at least 4 standard errors. Writes results/demo/task_selection.{json,md}.

    .venv/bin/python scripts/select_demo_tasks.py [questions per task, default 300]
"""

import json
import sys
from collections import Counter
from pathlib import Path

from oplora import bigbench
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


def select(model: str = "oplora:smollm2-135m-instruct", limit: int = 300, metric: str = "acc_norm",
           out: Path = Path("results/demo/task_selection")) -> list[str]:
    """Measure the base model on the first `limit` questions of every candidate; keep the tasks where its
    `metric` is at least chance + 4 standard errors. Writes `<out>.json` and `<out>.md` after every task, and resumes
    from them (a task measured with the same model, metric, limit and data is not measured again); returns the kept
    tasks."""
    root = bigbench.build()
    source = json.loads((root / "SOURCE.json").read_text())
    header = {"model": model, "metric": metric, "limit": limit, "rule": RULE, "source": source}
    done = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    rows = {name: row for name, row in done.get("tasks", {}).items()
            if {k: done.get(k) for k in header} == header and name in bigbench.CANDIDATES}
    settings = {"include_path": [str(root)], "metrics": [metric], "num_fewshot": {}, "allow_code_execution": False,
                "batch_size": 8, "cpu_batch_size": 8, "add_bos_token": False, "sandbox": "none"}
    lm = load_lm(Target(resolve(model), None, "bfloat16"), settings, None)  # the demo evaluates in bfloat16
    for name in bigbench.CANDIDATES:
        if name in rows:
            continue
        docs = [json.loads(line) for line in open(root / f"{name}.jsonl")][:limit]
        found = evaluate_task(lm, f"bigbench_{name}", settings, limit, Path(out.parent / "selection-samples.jsonl"))
        result = found["metrics"][f"bigbench_{name}"]
        level = chance(docs)
        rows[name] = {"n": len(docs), "chance": level, metric: result["value"], "stderr": result["stderr"],
                      "acc": found["details"][f"bigbench_{name}"]["results"].get("acc,none"),
                      "z": (result["value"] - level) / result["stderr"],
                      "kept": result["value"] >= level + 4 * result["stderr"]}
        print(name, rows[name], flush=True)
        write(out, header, rows)
    Path(out.parent / "selection-samples.jsonl").unlink(missing_ok=True)
    return write(out, header, rows)


def write(out: Path, header: dict, rows: dict) -> list[str]:
    """The record so far: `<out>.json` and its table `<out>.md`; the kept tasks."""
    model, metric, limit = header["model"], header["metric"], header["limit"]
    kept = [name for name, row in rows.items() if row["kept"]]
    record = {**header, "tasks": rows, "kept": kept}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2))
    lines = [f"# BIG-bench tasks measured on the base model ({model}, first {limit} questions, {metric})", "",
             f"Kept: {RULE} (`scripts/select_demo_tasks.py`).", "",
             f"| task | n | chance | {metric} | acc | stderr | z | kept |", "|:--|--:|--:|--:|--:|--:|--:|:--|"]
    lines += [f"| {name} | {r['n']} | {100 * r['chance']:.1f} | {100 * r[metric]:.1f} | {100 * (r['acc'] or 0):.1f} "
              f"| {100 * r['stderr']:.1f} | {r['z']:.1f} | {'yes' if r['kept'] else 'no'} |"
              for name, r in rows.items()]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return kept


if __name__ == "__main__":
    print("kept:", select(limit=int(sys.argv[1]) if sys.argv[1:] else 300))
