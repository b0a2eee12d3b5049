"""`launcher=slurm`: the pipeline's steps as a chain of SLURM jobs, one array task per cell.

svd (one job) → train (array over the trained cells) → eval (array over every cell, base included;
also ρ_k and the cell's W&B run) → collect (one job), each `--dependency=afterok` on the previous.
Every job runs `python -m oplora.pipeline <the same overrides> launcher=local pipeline.step=…`, so a
requeued or resubmitted job resumes: finished work is skipped by its result files and hashes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from oplora.record import resolved
from oplora.slurm import Step, submit, wait


def pipeline_steps(python: str, overrides: list[str], cells) -> list[Step]:
    base = f"{shlex.quote(python)} -m oplora.pipeline {shlex.join(overrides)} launcher=local"
    per_cell = "pipeline.cell=$SLURM_ARRAY_TASK_ID"
    trained = sum(cell.method != "base" for cell in cells)  # the grid lists trained cells first
    return [Step("svd", f"{base} pipeline.step=svd"),
            Step("train", f"{base} pipeline.step=train {per_cell}", array=trained, after="svd"),
            Step("eval", f"{base} pipeline.step=eval {per_cell}", array=len(cells), after="train"),
            Step("collect", f"{base} pipeline.step=collect", after="eval")]


def submit_pipeline(cfg: DictConfig, overrides: list[str], cells) -> dict[str, str]:
    settings = resolved(cfg.launcher)
    directory = Path(cfg.pipeline.results_dir).parent / "slurm"
    steps = pipeline_steps(settings["python"] or sys.executable, overrides, cells)
    ids = submit(steps, settings, directory, job_prefix=f"oplora-{cfg.experiment_name}", workdir=Path.cwd())
    print(f"submitted {', '.join(f'{name}={job}' for name, job in ids.items())}; scripts and logs in {directory}")
    if settings["wait"] and all(ids.values()):
        states = wait(list(ids.values()), timeout=settings.get("wait_timeout", 7 * 24 * 3600))
        bad = {job: state for job, state in states.items() if state != "COMPLETED"}
        if bad:
            raise RuntimeError(f"SLURM jobs did not complete: {bad}; logs in {directory / 'logs'}")
    return ids
