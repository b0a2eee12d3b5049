"""One experiment end to end: SVD cache → train every (method, seed) cell → evaluate → ρ_k → tables, figure 2.

    python -m oplora.pipeline experiment=table2 [model=qwen2.5-7b] [pipeline.seeds=[1,2,3]] [launcher=slurm]

Every step decides from its own result files and config hashes whether there is work left, so a
second run executes nothing, a changed eval setting reruns evaluation and collection only, and
`force=true` / `eval.force=true` redo training / evaluation. A failed cell is reported (and makes the
command fail) while the other cells go on; its table cells show "—". `launcher=slurm` submits the same
steps as a chain of SLURM jobs (`pipeline.step=… pipeline.cell=$SLURM_ARRAY_TASK_ID`).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import hydra
import safetensors
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from oplora import models
from oplora.diagnose import adapter_deltas, base_weights, diagnose, weights_dir
from oplora.evaluate import evaluate
from oplora.evaluation.target import file_sha256
from oplora.io import atomic_write_text
from oplora.record import content_hash
from oplora.report import collect, log_cell
from oplora.svd import SVDCache, cache_root
from oplora.train import finished, train

log = logging.getLogger("oplora.pipeline")
CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
STEPS = ("svd", "train", "eval", "collect")


@dataclass(frozen=True)
class Cell:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}/seed{self.seed}"


def grid(cfg: DictConfig) -> list[Cell]:
    """Trained cells (method × seed), then the untrained base model when `pipeline.base`."""
    cells = [Cell(m, s) for m in cfg.pipeline.methods for s in cfg.pipeline.seeds]
    return cells + ([Cell("base", cfg.pipeline.seeds[0])] if cfg.pipeline.base else [])


def cell_config(overrides: list[str], cell: Cell) -> DictConfig:
    """The experiment's config for one cell: the command's overrides plus method and seed."""
    extra = [*overrides, f"method={cell.method}", f"seed={cell.seed}"]
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=extra)
    with hydra.initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return hydra.compose(config_name="train", overrides=extra)


def command_overrides() -> list[str]:
    """The running Hydra command's overrides (${…} kept, for each cell), less those that pick a step or cell."""
    given = OmegaConf.to_container(HydraConfig.get().overrides, resolve=False)["task"]
    return [o for o in given if not o.startswith(("launcher=", "pipeline.step=", "pipeline.cell="))]


def cell_configs(cfg: DictConfig) -> list[DictConfig]:
    """The config of every cell of the running command's experiment grid."""
    overrides = command_overrides()
    return [cell_config(overrides, cell) for cell in grid(cfg)]


def train_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype the model trains in (and whose weights the SVD cache is keyed on)."""
    return getattr(torch, cfg.model.dtype) if torch.cuda.is_available() else torch.float32


def target_matrices(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Every adapted weight matrix of the base model, in the dtype training sees."""
    directory = weights_dir(models.resolve(cfg.model.path))
    names = []
    for file in sorted(directory.glob("*.safetensors")):
        with safetensors.safe_open(file, "pt") as f:
            names += [k.removesuffix(".weight") for k in f.keys()
                      if k.endswith(".weight") and k.rsplit(".", 2)[-2] in cfg.model.target_modules]
    return {name: W.to(train_dtype(cfg)) for name, W in base_weights(directory, names).items()}


def svd_step(cfg: DictConfig) -> bool:
    """Top-k (and, for MiLoRA, bottom-r) triples of every adapted matrix, computed once into the cache."""
    svd = SVDCache(cfg.cache_dir or cache_root(), mode=cfg.svd_mode)
    bottom = cfg.train.lora_r if "milora" in cfg.pipeline.methods else 0
    ran = False
    for name, W in tqdm(target_matrices(cfg).items(), desc="SVD cache", unit="matrix"):
        top = min(max(cfg.pipeline.rho_ks), min(W.shape))
        if not svd.has(W, top, bottom):
            svd.top(W, top, name)
            svd.bottom(W, bottom, name) if bottom else None
            ran = True
    return ran


def diagnose_step(cfg: DictConfig) -> bool:
    """ρ_k (and the other diagnostics) of a trained cell's exported adapter against the original weights."""
    out = Path(cfg.output_dir) / "diagnose.json"
    run = json.loads((Path(cfg.output_dir) / "run.json").read_text())
    key = content_hash({"adapter_sha256": file_sha256(Path(run["adapter"]) / "adapter_model.safetensors"),
                        "base": run["base_model"], "ks": list(cfg.pipeline.rho_ks)})
    if out.exists() and json.loads(out.read_text())["hash"] == key:
        return False
    deltas = adapter_deltas(run["adapter"])
    original = {name: W.to(train_dtype(cfg)) for name, W in base_weights(run["base_model"], sorted(deltas)).items()}
    result = diagnose(original, deltas, list(cfg.pipeline.rho_ks), SVDCache(cfg.cache_dir or cache_root()))
    atomic_write_text(out, json.dumps({"hash": key, **result}, indent=2))
    return True


def run_cell_step(step: str, cfg: DictConfig) -> bool:
    """One step of one cell; whether it did any work."""
    if step == "train":
        if cfg.method.name == "base" or finished(cfg):
            return False
        train(cfg)
        return True
    ran = any(r for _, r in evaluate(cfg).values())
    if cfg.method.name != "base":
        ran = diagnose_step(cfg) or ran
    if ran:
        log_cell(cfg)
    return ran


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Run the selected steps (and cells) locally; a report of what ran, was skipped, or failed."""
    cells = grid(cfg)
    steps = STEPS if cfg.pipeline.step == "all" else (cfg.pipeline.step,)
    if any(s not in STEPS for s in steps):
        raise ValueError(f"pipeline.step={cfg.pipeline.step!r}; valid: all, {', '.join(STEPS)}")
    chosen = cells if cfg.pipeline.cell is None else [cells[cfg.pipeline.cell]]
    report = {"ran": {s: [] for s in steps}, "skipped": {s: [] for s in steps}, "failed": {}}
    if "svd" in steps:
        report["ran" if svd_step(cfg) else "skipped"]["svd"].append("all")
    for step in ("train", "eval"):
        if step not in steps:
            continue
        for cell in chosen:
            if cell.name in report["failed"] or (step == "train" and cell.method == "base"):
                continue
            try:
                ran = run_cell_step(step, cell_config(overrides, cell))
                report["ran" if ran else "skipped"][step].append(cell.name)
            except Exception as err:  # one cell's failure must not hide the others' results
                log.error("%s %s failed: %s\n%s", step, cell.name, err, traceback.format_exc())
                report["failed"][cell.name] = f"{step}: {type(err).__name__}: {err}"
    if "collect" in steps:
        configs = {cell: cell_config(overrides, cell) for cell in cells}
        report["ran" if collect(cfg, configs, report["failed"]) else "skipped"]["collect"].append("all")
    return report


def summary(report: dict) -> str:
    lines = [f"{step}: ran {len(report['ran'][step])}, skipped {len(report['skipped'][step])}"
             for step in report["ran"]]
    lines += [f"FAILED {cell}: {why}" for cell, why in report["failed"].items()]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    overrides = command_overrides()
    if cfg.launcher.name == "slurm":
        from oplora.launch import submit_pipeline

        submit_pipeline(cfg, overrides, grid(cfg))
        return
    report = run(cfg, overrides)
    print(summary(report))
    if report["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
