"""`launcher=slurm`: the stage graph (oplora/graph.py) as SLURM jobs, one array task per cell.

Each step of the graph becomes one job (or a job array over its cells). A step that reads the whole of an earlier
step (train reads svd, collect reads everything) waits for its jobs with `afterany`: it starts once they ended, however
they ended, and applies the graph's own rule (a cell whose `after` step failed is blocked, recorded in its run
directory). Diagnose and eval read one cell's training only: task i waits for training task i (`aftercorr`) and is
cancelled when that task failed; the base row's evaluation waits for no training. So one failed or slow cell never
holds back the others, and collect always runs. Every job runs `python -m oplora.pipeline <the same overrides>
launcher=local pipeline.step=… [pipeline.cell=$SLURM_ARRAY_TASK_ID]`, so a requeued or resubmitted job resumes:
finished work is skipped by its result files and hashes. CPU steps (`resources: cpu` in the graph) ask for no GPU.
The fetch step runs here, before anything is submitted (a login node has internet, compute nodes often do not); every
job runs offline, from the caches it filled, with W&B offline unless told otherwise (`tracking.job_mode`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig

from oplora import tracking
from oplora.cache import ENV, Cache
from oplora.config import trains
from oplora.fetch import fetch
from oplora.graph import GRAPH
from oplora.graph import Step as GraphStep
from oplora.record import as_dict
from oplora.resources import OFFLINE_ENV
from oplora.results import ResultsDir
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


TASK = '"$SLURM_ARRAY_TASK_ID"'  # the array task's index: expanded by the job's shell, the only word left unquoted
PASSED_ON = ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "TORCH_EXTENSIONS_DIR")  # cache locations, when this shell sets them


def pipeline_jobs(python: str, overrides: list[str], cells: dict, gpus: int, svd_shards: int = 1,
                  resources: dict[str, str] | None = None) -> list[Step]:
    """One SLURM step per graph step but fetch (two for a per-cell step over every cell: its trained cells and the
    untrained base row, `<step>-base`). Array task i is grid cell i (the grid lists the trained cells first). A per-cell
    step that reads per-cell steps only chains per cell (`aftercorr`: diagnose and eval of cell i start when cell i is
    trained), and the base row waits for no training. The svd step is an array over `svd_shards` parts of the layers.
    Every word of a command is shell-quoted: only the launcher's $SLURM_ARRAY_TASK_ID expands in the job. `resources`
    ({step: "gpu" | "cpu"}) overrides the graph's."""
    resources = {step.name: step.resources for step in GRAPH} | (resources or {})
    wrong = {k: v for k, v in resources.items() if k not in {s.name for s in GRAPH} or v not in ("gpu", "cpu")}
    if wrong:
        raise ValueError(f"launcher.step_resources={wrong}: give a step of {', '.join(s.name for s in GRAPH)} "
                         "the value gpu or cpu")
    trained = sum(trains(c.method) for c in cells.values())
    submitted = [step for step in GRAPH if not step.launcher]
    per_cell = {step.name for step in submitted if step.per_cell}
    names: dict[str, list[str]] = {}  # graph step → its SLURM steps
    jobs_of = lambda graph_steps: tuple(job for a in graph_steps for job in names.get(a, []))  # noqa: E731
    jobs = []
    for step in submitted:
        command = shlex.join(step_command(python, overrides, step, gpus))
        common = dict(gpus=0 if resources[step.name] == "cpu" else None,
                      checkpoint=("workers" if gpus > 1 else "process") if step.name == "train" else None)
        if not step.per_cell:
            shards = svd_shards if step.name == "svd" and svd_shards > 1 else None
            sharded = f" pipeline.svd_shards={shards} pipeline.shard={TASK}" if shards else ""
            parts = [Step(step.name, command + sharded, array=shards, after=jobs_of(step.after), dependency="afterany",
                          **common)]
        else:
            correspond = bool(step.after) and set(step.after) <= per_cell  # reads per-cell results only
            parts = [Step(step.name, f"{command} pipeline.cell={TASK}", array=trained, after=jobs_of(step.after),
                          dependency="aftercorr" if correspond else "afterany", **common)]
            untrained = len(cells) - trained if step.cells == "all" else 0
            if untrained:  # the base row: after the once-steps it reads, never after training
                cell = f'"$((SLURM_ARRAY_TASK_ID + {trained}))"'
                once = jobs_of(a for a in step.after if a not in per_cell)
                parts.append(Step(f"{step.name}-base", f"{command} pipeline.cell={cell}", array=untrained, after=once,
                                  dependency="afterany", **common))
        parts = [part for part in parts if part.array != 0]  # a grid without trained cells
        names[step.name] = [part.name for part in parts]
        jobs += parts
    return jobs


def job_environment(cfg: DictConfig) -> dict[str, str]:
    """What every job needs, written into its script rather than left to sbatch's --export=ALL (which a site may turn
    off): the hub offline, the W&B mode of a batch job (`tracking.job_mode`: offline unless told otherwise), and the
    caches fetch filled, at the paths this process resolves. HF_TOKEN is left out on purpose: the jobs run offline and
    never read it, and a script file is no place for a secret."""
    from huggingface_hub import constants

    env = dict.fromkeys(OFFLINE_ENV, "1") | {"WANDB_MODE": tracking.job_mode(cfg.wandb.mode)}
    env |= {"HF_HOME": constants.HF_HOME, ENV: str(Cache.default().root),
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")}  # evalplus's MBPP+
    return env | {name: os.environ[name] for name in PASSED_ON if os.environ.get(name)}


def submit_pipeline(cfg: DictConfig, overrides: list[str], cells: dict) -> dict[str, str]:
    settings = as_dict(cfg.launcher)
    if settings["submit"]:
        fetch(cfg, cells)  # here, with internet; a missing or gated item stops the submission
    directory = ResultsDir(cfg.pipeline.results_dir).slurm
    shards = cfg.pipeline.svd_shards if cfg.pipeline.svd_shards > 1 else settings.get("svd_shards") or 1
    jobs = pipeline_jobs(settings["python"] or sys.executable, overrides, cells, int(settings["gpus"] or 1), shards,
                         settings.get("step_resources"))
    ids = submit(jobs, settings, directory, job_prefix=f"oplora-{cfg.experiment_name}", workdir=Path.cwd(),
                 env=job_environment(cfg))
    print(f"submitted {', '.join(f'{name}={job}' for name, job in ids.items())}; scripts and logs in {directory}")
    if settings["wait"] and all(ids.values()):
        states = wait(list(ids.values()), timeout=settings.get("wait_timeout", 7 * 24 * 3600))
        bad = {job: state for job, state in states.items() if state != "COMPLETED"}
        if bad:
            raise RuntimeError(f"SLURM jobs did not complete: {bad}; logs in {directory / 'logs'}")
    return ids
