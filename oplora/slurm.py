"""SLURM submission: a chain of sbatch steps (job arrays linked by dependencies), and waiting for them.

This module knows nothing about training; the pipeline builds the `Step` commands. `settings` is the
`launcher` config group (configs/launcher/slurm.yaml).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oplora.io import atomic_write_text

# JobState values after which SLURM will not run the job (or array task) again.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                          "PREEMPTED", "BOOT_FAIL", "DEADLINE"})
# A job whose `afterok` dependency failed stays PENDING with this reason forever (SLURM's default without
# SchedulerParameters=kill_invalid_depend); `wait` reports it under this name and treats it as final.
NEVER_RUNS = "DependencyNeverSatisfied"


@dataclass(frozen=True)
class Step:
    name: str  # job name suffix, e.g. "train"
    command: str  # shell command; may use $SLURM_ARRAY_TASK_ID
    array: int | None = None  # number of array tasks (0..array-1); None: a single job
    after: str | tuple[str, ...] | None = None  # the earlier step(s) this one depends on
    dependency: str = "afterok"  # afterok: only when they all succeeded; afterany: once they all ended; aftercorr:
    # array task i once task i of each of them succeeded (when it failed, task i is cancelled: --kill-on-invalid-dep)
    gpus: int | None = None  # GPUs of this step's jobs (None: settings["gpus"])
    checkpoint: str | None = None  # who checkpoints on SIGUSR1 before the time limit: a key of CHECKPOINT_SIGNALS

    @property
    def depends_on(self) -> tuple[str, ...]:
        return (self.after,) if isinstance(self.after, str) else tuple(self.after or ())


# Near the time limit (--signal=B:USR1) the batch shell runs `requeue`: it sends SIGUSR1 only to the processes that
# checkpoint on it, waits for them to stop, and requeues the job; the requeued job resumes from there. Training is one
# process (`process`) or torchrun's workers (`workers`: the agent has no handler and SIGUSR1 would kill it, leaving the
# workers to the requeue mid-checkpoint). A step without a handler (svd, diagnose, eval, collect) is not signalled:
# the job requeues at once, and the step resumes from the work it finished (the SVD cache after its last matrix, an
# evaluation after its last task).
CHECKPOINT_SIGNALS = {"process": 'kill -USR1 "$step"', "workers": 'pkill -USR1 -P "$step"'}
REQUEUE = """requeue() {{
  trap '' USR1
  echo "[$(date -Is)] job $SLURM_JOB_ID: time limit near: {what}"{stop}
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}}
trap requeue USR1"""
STOP = ("\n  {signal}"
        '\n  status=0; wait "$step" || status=$?'
        '\n  echo "[$(date -Is)] the step stopped with exit status $status"')
NAME = re.compile(r"[A-Za-z0-9._-]+")
NAME_CHARS = "letters, digits, '.', '_' and '-'"
NAME_LIST = re.compile(r"[A-Za-z0-9._,-]+")  # partitions, accounts: a comma-separated list
OPTION = re.compile(r"--?[^\s\x00-\x1f\x7f]+")
SAFE_VALUE = re.compile(r"[^\s\x00-\x1f\x7f]+")  # one #SBATCH word: no whitespace, no control characters


def _checked(value: Any, setting: str, pattern: re.Pattern = SAFE_VALUE,
             allowed: str = "any character except whitespace and control characters") -> str:
    """`value` as text for an #SBATCH line, refused when it could end the line or split the directive."""
    text = str(value)
    if not pattern.fullmatch(text):
        raise ValueError(f"{setting} = {text!r} cannot go into an #SBATCH line: allowed are {allowed} (a newline "
                         f"would inject script lines, a space makes an invalid directive); rename it")
    return text


def render(step: Step, settings: Mapping[str, Any], directory: Path, job_prefix: str, workdir: Path,
           env: Mapping[str, str]) -> str:
    """The sbatch script text for one step; every header value is checked (`_checked`) before it is used."""
    name = _checked(f"{job_prefix}-{step.name}", "the job name (from experiment_name)", NAME, NAME_CHARS)
    header = [f"--job-name={name}"]
    if step.array is not None:
        if step.array < 1:
            raise ValueError(f"step {step.name!r}: array must be >= 1, got {step.array}")
        parallel = settings.get("max_parallel")
        limit = f"%{_checked(parallel, 'launcher.max_parallel')}" if parallel else ""
        header.append(f"--array=0-{step.array - 1}{limit}")
    for key in ("partition", "account"):
        if settings.get(key):
            value = _checked(settings[key], f"launcher.{key}", NAME_LIST, NAME_CHARS + " and commas")
            header.append(f"--{key}={value}")
    gpus = settings.get("gpus") if step.gpus is None else step.gpus
    if int(gpus or 0) > 0:
        kind = f"{_checked(settings['gpu_type'], 'launcher.gpu_type', NAME, NAME_CHARS)}:" \
            if settings.get("gpu_type") else ""
        header.append(f"--gres=gpu:{kind}{_checked(gpus, 'launcher.gpus')}")
    header += [f"--{option.replace('_', '-')}={_checked(settings[option], f'launcher.{option}')}"
               for option in ("cpus_per_task", "mem", "time")]
    pattern = "%x-%A_%a.out" if step.array is not None else "%x-%j.out"
    output = _checked(Path(directory) / "logs" / pattern, "the log path (from pipeline.results_dir / experiment_name)")
    header += [f"--output={output}", "--requeue", "--open-mode=append"]
    if step.dependency == "aftercorr":  # else a task whose counterpart failed would wait forever, and so would collect
        header.append("--kill-on-invalid-dep=yes")
    warning = settings.get("signal_seconds")
    if warning:  # SIGUSR1 to the batch shell this long before the time limit: checkpoint, then requeue (REQUEUE)
        header.append(f"--signal=B:USR1@{_checked(int(warning), 'launcher.signal_seconds')}")
    header += [_checked(option, "launcher.extra", OPTION,
                        "options like --qos=high: a leading '-', then no whitespace or control characters")
               for option in settings.get("extra") or []]
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in header), "", "set -euo pipefail",
             f"cd {shlex.quote(str(workdir))}"]
    lines += [f"export {key}={shlex.quote(str(value))}" for key, value in env.items()]
    lines += ['echo "[$(date -Is)] host=$(hostname) job=${SLURM_JOB_ID:-} task=${SLURM_ARRAY_TASK_ID:-}"']
    if warning:
        stop = STOP.format(signal=CHECKPOINT_SIGNALS[step.checkpoint]) if step.checkpoint else ""
        what = "checkpointing, then requeueing" if step.checkpoint else \
            "requeueing (not signalled: the step resumes from the work it finished)"
        requeue = REQUEUE.format(what=what, stop=stop)
        lines += [requeue, f"{step.command} &", "step=$!", 'wait "$step"', ""]
    else:
        lines += [step.command, ""]
    return "\n".join(lines)


def submit(steps: list[Step], settings: Mapping[str, Any], directory: Path, job_prefix: str, workdir: Path,
           env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Write <directory>/<step>.sbatch for every step and submit them in order with `sbatch --parsable`.

    A step with `after` gets `--dependency=<its dependency type>:<ids of those steps>`. The ids go to
    <directory>/jobs.json (atomic write) and are returned as {step: job id}. With settings["submit"] false,
    only the scripts are written and every id is None.
    """
    directory = Path(directory)
    names = [step.name for step in steps]
    for i, step in enumerate(steps):
        if names.count(step.name) > 1:
            raise ValueError(f"duplicate step name {step.name!r}")
        for after in step.depends_on:
            if after not in names[:i]:
                raise ValueError(f"step {step.name!r} runs after {after!r}, which is not an earlier step")
    texts = {step.name: render(step, settings, directory, job_prefix, workdir, env or {}) for step in steps}
    (directory / "logs").mkdir(parents=True, exist_ok=True)  # only once every script rendered
    scripts = {}
    for step in steps:
        scripts[step.name] = directory / f"{step.name}.sbatch"
        atomic_write_text(scripts[step.name], texts[step.name])
    if not settings.get("submit", True):
        return dict.fromkeys(names)
    ids: dict[str, str | None] = {}
    for step in steps:
        command = ["sbatch", "--parsable"]
        if step.depends_on:
            command.append(f"--dependency={step.dependency}:{':'.join(ids[a] for a in step.depends_on)}")
        result = subprocess.run([*command, str(scripts[step.name])], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed for {scripts[step.name]} (exit {result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}; already submitted: {ids}")
        ids[step.name] = result.stdout.strip().split(";")[0]
        atomic_write_text(directory / "jobs.json", json.dumps(ids, indent=2) + "\n")
    return ids


def _field(line: str, key: str) -> str | None:
    match = re.search(rf"(?:^|\s){key}=(\S*)", line)
    return match.group(1) if match else None


def _states(job_id: str) -> dict[str, str]:
    """{job id, or <array id>_<task(s)>: state} from one `scontrol show job -o` call; from `sacct` once scontrol has
    forgotten the job (MinJobAge after its end)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return _sacct_states(job_id, result.stderr.strip())
        raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
    states = {}
    for line in filter(None, result.stdout.splitlines()):
        array_id, task = _field(line, "ArrayJobId"), _field(line, "ArrayTaskId")
        key = f"{array_id}_{task}" if array_id and task else str(_field(line, "JobId"))
        state = str(_field(line, "JobState"))
        states[key] = NEVER_RUNS if state == "PENDING" and _field(line, "Reason") == NEVER_RUNS else state
    return states


def _sacct_states(job_id: str, why: str) -> dict[str, str]:
    result = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                            text=True)
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"scontrol no longer knows job {job_id} ({why}) and sacct cannot tell its final state: "
                           f"{result.stderr.strip() or 'no record'}")
    return parse_sacct(result.stdout)


def parse_sacct(text: str) -> dict[str, str]:
    """`sacct -n -P -X -o JobID,State` lines ("123_4|COMPLETED", "123|CANCELLED by 0") → {id: state}."""
    return {job: state.split()[0] for job, state in (line.split("|", 1) for line in text.splitlines() if "|" in line)}


def wait(job_ids: list[str], timeout: float, poll: float = 2.0) -> dict[str, str]:
    """Poll `scontrol show job -o <id>` until every job and array task is in a final state.

    Returns {job id or <array id>_<task>: state}; a job whose dependency failed is reported as
    "DependencyNeverSatisfied" (it will never run). Raises TimeoutError listing the unfinished ones.
    """
    deadline = time.monotonic() + timeout
    while True:
        states: dict[str, str] = {}
        for job_id in job_ids:
            states.update(_states(str(job_id)))
        unfinished = {key: state for key, state in states.items() if state not in FINAL_STATES | {NEVER_RUNS}}
        if not unfinished:
            return states
        if time.monotonic() >= deadline:
            raise TimeoutError(f"SLURM jobs unfinished after {timeout:.0f} s: {unfinished}")
        time.sleep(poll)


def available() -> str | None:
    """None when `sbatch` and `sinfo` work, else the reason (for clear skips)."""
    missing = [tool for tool in ("sbatch", "sinfo", "scontrol") if shutil.which(tool) is None]
    if missing:
        return f"SLURM client tools not found: {', '.join(missing)}"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()}"
    if not result.stdout.strip():
        return "sinfo lists no nodes"
    return None
