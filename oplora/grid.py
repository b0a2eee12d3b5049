"""An experiment's grid: its cells (method × seed, or method × learning rate × seed in a sweep, then the untrained
base row) and their configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from oplora.config import compose, trains
from oplora.graph import Step


@dataclass(frozen=True)
class Cell:
    method: str  # a method config (configs/method/<method>.yaml)
    seed: int
    lr: float | None = None  # a sweep's learning rate (train.lr); None: the config's own

    @property
    def name(self) -> str:
        return f"{self.method}/{f'lr{self.lr:g}/' if self.lr is not None else ''}seed{self.seed}"

    @property
    def overrides(self) -> list[str]:
        lr = [f"train.lr={self.lr!r}"] if self.lr is not None else []
        return [f"method={self.method}", f"seed={self.seed}", *lr]


def is_sweep(cfg: DictConfig) -> bool:
    """Whether the experiment is a learning-rate sweep (`pipeline.lrs`)."""
    return bool(cfg.pipeline.get("lrs"))


def sweep_lr(cfg: DictConfig) -> float | None:
    """A sweep cell's learning rate, the axis beside method and seed (None outside a sweep and for the base row)."""
    return float(cfg.train.lr) if is_sweep(cfg) and trains(cfg.method) else None


def sweep_lrs(cfg: DictConfig, method: str) -> list[float] | None:
    """A sweep's learning rates for a method config (`pipeline.lrs`: {label: [lr, …]}, `default` for the others);
    None when the experiment is no sweep."""
    if not is_sweep(cfg):
        return None
    lrs = cfg.pipeline.lrs
    found = lrs.get(method, lrs.get("default"))
    if not found:
        raise ValueError(f"pipeline.lrs has no learning rates for {method!r} and no default; it lists "
                         f"{', '.join(lrs)}")
    return [float(lr) for lr in found]


def grid(cfg: DictConfig, overrides: list[str]) -> dict[Cell, DictConfig]:
    """Every cell's config: the trained cells (method × seed, or method × lr × seed in a sweep, `pipeline.lrs`), then
    the base row when `pipeline.base`."""
    cells = [Cell(m, s, lr) for m in cfg.pipeline.methods for lr in (sweep_lrs(cfg, m) or [None])
             for s in cfg.pipeline.seeds]
    cells += [Cell("base", cfg.pipeline.seeds[0])] if cfg.pipeline.base else []
    configs = {cell: compose([*overrides, *cell.overrides]) for cell in cells}
    check_run_directories(configs)
    check_compare_to(cfg.pipeline.compare_to, configs)
    return configs


def check_compare_to(label: str | None, cells: dict[Cell, DictConfig]) -> None:
    """`pipeline.compare_to` is the label of a method config of the grid, or null (no paired differences)."""
    labels = list(dict.fromkeys(c.method.label for c in cells.values()))
    if label is not None and label not in labels:
        raise ValueError(f"pipeline.compare_to={label!r} is no method of this grid (it names a method config's "
                         f"label); valid: {', '.join(labels)}, or null for no paired differences")


def check_run_directories(cells: dict[Cell, DictConfig]) -> None:
    """Refuse cells that share a run directory: one would train, evaluate and record over the other."""
    owners: dict[Path, list[str]] = {}
    for cell, cfg in cells.items():
        owners.setdefault(Path(cfg.output_dir).expanduser().resolve(), []).append(cell.name)
    shared = "; ".join(f"{', '.join(sorted(names))} → {root}" for root, names in owners.items() if len(names) > 1)
    if shared:
        raise ValueError(f"cells share a run directory ({shared}): every cell needs its own output_dir; keep "
                         "${method.label} and ${seed} in it (the default ends in ${method.label}/seed${seed}), and "
                         "${train.lr} in a sweep's")


def cells_of(step: Step, cells: dict[Cell, DictConfig]) -> list[Cell]:
    return [c for c, c_cfg in cells.items() if step.cells == "all" or trains(c_cfg.method)]


def command_overrides() -> list[str]:
    """The running Hydra command's overrides (${…} kept, for each cell), less the launcher's and the step's or
    cell's: what a step's own process (local or a SLURM job) is given, with its own launcher settings."""
    given = OmegaConf.to_container(HydraConfig.get().overrides, resolve=False)["task"]
    return [o for o in given if not o.startswith(("launcher=", "launcher.", "pipeline.step=", "pipeline.cell="))]
