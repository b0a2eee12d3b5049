"""A learning-rate sweep and its learning–forgetting frontier (experiment=frontier, frontier_table4).

A sweep trains every method over its own grid of learning rates (`pipeline.lrs`: one cell per method × lr × seed,
oplora.grid) and evaluates each run at several points along training (`train.points`: fractions of its steps; the
adapter is exported at those steps by oplora.train into `points/step<N>/`, a run directory of its own, and the final
one is the cell's own). Each (method, lr, seed, step) is one point:
- learning: the fine-tuning column's gold answers (`pipeline.frontier.learning`): their mean log-likelihood gain over
  the base model, in nats (`learning_measure: gold_nll`, per question: log p_tuned(gold) − log p_base(gold)), or the
  column's own score (`score`);
- forgetting: the drift column (`pipeline.frontier.forgetting`, KL(base ‖ tuned) on held-out text), and beside it
  the NLL increase on the same text and the forgetting columns' average.
Per (method, seed) the frontier is the lower envelope of its points; the statistic is each method's forgetting at a
matched learning level, paired per seed with the reference method (`pipeline.compare_to`), with a t-interval over
seeds (oplora.frontier). Collect writes `frontier.png`/`.pdf`, `frontier.md`/`.json` and `points.csv`.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
from omegaconf import DictConfig, OmegaConf

from oplora import frontier
from oplora.config import trains
from oplora.evaluation.cell import current_result
from oplora.io import atomic_write_text, file_sha256
from oplora.paired import items
from oplora.record import cell_hash
from oplora.results import ResultsDir
from oplora.rundir import RunDir

POINT_COLUMNS = ("method", "label", "lr", "seed", "step", "learning", "score", "forgetting", "nll_increase",
                 "forget_avg")


def point_configs(cfg: DictConfig) -> list[DictConfig]:
    """The configs of a trained cell's evaluation points (its config with `output_dir` the point's run directory),
    from the steps its training recorded; none outside a sweep."""
    record = RunDir(cfg.output_dir).trained_record(cell_hash(cfg)) if trains(cfg.method) else None
    configs = []
    for step in (record or {}).get("points", []):
        point = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        point.output_dir = str(RunDir(cfg.output_dir).point(step).root)
        configs.append(point)
    return configs


def gold_loglik(cfg: DictConfig, column) -> dict[str, float] | None:
    """{question: the log-likelihood of its gold answer} of one point, from its lm_eval samples."""
    result = current_result(cfg, column.stage)
    details = (result or {}).get("details", {}).get(column.task)
    if not details or not details.get("samples"):
        return None
    found = {}
    with open(details["samples"], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("task", column.task) == column.task:
                found[str(row["doc_id"])] = float(row["responses"][int(row["target"])][0])
    return found


def settings(cfg: DictConfig) -> dict:
    """The frontier's columns, by label: learning, its measure, forgetting (the frontier's axis) and the target."""
    spec = cfg.pipeline.frontier
    labels = {c.label: c for c in cfg.eval.columns}
    for key in ("learning", "forgetting"):
        if spec[key] not in labels:
            raise ValueError(f"pipeline.frontier.{key}={spec[key]!r} is no column of eval.columns; valid: "
                             f"{', '.join(labels)}")
    if spec.learning_measure not in ("gold_nll", "score"):
        raise ValueError(f"pipeline.frontier.learning_measure={spec.learning_measure!r}; valid: gold_nll, score")
    return {"learning": labels[spec.learning], "measure": spec.learning_measure,
            "forgetting": labels[spec.forgetting], "target": spec.get("target")}


def aligned(values: dict[str, float], ids: list[str]) -> np.ndarray:
    return np.array([values[i] for i in ids], dtype=float)


def learning_items(cfg: DictConfig, spec: dict, base: dict[str, float], ids: list[str]) -> np.ndarray | None:
    """Per question of the learning column: the log-likelihood gain of the gold answer over the base model, or the
    question's score."""
    found = gold_loglik(cfg, spec["learning"]) if spec["measure"] == "gold_nll" else items(cfg, spec["learning"])
    if not found or not set(ids) <= set(found):
        return None
    return aligned(found, ids) - (aligned(base, ids) if spec["measure"] == "gold_nll" else 0.0)


def collect_points(cfg: DictConfig, cells: dict) -> tuple[list[frontier.Point], frontier.Origin, list[dict]]:
    """Every evaluated point of the sweep (method display name, lr, seed, step), the base model as the origin, and
    the points' rows for points.csv (with the secondary forgetting measures)."""
    spec = settings(cfg)
    base_cfg = next((c for c in cells.values() if not trains(c.method)), None)
    if base_cfg is None:
        raise ValueError("a frontier needs the base model's row (pipeline.base=true): it is every frontier's origin")
    reader = gold_loglik if spec["measure"] == "gold_nll" else items
    base = reader(base_cfg, spec["learning"])
    if not base:
        raise ValueError(f"the base model has no current {spec['learning'].label} result: evaluate it first")
    ids = sorted(base)
    drift_ids = None
    points, rows = [], []
    for cell_cfg in (c for c in cells.values() if trains(c.method)):
        record = RunDir(cell_cfg.output_dir).trained_record(cell_hash(cell_cfg))
        if record is None:
            continue
        steps = [*record.get("points", []), record["steps"]]
        for step, point_cfg in zip(steps, [*point_configs(cell_cfg), cell_cfg], strict=True):
            learned = learning_items(point_cfg, spec, base, ids)
            forgot = items(point_cfg, spec["forgetting"])
            if learned is None or not forgot:
                continue
            drift_ids = drift_ids or sorted(forgot)
            if not set(drift_ids) <= set(forgot):
                continue
            point = frontier.Point.from_items(cell_cfg.method.display, float(cell_cfg.train.lr), step, cell_cfg.seed,
                                              learned, aligned(forgot, drift_ids))
            points.append(point)
            rows.append(point_row(point_cfg, cell_cfg, point, spec))
    origin = frontier.NLL_GAIN if spec["measure"] == "gold_nll" else frontier.Origin(
        float(np.mean(aligned(base, ids))), aligned(base, ids))
    return points, origin, rows


def point_row(point_cfg: DictConfig, cell_cfg: DictConfig, point: frontier.Point, spec: dict) -> dict:
    """One row of points.csv: the point's learning and its three forgetting measures (in the table's units)."""
    result = current_result(point_cfg, spec["forgetting"].stage) or {}
    nll = result.get("metrics", {}).get(f"{spec['forgetting'].task}_nll", {}).get("value")
    forget = [c for c in point_cfg.eval.columns if c.role == "forget"]
    scores = []
    for column in forget:
        metric = (current_result(point_cfg, column.stage) or {}).get("metrics", {}).get(column.get("metric")
                                                                                         or column.task)
        scores.append(None if metric is None else column.get("scale", 100) * metric["value"])
    learning_metric = (current_result(point_cfg, spec["learning"].stage) or {}).get("metrics", {}).get(
        spec["learning"].get("metric") or spec["learning"].task)
    return {"method": cell_cfg.method.label, "label": point.method, "lr": point.lr, "seed": point.seed,
            "step": point.step, "learning": point.learning,
            "score": None if learning_metric is None else 100 * learning_metric["value"],
            "forgetting": point.forgetting,
            "nll_increase": None if nll is None else spec["forgetting"].get("scale", 100) * nll,
            "forget_avg": None if not scores or None in scores else sum(scores) / len(scores)}


def inputs(cells: dict) -> dict[str, str | None]:
    """The points' result files and their content hashes (what the frontier is computed from)."""
    found = {}
    for cell_cfg in cells.values():
        for point_cfg in point_configs(cell_cfg):
            for path in RunDir(point_cfg.output_dir).eval_results():
                found[str(path)] = file_sha256(path)
    return found


def write(cfg: DictConfig, cells: dict, out: ResultsDir, colors: dict[str, str | None], title: str) -> None:
    """The frontier figure, the matched-learning table and points.csv of a sweep."""
    spec = settings(cfg)
    points, origin, rows = collect_points(cfg, cells)
    if not points:
        raise ValueError("no evaluated point of the sweep: nothing to draw")
    reference = next(c.method.display for c in cells.values() if c.method.label == cfg.pipeline.compare_to)
    target = frontier.target_level(points, reference, spec["target"])
    table = frontier.matched(points, reference, target, origin)
    unit = "gold-answer log-likelihood gain over the base model (nats)" if spec["measure"] == "gold_nll" \
        else f"{spec['learning'].label} (score)"
    frontier.frontier_figure(points, out.frontier, colors, target.level, origin, title=title,
                             learning_label=f"learning: {spec['learning'].label}, {unit}",
                             forgetting_label=f"forgetting: {spec['forgetting'].label}")
    atomic_write_text(out.frontier.with_suffix(".md"), frontier.to_markdown(
        table, f"Forgetting ({spec['forgetting'].label}) at matched learning ({spec['learning'].label}, {unit}): "
               f"{title}"))
    atomic_write_text(out.frontier.with_suffix(".json"), json.dumps(
        {"learning": spec["learning"].label, "measure": spec["measure"], "forgetting": spec["forgetting"].label,
         "matched": table, "points": rows}, indent=2))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=POINT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out.points, text.getvalue())
    print(out.frontier.with_suffix(".md").read_text())
