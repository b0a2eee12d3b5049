"""What an evaluation stage is, and the registry of stages by the name the eval configs' columns use.

A stage is built once per cell with `(target, settings, limit, workdir, merged)` and runs the cell's tasks one at a
time: `run(task)` returns `{"metrics": {key: {"metric", "value", "stderr", "n"}}, "details": {...}}`. When the cell's
tasks are done (or one failed), `close()` releases what it holds on the GPU, so that the next stage of the same process
has the memory (oplora.evaluation.cell.run_stage calls it). `version` is part of the key of the stage's results
(`oplora.evaluation.cell.stage_key`): bump it when the evaluator changes what it computes, and finished results are
recomputed. `generates` says whether it decodes text (then it runs on the merged model). A stage's module in
oplora/evaluation/ registers it (`register`) and is found by package scan; nothing lists it.
"""

from __future__ import annotations

from pathlib import Path

from oplora.device import release_gpu_memory
from oplora.evaluation.target import Target
from oplora.registry import Registry

STAGES = Registry("stage")


class Stage:
    name: str = ""
    version: int = 1
    generates: bool = False

    def __init__(self, target: Target, settings: dict, limit: int | None, workdir: str | Path,
                 merged: str | None = None):
        self.target, self.settings, self.limit, self.merged = target, settings, limit, merged
        self.workdir = Path(workdir)

    @property
    def model_dir(self) -> str:
        """The model a generating stage decodes with: the merged model, or the base model itself."""
        return self.merged or self.target.base

    def run(self, task: str) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Release the GPU memory of what `run` loaded (a subclass drops its references first)."""
        release_gpu_memory()


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available by its `name` (which must be new)."""
    return STAGES.register(cls)
