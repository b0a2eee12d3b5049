"""An experiment's grid: its cells (method × seed, then the untrained base row) and their configs."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from oplora.config import compose, trains
from oplora.graph import Step


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


def command_overrides() -> list[str]:
    """The running Hydra command's overrides (${…} kept, for each cell), less the launcher's and the step's or
    cell's: what a step's own process (local or a SLURM job) is given, with its own launcher settings."""
    given = OmegaConf.to_container(HydraConfig.get().overrides, resolve=False)["task"]
    return [o for o in given if not o.startswith(("launcher=", "launcher.", "pipeline.step=", "pipeline.cell="))]
