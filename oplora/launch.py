"""`launcher=slurm`: the stage graph (oplora/graph.py) as SLURM jobs, one array task per cell.

Each step of the graph becomes one job (or a job array over its cells), depending on the jobs of
its `after` steps with `afterany`: a job starts once those ended, however they ended, and applies
the graph's own rule (a cell whose `after` step failed is blocked, recorded in its run directory), so
one failed cell never holds back the others, and collect always runs. Every job runs `python -m
oplora.pipeline <the same overrides> launcher=local pipeline.step=… [pipeline.cell=$SLURM_ARRAY_TASK_ID]`,
so a requeued or resubmitted job resumes: finished work is skipped by its result files and hashes.
CPU steps (`resources: cpu` in the graph) ask for no GPU.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from oplora.config import trains
from oplora.graph import GRAPH
from oplora.record import as_dict
from oplora.slurm import Step, submit, wait


def pipeline_jobs(python: str, overrides: list[str], cells: dict) -> list[Step]:
    """One SLURM step per graph step. Array task i is grid cell i: the grid lists the trained cells first."""
    base = f"{shlex.quote(python)} -m oplora.pipeline {shlex.join(overrides)} launcher=local"
    trained = sum(trains(c.method) for c in cells.values())
    jobs = []
    for step in GRAPH:
        command = f"{base} pipeline.step={step.name}"
        array = None
        if step.per_cell:
            command += " pipeline.cell=$SLURM_ARRAY_TASK_ID"
            array = trained if step.cells == "trained" else len(cells)
        jobs.append(Step(step.name, command, array=array, after=step.after, dependency="afterany",
                         gpus=0 if step.resources == "cpu" else None))
    return jobs


def submit_pipeline(cfg: DictConfig, overrides: list[str], cells: dict) -> dict[str, str]:
    settings = as_dict(cfg.launcher)
    directory = Path(cfg.pipeline.results_dir).parent / "slurm"
    jobs = pipeline_jobs(settings["python"] or sys.executable, overrides, cells)
    ids = submit(jobs, settings, directory, job_prefix=f"oplora-{cfg.experiment_name}", workdir=Path.cwd())
    print(f"submitted {', '.join(f'{name}={job}' for name, job in ids.items())}; scripts and logs in {directory}")
    if settings["wait"] and all(ids.values()):
        states = wait(list(ids.values()), timeout=settings.get("wait_timeout", 7 * 24 * 3600))
        bad = {job: state for job, state in states.items() if state != "COMPLETED"}
        if bad:
            raise RuntimeError(f"SLURM jobs did not complete: {bad}; logs in {directory / 'logs'}")
    return ids
