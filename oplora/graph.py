"""The pipeline's stage graph, declared once: both launchers (local, SLURM) read it.

Each step runs once (`per_cell=False`) or once per cell of the grid: every cell (`cells="all"`: the
trained methods and the base row) or only the cells that train (`cells="trained"`). A step reads the
results of the steps in `after`. A per-cell step whose `after` step failed for the same cell is
blocked for that cell only (the failure is recorded in the cell's run directory, `failed/<step>.json`);
the other cells go on. A step with `always=True` runs whatever failed before it (collect shows "—"
for what is missing and names the failures). `resources` says what a SLURM job of the step asks for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str
    per_cell: bool
    cells: str = "all"  # per-cell steps: "all" cells, or only the "trained" ones
    after: tuple[str, ...] = ()
    resources: str = "gpu"  # "gpu" | "cpu"
    always: bool = False


GRAPH = (
    Step("svd", per_cell=False, resources="cpu"),  # SVD cache of every adapted matrix, shared by all cells
    Step("train", per_cell=True, cells="trained", after=("svd",)),
    Step("diagnose", per_cell=True, cells="trained", after=("train",), resources="cpu"),  # ρ_k of the adapter
    Step("eval", per_cell=True, cells="all", after=("train",)),
    Step("collect", per_cell=False, after=("diagnose", "eval"), resources="cpu", always=True),  # tables, W&B
)
STEPS = {step.name: step for step in GRAPH}


def blocked_by(step: Step, failures: dict[str, str]) -> list[str]:
    """The steps in `step.after` that failed for a cell (`failures`: {step: error} of that cell)."""
    return [] if step.always else [name for name in step.after if name in failures]
