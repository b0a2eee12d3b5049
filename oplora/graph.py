"""The pipeline's stage graph, declared once: both launchers (local, SLURM) read it.

Each step runs once (`per_cell=False`) or once per cell of the grid: every cell (`cells="all"`: the
trained methods and the base row) or only the cells that train (`cells="trained"`). A step reads the
results of the steps in `after`. A per-cell step whose `after` step failed for the same cell is
blocked for that cell only (the failure is recorded in the cell's run directory, `failed/<step>.json`);
the other cells go on. A once-step that fails blocks every step after it, for every cell. A step with
`always=True` runs whatever failed before it (collect shows "—" for what is missing and names the failures).
`resources` says what a SLURM job of the step asks for; a `launcher` step runs where the pipeline is launched
(fetch: on the login node, which has internet), before any job is submitted.
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
    launcher: bool = False  # runs in the launching process, never as a SLURM job


GRAPH = (
    Step("fetch", per_cell=False, resources="cpu", launcher=True),  # downloads; the later steps run offline
    Step("svd", per_cell=False, after=("fetch",), resources="cpu"),  # SVD cache of the adapted matrices, for all cells
    Step("train", per_cell=True, cells="trained", after=("svd",)),
    Step("diagnose", per_cell=True, cells="trained", after=("train",), resources="cpu"),  # ρ_k of the adapter
    Step("eval", per_cell=True, cells="all", after=("train",)),
    Step("collect", per_cell=False, after=("diagnose", "eval"), resources="cpu", always=True),  # tables, W&B
)
STEPS = {step.name: step for step in GRAPH}


def blocked_by(step: Step, failures: dict[str, str]) -> list[str]:
    """The steps in `step.after` that failed for a cell (`failures`: {step: error} of that cell)."""
    return [] if step.always else [name for name in step.after if name in failures]
