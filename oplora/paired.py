"""Paired differences between methods, with a bootstrap confidence interval over questions and seeds.

Every method is compared with a reference method (`pipeline.compare_to`, LoRA) on the same questions and seeds,
and the reference with the base model: per column, the mean over seeds and questions of (method − reference),
in the column's unit (points for accuracies), and a 95 % percentile interval from `B` bootstrap replicates, each
drawing the seeds and, independently per column, the questions with replacement (the same draw for both sides of
the pair). "Forget avg" is the mean of the forgetting columns' differences under the same draws. The per-question
values are the stages' own per-document records (lm_eval's samples, the KL stage's per-prompt scores).
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from oplora.io import CorruptFile, read_json
from oplora.rundir import RunDir
from oplora.tables import FORGET_AVG

B = 2000
SEED = 0
LEVEL = 0.95
Items = dict[int, dict[str, float]]  # seed -> question id -> value


def items(cfg, column) -> dict[str, float] | None:
    """{question id: the column's per-question value × scale} of one cell, from its stage's per-document records."""
    run = RunDir(cfg.output_dir)
    try:
        result = read_json(run.eval_result(column.stage))
    except CorruptFile:
        return None
    key = column.get("metric") or column.task
    metric, details = (result or {}).get("metrics", {}).get(key), (result or {}).get("details", {}).get(column.task)
    if not metric or not details or not details.get("samples"):
        return None
    field, scale, found = metric["metric"], column.get("scale", 100), {}
    try:
        with open(details["samples"], encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row.get("task", column.task) == column.task and field in row:
                    found[str(row["doc_id"])] = scale * float(row[field])
    except (OSError, ValueError):
        return None
    return found or None


def gather(cfg, cells: dict) -> dict[str, dict[str, Items]]:
    """{method display name: {column label: {seed: {question: value}}}} of every cell with per-question records."""
    out: dict[str, dict[str, Items]] = {}
    for cell_cfg in cells.values():
        for column in cfg.eval.columns:
            found = items(cell_cfg, column)
            if found is not None:
                out.setdefault(cell_cfg.method.display, {}).setdefault(column.label, {})[cell_cfg.seed] = found
    return out


def matrix(ours: Items, ref: Items) -> np.ndarray | None:
    """[seed, question] of ours − ref over the questions both have; a single-seed reference (the base row) is
    paired with every seed of ours."""
    if len(ref) == 1:
        seeds, only = sorted(ours), next(iter(ref.values()))
        side = lambda s: only  # noqa: E731
    else:
        seeds, side = sorted(set(ours) & set(ref)), ref.__getitem__
    if not seeds:
        return None
    questions = sorted(set.intersection(*(set(ours[s]) & set(side(s)) for s in seeds)))
    if not questions:
        return None
    return np.array([[ours[s][q] - side(s)[q] for q in questions] for s in seeds])


def bootstrap(diffs: dict[str, np.ndarray], forget: list[str], b: int = B, seed: int = SEED) -> dict[str, dict]:
    """Per column and for the forgetting average: {diff, low, high, seeds, questions, sd} (95 % percentile interval;
    sd: the standard deviation of the per-(seed, question) differences, for the power arithmetic in the README)."""
    rng = np.random.default_rng(seed)
    n_seeds = {m.shape[0] for m in diffs.values()}
    point = {c: float(m.mean()) for c, m in diffs.items()}
    averaged = [c for c in forget if c in diffs]
    if averaged and len(n_seeds) == 1:
        point[FORGET_AVG] = float(np.mean([point[c] for c in averaged]))
    draws: dict[str, list[float]] = {c: [] for c in point}
    s = n_seeds.pop() if len(n_seeds) == 1 else None
    for _ in range(b):
        picked = rng.integers(s, size=s) if s else None
        means = {}
        for c, m in diffs.items():
            rows = m[picked] if s else m[rng.integers(m.shape[0], size=m.shape[0])]
            means[c] = float(rows[:, rng.integers(m.shape[1], size=m.shape[1])].mean())
            draws[c].append(means[c])
        if FORGET_AVG in point:
            draws[FORGET_AVG].append(float(np.mean([means[c] for c in averaged])))
    tail = 100 * (1 - LEVEL) / 2
    out = {}
    for c, value in point.items():
        low, high = np.percentile(draws[c], [tail, 100 - tail])
        shape = diffs[c].shape if c in diffs else diffs[averaged[0]].shape
        out[c] = {"diff": value, "low": float(low), "high": float(high), "seeds": shape[0],
                  "questions": shape[1] if c in diffs else sum(diffs[a].shape[1] for a in averaged),
                  "sd": float(diffs[c].std(ddof=1)) if c in diffs and diffs[c].size > 1 else None}
    return out


def compare(cfg, cells: dict, reference: str, base: str | None) -> dict[str, dict[str, dict]]:
    """{"<method> − <reference>": {column: interval}} for every other method, and "<reference> − <base>"."""
    found = gather(cfg, cells)
    forget = [c.label for c in cfg.eval.columns if c.role == "forget"]
    if reference not in found:
        warnings.warn(f"paired differences: no per-question records for {reference}; none computed", stacklevel=2)
        return {}
    pairs = [(name, reference) for name in found if name not in (reference, base)]
    pairs += [(reference, base)] if base in found else []
    out = {}
    for ours, ref in pairs:
        diffs = {c: m for c in found[ours] if c in found[ref]
                 and (m := matrix(found[ours][c], found[ref][c])) is not None}
        if diffs:
            out[f"{ours} − {ref}"] = bootstrap(diffs, forget)
    return out


def to_markdown(pairs: dict[str, dict[str, dict]], columns: list[str], title: str) -> str:
    """One row per pair: each column's difference and its 95 % interval; * marks an interval that excludes 0."""
    labels = [c for c in [*columns, FORGET_AVG] if any(c in p for p in pairs.values())]
    lines = [f"**{title}**", "", "| Pair | " + " | ".join(labels) + " |", "|:--|" + "--:|" * len(labels)]
    for name, cols in pairs.items():
        cells = []
        for c in labels:
            r = cols.get(c)
            cells.append("—" if r is None else f"{r['diff']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"
                         + ("*" if r["low"] > 0 or r["high"] < 0 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
