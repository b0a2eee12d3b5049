"""Collect an experiment's results into the paper's tables and figure 2, and log them to W&B (oplora.tracking).

A cell's column value is `eval/<stage>.json` → metrics[column.metric or column.task].value in
percent, averaged over seeds (a method with a missing seed shows "—", with a warning: never a value
computed from part of its cells). ρ_k comes from the cell's `diagnose.json`. Beside the tables: `long.csv` (one row
per cell × column, with its seed), per-method mean, std, stderr and n over seeds in `collect.json` ("stats"),
and `dashboard.png`, the W&B dashboard's panels drawn from these files.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from statistics import mean

from omegaconf import DictConfig

from oplora import dashboard, spread, tables, tracking
from oplora.figures import figure2
from oplora.io import atomic_write_text
from oplora.record import content_hash, provenance

log = logging.getLogger("oplora.report")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def cell_values(cfg: DictConfig) -> dict[str, float | None]:
    """{column label: percent or None} of one cell, from its evaluation result files."""
    values = {}
    for column in cfg.eval.columns:
        result = read_json(Path(cfg.output_dir) / "eval" / f"{column.stage}.json")
        metric = (result or {}).get("metrics", {}).get(column.get("metric") or column.task)
        values[column.label] = 100 * metric["value"] if metric else None
    return values


def cell_rho(cfg: DictConfig) -> dict[int, float] | None:
    found = read_json(Path(cfg.output_dir) / "diagnose.json")
    module = (found or {}).get("modules", {}).get(cfg.pipeline.rho_module)
    return {int(k): v for k, v in module["rho"].items()} if module else None


def averages(cfg: DictConfig, values: dict[str, float | None]) -> dict[str, float | None]:
    """Fine-tuning, forgetting and all-column averages (None when a column is missing)."""
    out = {}
    for key, roles in (("finetune_avg", ("finetune",)), ("forget_avg", ("forget",)), ("avg", ("finetune", "forget"))):
        cells = [values[c.label] for c in cfg.eval.columns if c.role in roles]
        out[key] = mean(cells) if cells and None not in cells else None
    return out


def log_cell(cfg: DictConfig) -> None:
    """The cell's W&B eval run (oplora.tracking.log_eval)."""
    values = cell_values(cfg)
    tracking.log_eval(cfg, {**values, **averages(cfg, values)}, cell_rho(cfg) or {})


def method_rows(cfg: DictConfig, configs: dict) -> tuple[dict[str, dict], dict[str, dict[int, float]]]:
    """Per method (display name): column values averaged over seeds, and ρ_k of the first seed."""
    by_method: dict[str, list] = {}
    for cell, cell_cfg in configs.items():
        by_method.setdefault(cell.method, []).append(cell_cfg)
    rows, rho = {}, {}
    for method in (["base"] if "base" in by_method else []) + [m for m in by_method if m != "base"]:
        runs = [cell_values(c) for c in by_method[method]]
        name = tables.DISPLAY.get(method, method)
        rows[name] = {c.label: (mean(r[c.label] for r in runs) if all(r[c.label] is not None for r in runs)
                                else None) for c in cfg.eval.columns}
        if method != "base" and (found := cell_rho(by_method[method][0])):
            rho[name] = found
    return rows, rho


def long_rows(cfg: DictConfig, configs: dict) -> list[dict]:
    """One row per cell × column (the table's columns, the three averages, ρ_k) with its seed (oplora.spread)."""
    rows = []
    for cell_cfg in sorted(configs.values(), key=lambda c: c.method.name != "base"):  # the table's row order
        values = cell_values(cell_cfg)
        entries = [(c.label, c.role, values[c.label]) for c in cfg.eval.columns]
        entries += [(key, "average", value) for key, value in averages(cfg, values).items()]
        entries += [(f"rho/k{k}", "rho", value) for k, value in (cell_rho(cell_cfg) or {}).items()]
        method = cell_cfg.method.label
        rows += [{"experiment": cfg.experiment_name, "model": cfg.model.name, "data": cfg.data.name, "method": method,
                  "label": tables.DISPLAY.get(method, method), "seed": cell_cfg.seed, "column": column, "role": role,
                  "value": value} for column, role, value in entries]
    return rows


def loss_curves(configs: dict) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{method display name: {seed: [(step, training loss)]}} from the trained cells' run.json."""
    curves: dict[str, dict] = {}
    for cell_cfg in configs.values():
        run = read_json(Path(cell_cfg.output_dir) / "run.json")
        if run:
            name = tables.DISPLAY.get(cell_cfg.method.label, cell_cfg.method.label)
            curves.setdefault(name, {})[cell_cfg.seed] = [(h["step"], h["loss"]) for h in run["log_history"]
                                                          if "loss" in h]
    return curves


def input_hashes(configs: dict) -> dict[str, str | None]:
    """The hash of every result file a table is built from: a new result means a new table."""
    found = {}
    for cell_cfg in configs.values():
        run = Path(cell_cfg.output_dir)
        for path in [*sorted((run / "eval").glob("*.json")), run / "diagnose.json"]:
            result = read_json(path)
            found[str(path)] = result and (result.get("stage_hash") or result.get("hash"))
    return found


def collect(cfg: DictConfig, configs: dict, failed: dict[str, str]) -> bool:
    """Tables (Markdown, LaTeX, CSV; beside the paper's when one matches) and figure 2; whether it ran."""
    out = Path(cfg.pipeline.results_dir)
    columns = [{"label": c.label, "role": c.role} for c in cfg.eval.columns]
    rows, rho = method_rows(cfg, configs)
    table = tables.build(columns, rows)
    paper = next((name for name, match in tables.PAPER_TABLES.items()
                  if match == (cfg.model.name, cfg.eval.name)), None)
    key = content_hash({"inputs": input_hashes(configs), "columns": columns, "failed": failed, "paper": paper,
                        "rho_module": cfg.pipeline.rho_module})
    done = read_json(out / "collect.json")
    print(tables.to_markdown(table, title=f"{cfg.experiment_name}: {cfg.model.name} on {cfg.data.name}"))
    if done and done["hash"] == key and all((out / f).exists() for f in ("figure2.png", "long.csv", "dashboard.png")):
        log.info("%s is up to date", out)
        return False
    for row, column in table.missing():
        warnings.warn(f"no result for {row} / {column}: shown as —", stacklevel=2)
    title = f"{cfg.experiment_name}: {cfg.model.name} on {cfg.data.name} (seeds {list(cfg.pipeline.seeds)})"
    atomic_write_text(out / "table.md", tables.to_markdown(table, title=title))
    atomic_write_text(out / "table.tex", tables.to_latex(table, caption=title))
    atomic_write_text(out / "table.csv", tables.to_csv(table))
    if paper:
        published, _, _ = tables.paper_table(paper)
        atomic_write_text(out / "paper.md", "\n\n".join([
            tables.to_markdown(published, title=f"The paper's {paper}"),
            tables.to_markdown(tables.difference(table, published), title=f"Ours − paper ({paper})", mark=False)]))
    long = long_rows(cfg, configs)
    stats = spread.summarize(long)
    forgetting = {name: averages(cfg, values)["forget_avg"] for name, values in rows.items() if name in rho}
    errors = {name: stats[name]["forget_avg"]["stderr"] for name in forgetting}
    if rho:
        figure2(rho, forgetting, out / "figure2", module=cfg.pipeline.rho_module, title=title, errors=errors)
    atomic_write_text(out / "long.csv", spread.to_csv(long))
    dashboard.render(stats, loss_curves(configs), [c.label for c in cfg.eval.columns], out / "dashboard", title=title)
    atomic_write_text(out / "collect.json", json.dumps({"hash": key, "rows": rows, "stats": stats, "rho": rho,
                                                        "failed": failed, "paper_table": paper, **provenance()},
                                                       indent=2))
    log_table(cfg, configs, stats)
    print(f"tables, figure 2 and the dashboard written to {out}")
    return True


def log_table(cfg: DictConfig, configs: dict, stats: dict[str, dict]) -> None:
    """The collect run (oplora.tracking.log_collect): per method the column means and the averages' mean ± s.e."""
    if tracking.resolve_mode(cfg.wandb.mode) == "disabled":
        return
    out = Path(cfg.pipeline.results_dir)
    labels = [c.label for c in cfg.eval.columns]
    keys = ("finetune_avg", "forget_avg", "avg")
    columns = ["method", *labels, *keys, *(f"{k}_stderr" for k in keys), "seeds"]
    data = [[name, *(s[label]["mean"] for label in labels), *(s[k]["mean"] for k in keys),
             *(s[k]["stderr"] for k in keys), s["avg"]["n"]] for name, s in stats.items()]
    files = [out / f for f in ("table.md", "table.tex", "table.csv", "long.csv", "collect.json", "figure2.png",
                               "figure2.pdf", "dashboard.png", "paper.md") if (out / f).exists()]
    tracking.log_collect(cfg, list(configs.values()), {"columns": columns, "data": data}, files)
    dashboard.publish(cfg)
