"""Paired differences between methods: a t-interval over seeds, and beside it a bootstrap over questions.

Every method is compared with a reference method (`pipeline.compare_to`, LoRA) on the same questions and seeds,
and the reference with the base model. Per column and seed s, d_s is the mean over questions of (method −
reference), in the column's unit (points for accuracies); the difference reported is the mean of the d_s over
the S seeds. Its interval is the t-interval over seeds, mean ± t_{0.975, S−1} · sd(d_s) / √S (S ≥ 2): a training
seed is the unit of replication, and only this interval gives the `*` (excludes 0). Beside it, the percentile
interval of B bootstrap draws over questions (one draw of question indices for every seed and both methods), the
seeds held fixed: how far the question sample alone moves the mean, conditional on these seeds. Every seed answers
the same questions, so the t-interval does not contain that uncertainty; read the two together. With one seed the
conditional interval is the only one, and there is no `*`. "Forget avg": per seed, the mean
of the forgetting columns' d_s, then the same two intervals. The per-question values are the stages' own
per-document records (lm_eval's samples, the KL stage's per-prompt scores).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from oplora.evaluation.cell import current_result
from oplora.tables import FORGET_AVG

B = 2000
SEED = 0
LEVEL = 0.95
Items = dict[int, dict[str, float]]  # seed -> question id -> value
INTERVALS = {
    "low, high": f"{LEVEL:.0%} t-interval over seeds of the per-seed mean differences, mean ± t(S−1)·sd/√S; "
                 "null with one seed; excludes_zero (*) when it and the conditional interval both exclude 0",
    "cond_low, cond_high": f"{LEVEL:.0%} percentile interval of {B} bootstrap draws over questions, conditional on "
                           "the seeds (the seeds held fixed)",
}
LEGEND = (f"Each cell: the mean difference over seeds, its {LEVEL:.0%} t-interval over seeds [low, high] (* when it "
          f"and the interval in parentheses both exclude 0), and in parentheses the {LEVEL:.0%} bootstrap interval "
          f"over questions ({B} draws), conditional on the seeds. With one seed there is no interval over seeds: only "
          "the conditional one, and no *.")


def items(cfg, column, read=current_result) -> dict[str, float] | None:
    """{question id: the column's per-question value × scale} of one cell, from its stage's per-document records;
    `read(cfg, stage)` gives the stage's result (the current one, as the table reads it)."""
    result = read(cfg, column.stage)
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


def gather(cfg, cells: dict, read=current_result) -> dict[str, dict[str, Items]]:
    """{method display name: {column label: {seed: {question: value}}}} of every cell with per-question records."""
    out: dict[str, dict[str, Items]] = {}
    for cell_cfg in cells.values():
        for column in cfg.eval.columns:
            found = items(cell_cfg, column, read)
            if found is not None:
                out.setdefault(cell_cfg.method.display, {}).setdefault(column.label, {})[cell_cfg.seed] = found
    return out


class Diffs(NamedTuple):
    """[seed, question] of (ours − ref): one row per seed in `seeds`, the same questions in every row."""
    seeds: list[int]
    values: np.ndarray


def matrix(ours: Items, ref: Items) -> Diffs | None:
    """ours − ref over the seeds and questions both have; a single-seed reference (the base row) is paired with
    every seed of ours."""
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
    return Diffs(seeds, np.array([[ours[s][q] - side(s)[q] for q in questions] for s in seeds]))


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """mean ± t_{(1+level)/2, n−1} · sd / √n (sd with n − 1) over `values`; None with fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def excludes_zero(interval: tuple[float, float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def percentile_interval(draws: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def resample_means(values: np.ndarray, rng: np.random.Generator, b: int) -> np.ndarray:
    """[b, row]: each row's mean over questions under b bootstrap draws of the question indices (columns), the same
    draw for every row."""
    n = values.shape[-1]
    counts = rng.multinomial(n, np.full(n, 1 / n), size=b)
    return counts @ np.atleast_2d(values).T / n


def summary(per_seed: dict[int, float], draws: np.ndarray, questions: int, sd: float | None) -> dict:
    """The JSON record of one difference: its per-seed values, both intervals (INTERVALS) and the sizes."""
    t = t_interval(list(per_seed.values()))
    cond = percentile_interval(draws)
    return {"diff": float(np.mean(list(per_seed.values()))), "low": t[0] if t else None, "high": t[1] if t else None,
            "excludes_zero": excludes_zero(t) and excludes_zero(cond), "cond_low": cond[0], "cond_high": cond[1],
            "seeds": len(per_seed),
            "per_seed": {str(s): float(d) for s, d in per_seed.items()}, "questions": questions, "sd": sd}


def intervals(diffs: dict[str, Diffs], forget: list[str], b: int = B, seed: int = SEED) -> dict[str, dict]:
    """Per column and for the forgetting average: `summary` (sd: the standard deviation of the per-(seed, question)
    differences, for the power arithmetic in the README; None for the average)."""
    rng = np.random.default_rng(seed)
    draws = {c: resample_means(d.values, rng, b) for c, d in diffs.items()}  # [b, seed]
    out = {c: summary(dict(zip(d.seeds, d.values.mean(axis=1), strict=True)), draws[c].mean(axis=1), d.values.shape[1],
                      float(d.values.std(ddof=1)) if d.values.size > 1 else None) for c, d in diffs.items()}
    averaged = [c for c in forget if c in diffs]
    common = sorted(set.intersection(*(set(diffs[c].seeds) for c in averaged))) if averaged else []
    if common:
        rows = {c: [diffs[c].seeds.index(s) for s in common] for c in averaged}
        per_seed = {s: float(np.mean([out[c]["per_seed"][str(s)] for c in averaged])) for s in common}
        mean_draws = np.mean([draws[c][:, rows[c]].mean(axis=1) for c in averaged], axis=0)
        out[FORGET_AVG] = summary(per_seed, mean_draws, sum(diffs[c].values.shape[1] for c in averaged), None)
    return out


def compare(cfg, cells: dict, reference: str, base: str | None, read=current_result) -> dict[str, dict[str, dict]]:
    """{"<method> − <reference>": {column: `summary`}} for every other method, and "<reference> − <base>"."""
    found = gather(cfg, cells, read)
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
            out[f"{ours} − {ref}"] = intervals(diffs, forget)
    return out


def signed(x: float) -> str:
    return f"{x:+.2f}"


def to_markdown(pairs: dict[str, dict[str, dict]], columns: list[str], title: str) -> str:
    """One row per pair: the seeds, and per column the difference, its t-interval over seeds (* when it excludes 0)
    and the bootstrap interval over questions conditional on the seeds (LEGEND)."""
    labels = [c for c in [*columns, FORGET_AVG] if any(c in p for p in pairs.values())]
    lines = [f"**{title}**", "", LEGEND, "", "| Pair | Seeds | " + " | ".join(labels) + " |",
             "|:--|--:|" + "--:|" * len(labels)]
    for name, cols in pairs.items():
        cells = []
        for c in labels:
            r = cols.get(c)
            over_seeds = "" if r is None or r["low"] is None else f" [{signed(r['low'])}, {signed(r['high'])}]"
            cells.append("—" if r is None else f"{signed(r['diff'])}{over_seeds}{'*' * r['excludes_zero']} "
                         f"({signed(r['cond_low'])}, {signed(r['cond_high'])})")
        seeds = sorted({r["seeds"] for r in cols.values()})
        lines.append(f"| {name} | {'/'.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
