"""One experiment end to end, following the stage graph (oplora/graph.py): SVD cache → train every
(method, seed) cell → ρ_k of each adapter → evaluate every cell and the base model → tables, figure 2, W&B.

    python -m oplora.pipeline experiment=table2 [model=qwen2.5-7b] [pipeline.seeds=[1,2,3]] [launcher=slurm]

Every step decides from its own result files and config hashes whether there is work left, so a
second run executes nothing, a changed eval setting reruns evaluation and collection only, and
`force=true` / `eval.force=true` redo training / evaluation. A step that fails for one cell is
recorded in that cell's run directory; the cell's later steps are blocked, the other cells go on, the
table shows "—" for it and names the failure, and the command exits non-zero. `launcher=slurm` submits
the same graph as SLURM jobs (`pipeline.step=… pipeline.cell=$SLURM_ARRAY_TASK_ID`).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from dataclasses import dataclass

import hydra
import safetensors
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from oplora.config import CONFIG_DIR, compose, trains
from oplora.diagnose import base_weights, diagnose_adapter, weights_dir
from oplora.evaluation.cell import evaluate
from oplora.graph import GRAPH, STEPS, Step, blocked_by
from oplora.io import atomic_write_text, cache_root, file_sha256
from oplora.methods import get_method
from oplora.models import compute_dtype
from oplora.record import content_hash
from oplora.report import collect
from oplora.resources import resolve
from oplora.rundir import RunDir, read_json
from oplora.svd import SVDCache
from oplora.train import adapter_settings, finished, train

log = logging.getLogger("oplora.pipeline")


@dataclass(frozen=True)
class Cell:
    method: str  # a method config (configs/method/<method>.yaml)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}/seed{self.seed}"


def grid(cfg: DictConfig, overrides: list[str]) -> dict[Cell, DictConfig]:
    """Every cell's config: the trained cells (method × seed), then the base row when `pipeline.base`."""
    cells = [Cell(m, s) for m in cfg.pipeline.methods for s in cfg.pipeline.seeds]
    cells += [Cell("base", cfg.pipeline.seeds[0])] if cfg.pipeline.base else []
    return {cell: compose([*overrides, f"method={cell.method}", f"seed={cell.seed}"]) for cell in cells}


def cells_of(step: Step, cells: dict[Cell, DictConfig]) -> list[Cell]:
    return [c for c, c_cfg in cells.items() if step.cells == "all" or trains(c_cfg.method)]


def target_matrices(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Every adapted weight matrix of the base model, in the dtype training sees."""
    directory = weights_dir(resolve(cfg.model.path))
    names = []
    for file in sorted(directory.glob("*.safetensors")):
        with safetensors.safe_open(file, "pt") as f:
            names += [k.removesuffix(".weight") for k in f.keys()
                      if k.endswith(".weight") and k.rsplit(".", 2)[-2] in cfg.model.target_modules]
    dtype = getattr(torch, compute_dtype(cfg.model))
    return {name: W.to(dtype) for name, W in base_weights(directory, names).items()}


def svd_step(cfg: DictConfig, cells: dict[Cell, DictConfig]) -> bool:
    """The singular triples every method of the grid and figure 2a need, computed once into the cache."""
    needs = [get_method(s.method).svd_needs(s) for s in map(adapter_settings, (c for c in cells.values()
                                                                               if trains(c.method)))]
    top = max([max(cfg.pipeline.rho_ks), *(t for t, _ in needs)])
    bottom = max(b for _, b in needs) if needs else 0
    svd = SVDCache(cfg.cache_dir or cache_root(), mode=cfg.svd_mode)
    ran = False
    for name, W in tqdm(target_matrices(cfg).items(), desc="SVD cache", unit="matrix"):
        k = min(top, min(W.shape))
        if not svd.has(W, k, bottom):
            svd.top(W, k, name)
            svd.bottom(W, bottom, name) if bottom else None
            ran = True
    return ran


def train_step(cfg: DictConfig) -> bool:
    if finished(cfg):
        return False
    train(cfg)
    return True


def diagnose_step(cfg: DictConfig) -> bool:
    """ρ_k (and the other diagnostics) of a trained cell's exported adapter against the original weights."""
    run = RunDir(cfg.output_dir)
    record = run.trained_record()
    if record is None:
        raise FileNotFoundError(f"{run.record} does not exist: the cell has not been trained")
    key = content_hash({"adapter_sha256": file_sha256(run.adapter_weights), "base": record["base_model"],
                        "ks": list(cfg.pipeline.rho_ks)})
    if (read_json(run.diagnose) or {}).get("hash") == key:
        return False
    result = diagnose_adapter(record["base_model"], run.adapter, list(cfg.pipeline.rho_ks),
                              SVDCache(cfg.cache_dir or cache_root()), getattr(torch, compute_dtype(cfg.model)))
    atomic_write_text(run.diagnose, json.dumps({"hash": key, **result}, indent=2))
    return True


def eval_step(cfg: DictConfig) -> bool:
    return any(ran for _, ran in evaluate(cfg).values())


CELL_ACTIONS = {"train": train_step, "diagnose": diagnose_step, "eval": eval_step}
ONCE_ACTIONS = {"svd": svd_step, "collect": collect}


def run_step(step: Step, cfg: DictConfig, cells: dict[Cell, DictConfig], chosen: list[Cell], report: dict) -> None:
    """Run one step of the graph (on the chosen cells, for a per-cell step), recording what happened."""
    if not step.per_cell:
        try:
            ran = ONCE_ACTIONS[step.name](cfg, cells)
            report["ran" if ran else "skipped"][step.name].append("all")
        except Exception as err:
            log.error("%s failed: %s\n%s", step.name, err, traceback.format_exc())
            report["failed"][step.name] = f"{type(err).__name__}: {err}"
        return
    for cell in (c for c in cells_of(step, cells) if c in chosen):
        run = RunDir(cells[cell].output_dir)
        if blockers := blocked_by(step, run.failures()):
            log.warning("%s %s: blocked, %s failed (%s)", step.name, cell.name, blockers[0], run.failure(blockers[0]))
            report["blocked"][step.name].append(cell.name)
            continue
        try:
            ran = CELL_ACTIONS[step.name](cells[cell])
            run.clear_failure(step.name)
            report["ran" if ran else "skipped"][step.name].append(cell.name)
        except Exception as err:  # one cell's failure must not hide the others' results
            trace = traceback.format_exc()
            log.error("%s %s failed: %s\n%s", step.name, cell.name, err, trace)
            run.record_failure(step.name, f"{type(err).__name__}: {err}", trace)
            report["failed"][cell.name] = f"{step.name}: {type(err).__name__}: {err}"


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Run the selected steps (and cells) here, in graph order; a report of what ran, was skipped, blocked or failed."""
    if cfg.pipeline.step != "all" and cfg.pipeline.step not in STEPS:
        raise ValueError(f"pipeline.step={cfg.pipeline.step!r}; valid: all, {', '.join(STEPS)}")
    steps = GRAPH if cfg.pipeline.step == "all" else (STEPS[cfg.pipeline.step],)
    cells = grid(cfg, overrides)
    chosen = list(cells) if cfg.pipeline.cell is None else [list(cells)[cfg.pipeline.cell]]
    report = {key: {s.name: [] for s in steps} for key in ("ran", "skipped", "blocked")} | {"failed": {}}
    for step in steps:
        run_step(step, cfg, cells, chosen, report)
    return report


def summary(report: dict) -> str:
    lines = [f"{step}: ran {len(report['ran'][step])}, skipped {len(report['skipped'][step])}"
             + (f", blocked {len(report['blocked'][step])}" if report["blocked"][step] else "")
             for step in report["ran"]]
    lines += [f"FAILED {where}: {why}" for where, why in report["failed"].items()]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    given = OmegaConf.to_container(HydraConfig.get().overrides, resolve=False)["task"]  # ${…} kept for each cell
    overrides = [o for o in given if not o.startswith(("launcher=", "pipeline.step=", "pipeline.cell="))]
    if cfg.launcher.name == "slurm":
        from oplora.launch import submit_pipeline

        submit_pipeline(cfg, overrides, grid(cfg, overrides))
        return
    report = run(cfg, overrides)
    print(summary(report))
    if report["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
