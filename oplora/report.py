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
from pathlib import Path

from omegaconf import DictConfig

from oplora import dashboard, paired, spread, tables, tracking
from oplora.config import trains
from oplora.figures import figure2, paper_rho
from oplora.io import CorruptFile, atomic_write_text, content_hash, file_sha256, read_json
from oplora.record import as_dict, cell_hash, provenance
from oplora.rundir import RunDir

log = logging.getLogger("oplora.report")


def stage_result(run: RunDir, stage: str, expected: str) -> dict | None:
    """A cell's result file of one stage, when it is readable and was computed for the cell's current config."""
    try:
        result = read_json(run.eval_result(stage))
    except CorruptFile as err:
        warnings.warn(f"{err}: its columns are shown as —", stacklevel=2)
        return None
    if result is not None and result.get("train_config_hash") != expected:
        warnings.warn(f"{run.eval_result(stage)} was computed for another config of this cell (stale): its columns "
                      "are shown as — until the cell is evaluated again", stacklevel=2)
        return None
    return result


def cell_values(cfg: DictConfig) -> dict[str, float | None]:
    """{column label: percent or None} of one cell, from its current, readable, finite evaluation results."""
    run, expected, results, values = RunDir(cfg.output_dir), cell_hash(cfg), {}, {}
    for column in cfg.eval.columns:
        if column.stage not in results:
            results[column.stage] = stage_result(run, column.stage, expected)
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


def log_cell(cfg: DictConfig) -> None:
    """The cell's W&B eval run (oplora.tracking.log_eval)."""
    values = cell_values(cfg)
    tracking.log_eval(cfg, {**values, **cell_averages(cfg, values)}, cell_rho(cfg) or {})


def method_rows(cfg: DictConfig, cells: dict, stats: dict) -> tuple[dict[str, dict], dict[str, dict], dict]:
    """Per method (its display name), untrained reference rows first: its columns' means over seeds (from
    `stats`, oplora.spread: None when a seed is missing), ρ_k of its first seed, and its method config."""
    by_method: dict[str, list] = {}
    for cell_cfg in sorted(cells.values(), key=lambda c: trains(c.method)):  # stable: grid order otherwise
        by_method.setdefault(cell_cfg.method.display, []).append(cell_cfg)
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
                  "method": cell_cfg.method.label, "label": cell_cfg.method.display, "seed": cell_cfg.seed,
                  "column": column, "role": role, "value": value} for column, role, value in entries]
    return rows


def loss_curves(cells: dict) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{method display name: {seed: [(step, training loss)]}} from the trained cells' run.json."""
    curves: dict[str, dict] = {}
    for cell_cfg in cells.values():
        record = RunDir(cell_cfg.output_dir).trained_record(cell_hash(cell_cfg)) if trains(cell_cfg.method) else None
        if record:
            curves.setdefault(cell_cfg.method.display, {})[cell_cfg.seed] = [
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
    return found


def cell_failures(cells: dict) -> dict[str, str]:
    """{cell: "step: error"} of every step that failed for a cell (recorded in its run directory)."""
    return {cell.name: "; ".join(f"{step}: {error}" for step, error in failed.items())
            for cell, cell_cfg in cells.items() if (failed := RunDir(cell_cfg.output_dir).failures())}


def collect(cfg: DictConfig, cells: dict) -> bool:
    """Tables (Markdown, LaTeX, CSV; beside the paper's when one matches), figure 2, W&B runs; whether it ran."""
    out = Path(cfg.pipeline.results_dir)
    columns = [{"label": c.label, "role": c.role} for c in cfg.eval.columns]
    long = long_rows(cfg, cells)
    stats = spread.summarize(long)
    rows, rho, methods = method_rows(cfg, cells, stats)
    table = tables.build(columns, rows, reference=[name for name, m in methods.items() if not trains(m)],
                         spread={name: {c: s["std"] for c, s in stats[name].items()} for name in rows})
    paper, failed = cfg.pipeline.paper_table, cell_failures(cells)
    key = content_hash({"inputs": input_hashes(cells), "columns": columns, "failed": failed, "paper": paper,
                        "rows": {name: as_dict(m) for name, m in methods.items()},
                        "rho_module": cfg.pipeline.rho_module})
    try:
        done = read_json(out / "collect.json")
    except CorruptFile as err:  # rewritten below
        log.warning("%s", err)
        done = None
    print(tables.to_markdown(table, title=f"{cfg.experiment_name}: {cfg.model.name} on {cfg.data.name}"))
    if done and done["hash"] == key and (out / "figure2.png").exists():
        log.info("%s is up to date", out)
        return False
    for cell, why in failed.items():
        warnings.warn(f"{cell} failed ({why}): its cells are shown as —", stacklevel=2)
    for row, column in table.missing():
        warnings.warn(f"no result for {row} / {column}: shown as —", stacklevel=2)
    title = f"{cfg.experiment_name}: {cfg.model.name} on {cfg.data.name} (seeds {list(cfg.pipeline.seeds)})"
    atomic_write_text(out / "table.md", tables.to_markdown(table, title=title))
    atomic_write_text(out / "table.tex", tables.to_latex(table, caption=title))
    atomic_write_text(out / "table.csv", tables.to_csv(table))
    published = tables.paper_table(paper, columns)[0] if paper else None
    if published is not None:
        atomic_write_text(out / "paper.md", "\n\n".join([
            tables.to_markdown(published, title=f"The paper's {paper}"),
            tables.to_markdown(tables.difference(table, published), title=f"Ours − paper ({paper})", mark=False)]))
    forgetting = {name: table.forget_avg(name) for name in rho}
    errors = {name: stats[name]["forget_avg"]["stderr"] for name in forgetting}
    drift = next((c for c in cfg.eval.columns if c.role == "drift"), None)
    drift = drift and (drift.label, {m: stats[m][drift.label]["mean"] for m in rho},
                       {m: stats[m][drift.label]["stderr"] for m in rho})
    colors = {name: method.get("color") for name, method in methods.items()}
    if rho:
        quoted = (paper_rho(cfg.model.name, cfg.pipeline.rho_module),
                  {name: published.forget_avg(name) for name in published.rows} if published is not None else {})
        figure2(rho, forgetting, out / "figure2", colors=colors, module=cfg.pipeline.rho_module, title=title,
                errors=errors, paper=quoted, drift=drift)
    atomic_write_text(out / "long.csv", spread.to_csv(long))
    write_paired(cfg, cells, methods, out, title)
    dashboard.render(stats, loss_curves(cells), [c.label for c in cfg.eval.columns], out / "dashboard", colors,
                     title=title)
    atomic_write_text(out / "collect.json", json.dumps({"hash": key, "rows": rows, "stats": stats, "rho": rho,
                                                        "failed": failed, "paper_table": paper, **provenance()},
                                                       indent=2))
    if tracking.effective_mode(cfg.wandb.mode) != "disabled":
        for cell_cfg in cells.values():
            log_cell(cell_cfg)
        log_table(cfg, cells, stats)
    print(f"tables, figure 2 and the dashboard written to {out}")
    return True


def write_paired(cfg: DictConfig, cells: dict, methods: dict, out: Path, title: str) -> None:
    """Each method's paired difference to `pipeline.compare_to` (and that method's to the base row), with
    bootstrap intervals (oplora.paired): `paired.json`, `paired.md`, printed."""
    names = {m.name: name for name, m in methods.items()}
    reference, base = names.get(cfg.pipeline.compare_to), next((n for n, m in methods.items() if not trains(m)), None)
    if reference is None:
        return
    pairs = paired.compare(cfg, cells, reference, base)
    text = paired.to_markdown(pairs, [c.label for c in cfg.eval.columns],
                              f"Paired differences, {paired.LEVEL:.0%} bootstrap interval over questions and seeds "
                              f"({paired.B} draws; * excludes 0): {title}")
    atomic_write_text(out / "paired.json", json.dumps({"reference": reference, "base": base, "level": paired.LEVEL,
                                                       "draws": paired.B, "pairs": pairs}, indent=2))
    atomic_write_text(out / "paired.md", text)
    print(text)


def log_table(cfg: DictConfig, cells: dict, stats: dict[str, dict]) -> None:
    """The collect run (oplora.tracking.log_collect): per method the column means and the averages' mean ± s.e."""
    out = Path(cfg.pipeline.results_dir)
    labels = [c.label for c in cfg.eval.columns]
    keys = ("finetune_avg", "forget_avg", "avg")
    columns = ["method", *labels, *keys, *(f"{k}_stderr" for k in keys), "seeds"]
    data = [[name, *(s[label]["mean"] for label in labels), *(s[k]["mean"] for k in keys),
             *(s[k]["stderr"] for k in keys), s["avg"]["n"]] for name, s in stats.items()]
    names = ("table.md", "table.tex", "table.csv", "long.csv", "collect.json", "figure2.png", "figure2.pdf",
             "dashboard.png", "paper.md", "paired.md", "paired.json")
    files = [out / f for f in names if (out / f).exists()]
    found = read_json(out / "paired.json") if (out / "paired.json").exists() else None
    tracking.log_collect(cfg, list(cells.values()), {"columns": columns, "data": data}, files,
                         (found or {}).get("pairs"))
    dashboard.publish(cfg)
