"""`launcher=slurm`: the stage graph (oplora/graph.py) as SLURM jobs, one array task per cell.

Each step of the graph becomes one job (or a job array over its cells), depending on the jobs of
its `after` steps with `afterany`: a job starts once those ended, however they ended, and applies
the graph's own rule (a cell whose `after` step failed is blocked, recorded in its run directory), so
one failed cell never holds back the others, and collect always runs. Every job runs `python -m
oplora.pipeline <the same overrides> launcher=local pipeline.step=… [pipeline.cell=$SLURM_ARRAY_TASK_ID]`,
so a requeued or resubmitted job resumes: finished work is skipped by its result files and hashes.
CPU steps (`resources: cpu` in the graph) ask for no GPU. The fetch step runs here, before anything is submitted
(a login node has internet, compute nodes often do not); every job runs offline, from the caches it filled.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from oplora.config import trains
from oplora.fetch import fetch
from oplora.graph import GRAPH
from oplora.graph import Step as GraphStep
from oplora.record import as_dict
from oplora.resources import OFFLINE_ENV
from oplora.slurm import Step, submit, wait


def step_command(python: str, overrides: list[str], step: GraphStep, gpus: int, cell: str | None = None
                 ) -> list[str]:
    """The command that runs one step of the graph (for grid cell `cell`) in a process of its own: the pipeline
    with the local launcher, in one process, or for training on N > 1 GPUs, N processes under torchrun (the
    effective batch stays train.batch_size: gradient accumulation is derived from the world size)."""
    launch = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] \
        if step.name == "train" and gpus > 1 else [python]
    return [*launch, "-m", "oplora.pipeline", *overrides, "launcher=local", "launcher.isolate=false",
            f"launcher.gpus={gpus}", f"pipeline.step={step.name}", *([f"pipeline.cell={cell}"] if cell else [])]


def pipeline_jobs(python: str, overrides: list[str], cells: dict, gpus: int, svd_shards: int = 1,
                  resources: dict[str, str] | None = None) -> list[Step]:
    """One SLURM step per graph step but fetch. Array task i is grid cell i: the grid lists the trained cells first;
    the svd step is an array over `pipeline.svd_shards` parts of the layers. `resources` ({step: "gpu" | "cpu"})
    overrides the graph's."""
    resources = {step.name: step.resources for step in GRAPH} | (resources or {})
    wrong = {k: v for k, v in resources.items() if k not in {s.name for s in GRAPH} or v not in ("gpu", "cpu")}
    if wrong:
        raise ValueError(f"launcher.step_resources={wrong}: give a step of {', '.join(s.name for s in GRAPH)} "
                         "the value gpu or cpu")
    trained = sum(trains(c.method) for c in cells.values())
    task = "$SLURM_ARRAY_TASK_ID"  # expands in the job's shell
    jobs = []
    submitted = [step for step in GRAPH if not step.launcher]
    names = {step.name for step in submitted}
    for step in submitted:
        argv = step_command(python, overrides, step, gpus, task if step.per_cell else None)
        if step.name == "svd" and svd_shards > 1:
            argv.append(f"pipeline.shard={task}")
        command = " ".join(a if a.endswith(task) else shlex.quote(a) for a in argv)
        array = (trained if step.cells == "trained" else len(cells)) if step.per_cell else None
        array = svd_shards if step.name == "svd" and svd_shards > 1 else array
        after = tuple(a for a in step.after if a in names)
        jobs.append(Step(step.name, command, array=array, after=after, dependency="afterany",
                         gpus=0 if resources[step.name] == "cpu" else None))
    return jobs


def submit_pipeline(cfg: DictConfig, overrides: list[str], cells: dict) -> dict[str, str]:
    settings = as_dict(cfg.launcher)
    if settings["submit"]:
        fetch(cfg, cells)  # here, with internet; a missing or gated item stops the submission
    directory = Path(cfg.pipeline.results_dir).parent / "slurm"
    jobs = pipeline_jobs(settings["python"] or sys.executable, overrides, cells, int(settings["gpus"] or 1),
                         cfg.pipeline.svd_shards, settings.get("step_resources"))
    ids = submit(jobs, settings, directory, job_prefix=f"oplora-{cfg.experiment_name}", workdir=Path.cwd(),
                 env=dict.fromkeys(OFFLINE_ENV, "1"))
    print(f"submitted {', '.join(f'{name}={job}' for name, job in ids.items())}; scripts and logs in {directory}")
    if settings["wait"] and all(ids.values()):
        states = wait(list(ids.values()), timeout=settings.get("wait_timeout", 7 * 24 * 3600))
        bad = {job: state for job, state in states.items() if state != "COMPLETED"}
        if bad:
            raise RuntimeError(f"SLURM jobs did not complete: {bad}; logs in {directory / 'logs'}")
    return ids
