"""Collect an experiment's results into the paper's tables and figure 2, and log them to W&B.

A cell's column value is `eval/<stage>.json` → metrics[column.metric or column.task].value in
percent, averaged over seeds (a method with a missing seed shows "—", with a warning: never a value
computed from part of its cells). ρ_k comes from the cell's `diagnose.json`.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from statistics import mean

from omegaconf import DictConfig

from oplora import tables
from oplora.figures import figure2
from oplora.io import atomic_write_text
from oplora.record import content_hash, provenance, resolved

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


def start_wandb(cfg: DictConfig, job_type: str, name: str, directory: Path, tags: list[str]):
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                      dir=str(cfg.wandb.dir or directory), group=cfg.experiment_name, job_type=job_type,
                      name=name, id=f"{job_type}-{content_hash(name)[:16]}", resume="allow", config=resolved(cfg),
                      tags=[cfg.model.name, cfg.data.name, *tags])


def log_cell(cfg: DictConfig) -> None:
    """One W&B eval run per cell: eval/<column>, eval/{finetune,forget}_avg, eval/avg, rho/k<k>."""
    if cfg.wandb.mode == "disabled":
        return
    values = cell_values(cfg)
    summary = {f"eval/{k}": v for k, v in {**values, **averages(cfg, values)}.items() if v is not None}
    summary.update({f"rho/k{k}": v for k, v in (cell_rho(cfg) or {}).items()})
    name = f"{cfg.experiment_name}/{cfg.model.name}/{cfg.data.name}/{cfg.method.label}/seed{cfg.seed}"
    with start_wandb(cfg, "eval", name, Path(cfg.output_dir), [cfg.method.label, f"seed{cfg.seed}"]) as run:
        run.log(summary)
        run.summary.update(summary)


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
    if done and done["hash"] == key and (out / "figure2.png").exists():
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
    forgetting = {name: averages(cfg, values)["forget_avg"] for name, values in rows.items() if name in rho}
    figure2(rho, forgetting, out / "figure2", module=cfg.pipeline.rho_module, title=title) if rho else None
    atomic_write_text(out / "collect.json", json.dumps({"hash": key, "rows": rows, "rho": rho, "failed": failed,
                                                        "paper_table": paper, **provenance()}, indent=2))
    if cfg.wandb.mode != "disabled":
        log_table(cfg, rows)
    print(f"tables and figure 2 written to {out}")
    return True


def log_table(cfg: DictConfig, rows: dict[str, dict]) -> None:
    """The table as a wandb.Table and the forgetting-average bar chart, in one W&B `collect` run."""
    import wandb

    labels = [c.label for c in cfg.eval.columns]
    data = [[name, *(values[label] for label in labels), *(averages(cfg, values)[k] for k in ("forget_avg", "avg"))]
            for name, values in rows.items()]
    table = wandb.Table(columns=["method", *labels, "forget_avg", "avg"], data=data)
    name = f"{cfg.experiment_name}/{cfg.model.name}/collect"
    with start_wandb(cfg, "collect", name, Path(cfg.pipeline.results_dir), ["collect"]) as run:
        run.log({"table": table, "forget_avg": wandb.plot.bar(table, "method", "forget_avg",
                                                              title="average forgetting score")})
