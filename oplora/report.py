"""Collect an experiment's results into the paper's tables and figure 2, and log them to W&B (oplora.tracking).

A cell's column value is `eval/<stage>.json` → metrics[column.metric or column.task].value times the column's
`scale` (100: percent), averaged over seeds (a method with a missing seed shows "—", with a warning: never a value
computed from part of its cells). ρ_k comes from the cell's `diagnose.json`. Row names and colours
are the method configs' `display` and `color`; untrained rows (the base model) come first, unranked.
Beside the tables: `long.csv` (one row per cell × column, with its seed), per-method mean, std, stderr and n
over seeds in `collect.json` ("stats"), and `dashboard.png`, the W&B dashboard's panels drawn from these files.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass

from omegaconf import DictConfig

from oplora import dashboard, paired, spread, sweep, tables, tracking
from oplora.config import trains
from oplora.evaluation.cell import current_result, stage_tasks
from oplora.figures import Drift, figure2, paper_rho
from oplora.grid import is_sweep, sweep_lr
from oplora.io import CorruptFile, atomic_write_text, content_hash, file_sha256, read_json
from oplora.record import as_dict, cell_hash, provenance
from oplora.results import ResultsDir
from oplora.rundir import RunDir

log = logging.getLogger("oplora.report")


def cell_values(cfg: DictConfig) -> dict[str, float | None]:
    """{column label: percent or None} of one cell, from its current, readable, finite evaluation results."""
    run, results, values = RunDir(cfg.output_dir), {}, {}
    for column in cfg.eval.columns:
        if column.stage not in results:
            results[column.stage] = current_result(cfg, column.stage)
        metric = (results[column.stage] or {}).get("metrics", {}).get(column.get("metric") or column.task)
        value = metric and metric.get("value")
        if metric and not (isinstance(value, (int, float)) and math.isfinite(value)):
            warnings.warn(f"{run.eval_result(column.stage)}: {column.label} = {value} is not a number: shown as —",
                          stacklevel=2)
            value = None
        values[column.label] = column.get("scale", 100) * value if metric and value is not None else None
    return values


def cell_rho(cfg: DictConfig) -> dict[int, float] | None:
    """ρ_k on `pipeline.rho_module` of the cell's current adapter (None when missing, unreadable or stale)."""
    run = RunDir(cfg.output_dir)
    if {"train", "diagnose"} & set(run.failures()):
        return None
    try:
        found, record = read_json(run.diagnose), run.trained_record(cell_hash(cfg))
    except CorruptFile as err:
        warnings.warn(f"{err}: no ρ_k for this cell", stacklevel=2)
        return None
    if not found or not record or found.get("adapter_sha256") != record.get("adapter_sha256"):
        return None
    module = found.get("modules", {}).get(cfg.pipeline.rho_module)
    return {int(k): v for k, v in module["rho"].items()} if module else None


def cell_averages(cfg: DictConfig, values: dict[str, float | None]) -> dict[str, float | None]:
    """Fine-tuning, forgetting and all-column averages of one cell (None when a column is missing)."""
    return tables.averages([values[c.label] for c in cfg.eval.columns], [c.role for c in cfg.eval.columns])


def log_cell(cfg: DictConfig, points: list[dict] = ()) -> None:
    """The cell's W&B eval run (oplora.tracking.log_eval), with its current result files only, and in a sweep its
    points (their rows of points.csv) as history rows `frontier/*`."""
    values, rho, run = cell_values(cfg), cell_rho(cfg), RunDir(cfg.output_dir)
    files = [run.eval_result(stage) for stage in stage_tasks(cfg.eval.columns) if current_result(cfg, stage)]
    history = [{f"frontier/{k}": p[k] for k in ("step", "learning", "forgetting", "nll_increase", "forget_avg")}
               for p in points]
    tracking.log_eval(cfg, {**values, **cell_averages(cfg, values)}, rho or {}, files + [run.diagnose] * bool(rho),
                      history)


def row_label(cfg: DictConfig) -> str:
    """A cell's table row: its method's display name, and in a sweep its learning rate."""
    lr = sweep_lr(cfg)
    return cfg.method.display if lr is None else f"{cfg.method.display} (lr {lr:g})"


def method_rows(cfg: DictConfig, cells: dict, stats: dict) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """Per row (`row_label`), untrained reference rows first: its columns' means over seeds (from `stats`,
    oplora.spread: None when a seed is missing), ρ_k of its first seed, and its method config."""
    by_method: dict[str, list] = {}
    for cell_cfg in sorted(cells.values(), key=lambda c: trains(c.method)):  # stable: grid order otherwise
        by_method.setdefault(row_label(cell_cfg), []).append(cell_cfg)
    rows = {name: {c.label: stats[name][c.label]["mean"] for c in cfg.eval.columns} for name in by_method}
    rho = {name: found for name, group in by_method.items()
           if trains(group[0].method) and (found := cell_rho(group[0]))}
    return rows, rho, {name: group[0].method for name, group in by_method.items()}


def long_rows(cfg: DictConfig, cells: dict) -> list[dict]:
    """One row per cell × column (the table's columns, the three averages, ρ_k) with its seed (oplora.spread)."""
    rows = []
    for cell_cfg in sorted(cells.values(), key=lambda c: trains(c.method)):  # the table's row order
        values = cell_values(cell_cfg)
        entries = [(c.label, c.role, values[c.label]) for c in cfg.eval.columns]
        entries += [(key, "average", value) for key, value in cell_averages(cfg, values).items()]
        entries += [(f"rho/k{k}", "rho", value) for k, value in (cell_rho(cell_cfg) or {}).items()]
        rows += [{"experiment": cfg.experiment_name, "model": cfg.model.name, "data": cfg.data.name,
                  "method": cell_cfg.method.label, "label": row_label(cell_cfg), "seed": cell_cfg.seed,
                  "column": column, "role": role, "value": value} for column, role, value in entries]
    return rows


def loss_curves(cells: dict) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{method display name: {seed: [(step, training loss)]}} from the trained cells' run.json."""
    curves: dict[str, dict] = {}
    for cell_cfg in cells.values():
        record = RunDir(cell_cfg.output_dir).trained_record(cell_hash(cell_cfg)) if trains(cell_cfg.method) else None
        if record:
            curves.setdefault(row_label(cell_cfg), {})[cell_cfg.seed] = [
                (h["step"], h["loss"]) for h in record["log_history"] if "loss" in h]
    return curves


def input_hashes(cells: dict) -> dict[str, str | None]:
    """What a table is built from: every result file's content and every cell's current config hash, so a
    re-evaluation (even with the same settings) or a config change means a new table."""
    found = {}
    for cell_cfg in cells.values():
        run = RunDir(cell_cfg.output_dir)
        found[str(run.root)] = cell_hash(cell_cfg)
        for path in [*run.eval_results(), run.diagnose]:
            found[str(path)] = file_sha256(path) if path.exists() else None
    return found | sweep.inputs(cells)


def cell_failures(cells: dict) -> dict[str, str]:
    """{cell: "step: error"} of every step that failed for a cell (recorded in its run directory)."""
    return {cell.name: "; ".join(f"{step}: {error}" for step, error in failed.items())
            for cell, cell_cfg in cells.items() if (failed := RunDir(cell_cfg.output_dir).failures())}


@dataclass
class Summary:
    """What collect shows, summarised from the cells' run directories."""

    title: str
    columns: list[dict]
    long: list[dict]
    stats: dict
    rows: dict
    rho: dict
    methods: dict
    table: tables.Table
    failed: dict[str, str]
    key: str

    @property
    def empty(self) -> bool:
        return all(v is None for row in self.rows.values() for v in row.values())

    @property
    def complete(self) -> bool:
        return not self.failed and not self.table.missing()


def summarise(cfg: DictConfig, cells: dict) -> Summary:
    """The table, its spread over seeds, ρ_k and the failures of every cell; `key` hashes everything it depends on."""
    columns = [{"label": c.label, "role": c.role} for c in cfg.eval.columns]
    long = long_rows(cfg, cells)
    stats = spread.summarize(long)
    rows, rho, methods = method_rows(cfg, cells, stats)
    table = tables.build(columns, rows, reference=[name for name, m in methods.items() if not trains(m)],
                         spread={name: {c: s["std"] for c, s in stats[name].items()} for name in rows})
    failed = cell_failures(cells)
    key = content_hash({"inputs": input_hashes(cells), "columns": columns, "failed": failed,
                        "paper": cfg.pipeline.paper_table, "rows": {name: as_dict(m) for name, m in methods.items()},
                        "rho_module": cfg.pipeline.rho_module})
    title = f"{cfg.experiment_name}: {cfg.model.name} on {cfg.data.name} (seeds {list(cfg.pipeline.seeds)})"
    return Summary(title, columns, long, stats, rows, rho, methods, table, failed, key)


def collect(cfg: DictConfig, cells: dict) -> bool:
    """Tables (Markdown, LaTeX, CSV; beside the paper's when one matches), figure 2, W&B runs; whether it ran.

    Never destroys a result: after a failed once-step (fetch, svd) or with no result at all, nothing but
    failed.json is written; an incomplete table goes to `partial/` when a complete one is already there."""
    results = ResultsDir(cfg.pipeline.results_dir)
    summary = summarise(cfg, cells)
    steps = results.step_failures()
    print(tables.to_markdown(summary.table, title=f"{cfg.experiment_name}: {cfg.model.name} on {cfg.data.name}"))
    for cell, why in summary.failed.items():
        warnings.warn(f"{cell} failed ({why}): its cells are shown as —", stacklevel=2)
    if steps or summary.empty:
        results.write_failures(steps, summary.failed)
        why = "; ".join(f"{step} failed: {error}" for step, error in steps.items()) or "no cell has a result"
        raise RuntimeError(f"no table written ({why}); {results.root} is left as it was, the failures are in "
                           f"{results.failed}")
    out = results if summary.complete or not results.holds_complete_table() else results.partial
    done = out.collect_record()
    results.write_failures({}, summary.failed)
    if out is results:
        results.remove_partial()  # superseded by a complete table
    if done and done["hash"] == summary.key and out.figure2.with_suffix(".png").exists():
        log.info("%s is up to date", out.root)
        return False
    for row, column in summary.table.missing():
        warnings.warn(f"no result for {row} / {column}: shown as —", stacklevel=2)
    write(cfg, cells, summary, out)
    if out is results:
        print(f"tables, figure 2 and the dashboard written to {out.root}")
    else:
        print(f"{results.root} holds a complete table and is kept; this run's incomplete one is in {out.root}")
    if tracking.effective_mode(cfg.wandb.mode) != "disabled":
        points = sweep.collect_points(cfg, cells)[2] if is_sweep(cfg) else []
        for cell_cfg in cells.values():
            log_cell(cell_cfg, [p for p in points if (p["method"], p["lr"], p["seed"]) ==
                                (cell_cfg.method.label, sweep_lr(cell_cfg), cell_cfg.seed)])
        log_table(cfg, cells, summary.stats, out)
    return True


def write(cfg: DictConfig, cells: dict, summary: Summary, out: ResultsDir) -> None:
    """Every file of a results directory from a summary."""
    table, stats, rho, methods, title = summary.table, summary.stats, summary.rho, summary.methods, summary.title
    atomic_write_text(out.table.with_suffix(".md"), tables.to_markdown(table, title=title))
    atomic_write_text(out.table.with_suffix(".tex"), tables.to_latex(table, caption=title))
    atomic_write_text(out.table.with_suffix(".csv"), tables.to_csv(table))
    paper = cfg.pipeline.paper_table
    published = tables.paper_table(paper, summary.columns)[0] if paper else None
    if published is not None:
        atomic_write_text(out.paper, "\n\n".join([
            tables.to_markdown(published, title=f"The paper's {paper}"),
            tables.to_markdown(tables.difference(table, published), title=f"Ours − paper ({paper})", mark=False)]))
    colors = {name: method.get("color") for name, method in methods.items()}
    if rho:
        column = next((c for c in cfg.eval.columns if c.role == "drift"), None)
        drift = column and Drift(column.label, {m: stats[m][column.label]["mean"] for m in rho},
                                 {m: stats[m][column.label]["stderr"] for m in rho})
        figure2(rho, {name: table.forget_avg(name) for name in rho}, out.figure2, colors=colors,
                module=cfg.pipeline.rho_module, title=title, errors={m: stats[m]["forget_avg"]["stderr"] for m in rho},
                paper_rho=paper_rho(cfg.model.name, cfg.pipeline.rho_module),
                paper_forgetting={m: published.forget_avg(m) for m in published.rows} if published is not None else {},
                drift=drift)
    atomic_write_text(out.long, spread.to_csv(summary.long))
    if is_sweep(cfg):  # the frontier's matched-learning table is its comparison with the reference
        sweep.write(cfg, cells, out, {m.display: m.get("color") for m in methods.values()}, title)
    else:
        write_paired(cfg, cells, methods, out, title)
    dashboard.render(stats, loss_curves(cells), [c.label for c in cfg.eval.columns], out.dashboard, colors,
                     title=title)
    atomic_write_text(out.collected, json.dumps({"hash": summary.key, "rows": summary.rows, "stats": stats, "rho": rho,
                                                 "failed": summary.failed, "complete": summary.complete,
                                                 "paper_table": paper, **provenance()}, indent=2))


def reference_row(compare_to: str | None, methods: dict) -> str | None:
    """The row (display name) whose method config's label is `pipeline.compare_to`."""
    return next((name for name, m in methods.items() if m.label == compare_to), None)


def write_paired(cfg: DictConfig, cells: dict, methods: dict, out: ResultsDir, title: str) -> None:
    """Each method's paired difference to `pipeline.compare_to` (and that method's to the base row), with a
    t-interval over seeds and a bootstrap interval over questions conditional on the seeds (oplora.paired):
    `paired.json`, `paired.md`, printed."""
    reference = reference_row(cfg.pipeline.compare_to, methods)
    base = next((name for name, m in methods.items() if not trains(m)), None)
    if reference is None:  # compare_to null (grid() refuses a label that names no cell)
        return
    pairs = paired.compare(cfg, cells, reference, base)
    text = paired.to_markdown(pairs, [c.label for c in cfg.eval.columns],
                              f"Paired differences to {reference} ({paired.LEVEL:.0%} t-interval over seeds; "
                              f"bootstrap over questions conditional on the seeds): {title}")
    atomic_write_text(out.paired.with_suffix(".json"), json.dumps({"reference": reference, "base": base,
                                                                   "level": paired.LEVEL, "draws": paired.B,
                                                                   "intervals": paired.INTERVALS, "pairs": pairs},
                                                                  indent=2))
    atomic_write_text(out.paired.with_suffix(".md"), text)
    print(text)


def log_table(cfg: DictConfig, cells: dict, stats: dict[str, dict], out: ResultsDir) -> None:
    """The collect run (oplora.tracking.log_collect): per method the column means and the averages' mean ± s.e."""
    labels = [c.label for c in cfg.eval.columns]
    keys = ("finetune_avg", "forget_avg", "avg")
    columns = ["method", *labels, *keys, *(f"{k}_stderr" for k in keys), "seeds"]
    data = [[name, *(s[label]["mean"] for label in labels), *(s[k]["mean"] for k in keys),
             *(s[k]["stderr"] for k in keys), s["avg"]["n"]] for name, s in stats.items()]
    found = read_json(out.paired.with_suffix(".json"))
    tracking.log_collect(cfg, list(cells.values()), {"columns": columns, "data": data}, out.artifacts(),
                         (found or {}).get("pairs"))
    dashboard.publish(cfg)
