"""One experiment end to end, following the stage graph (oplora/graph.py): SVD cache → train every
(method, seed) cell → ρ_k of each adapter → evaluate every cell and the base model → tables, figure 2, W&B.

    python -m oplora.pipeline experiment=table2 [model=qwen2.5-7b] [pipeline.seeds=[1,2,3]] [launcher=slurm]

The first step, fetch, downloads what the experiment needs into the Hugging Face caches; every later step runs
offline (HF_HUB_OFFLINE), so a compute node needs no internet and nothing is downloaded behind fetch's back.

Every step decides from its own result files and config hashes whether there is work left, so a
second run executes nothing, a changed eval setting reruns evaluation and collection only, and
`force=true` / `eval.force=true` redo training / evaluation. A step that fails for one cell is
recorded in that cell's run directory; the cell's later steps are blocked, the other cells go on, the
table shows "—" for it and names the failure, and the command exits non-zero. `launcher=slurm` submits
the same graph as SLURM jobs (`pipeline.step=… pipeline.cell=$SLURM_ARRAY_TASK_ID`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from oplora.config import CONFIG_DIR
from oplora.device import check_gpu, gpu_present
from oplora.diagnose import diagnose_step
from oplora.evaluation.cell import evaluate
from oplora.fetch import ColumnsUnavailable, fetch, set_offline
from oplora.graph import GRAPH, STEPS, Step, blocked_by
from oplora.grid import Cell, cells_of, command_overrides, grid
from oplora.io import atomic_write_text, read_json
from oplora.launch import step_command, submit_pipeline
from oplora.report import collect
from oplora.results import ResultsDir
from oplora.rundir import RunDir
from oplora.svd import svd_step
from oplora.sweep import point_configs
from oplora.train import finished, train

log = logging.getLogger("oplora.pipeline")
REPORT_ENV = "OPLORA_STEP_REPORT"  # where a step run in a process of its own writes its report (set by the parent)


def train_step(cfg: DictConfig) -> bool:
    if finished(cfg):
        return False
    train(cfg)
    return True


def eval_step(cfg: DictConfig) -> bool:
    """Evaluate the cell, then (in a sweep) each of its points; a failure of one never hides the others'."""
    ran, failed = False, []
    for each in [cfg, *point_configs(cfg)]:
        try:
            ran |= any(done for _, done in evaluate(each).values())
        except Exception as err:  # noqa: BLE001 - raised below, after the other points
            failed.append(err)
    if failed:
        raise failed[0]
    return ran


CELL_ACTIONS = {"train": train_step, "diagnose": diagnose_step, "eval": eval_step}  # each next to its subject
ONCE_ACTIONS = {"fetch": fetch, "svd": svd_step, "collect": collect}


def run_step(step: Step, cfg: DictConfig, overrides: list[str], cells: dict[Cell, DictConfig], chosen: list[Cell],
             report: dict) -> None:
    """Run one step of the graph (on the chosen cells, for a per-cell step), recording what happened."""
    if not step.per_cell:
        results = ResultsDir(cfg.pipeline.results_dir)
        try:
            ran = ONCE_ACTIONS[step.name](cfg, cells)
            report["ran" if ran else "skipped"][step.name].append("all")
            if not step.always:
                results.clear_step_failure(step.name)
        except ColumnsUnavailable as err:  # evaluation data only: those columns fail, everything else goes on
            log.error("%s: %s\nthe columns %s will show —; every other step goes on", step.name, err,
                      ", ".join(err.columns))
            report["failed"][step.name] = f"{type(err).__name__}: {err}"
            report["partial"].append(step.name)
        except Exception as err:
            log.error("%s failed: %s\n%s", step.name, err, traceback.format_exc())
            report["failed"][step.name] = f"{type(err).__name__}: {err}"
            if not step.always:  # collect writes no table over existing results after this
                results.record_step_failure(step.name, report["failed"][step.name])
        return
    for cell in (c for c in cells_of(step, cells) if c in chosen):
        run = RunDir(cells[cell].output_dir)
        if not main_rank():  # a training rank under torchrun: rank 0 locks and records
            CELL_ACTIONS[step.name](cells[cell])
            continue
        if blockers := blocked_by(step, run.failures()):
            log.warning("%s %s: blocked, %s failed (%s)", step.name, cell.name, blockers[0], run.failure(blockers[0]))
            report["blocked"][step.name].append(cell.name)
            continue
        if isolated(cfg, step):
            run_isolated(step, cfg, overrides, list(cells).index(cell), cell, run, report)
            continue
        try:
            with run.lock(step.name):  # another pipeline on the same cell waits, then finds the work done
                ran = CELL_ACTIONS[step.name](cells[cell])
            run.clear_failure(step.name)
            report["ran" if ran else "skipped"][step.name].append(cell.name)
        except Exception as err:  # one cell's failure must not hide the others' results
            trace = traceback.format_exc()
            log.error("%s %s failed: %s\n%s", step.name, cell.name, err, trace)
            run.record_failure(step.name, f"{type(err).__name__}: {err}", trace, getattr(err, "scope", None))
            report["failed"][cell.name] = f"{step.name}: {type(err).__name__}: {err}"


def main_rank() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def isolated(cfg: DictConfig, step: Step) -> bool:
    """Whether a GPU step runs in a process of its own (`launcher.isolate`: auto = when a GPU is present)."""
    setting = cfg.launcher.get("isolate", False)
    return step.resources == "gpu" and (gpu_present() if setting == "auto" else bool(setting))


def run_isolated(step: Step, cfg: DictConfig, overrides: list[str], index: int, cell: Cell, run: RunDir,
                 report: dict) -> None:
    """One (cell, step) in its own process (N processes under torchrun for training on N GPUs), its log going straight
    through; its report comes back in a file named by REPORT_ENV. The child records a failure in the run directory,
    or the parent does when the child died."""
    argv = step_command(sys.executable, overrides, step, int(cfg.launcher.get("gpus") or 1), str(index))
    with tempfile.TemporaryDirectory(prefix="oplora-step-") as scratch:
        path = Path(scratch) / "report.json"
        code = subprocess.run(argv, env={**os.environ, REPORT_ENV: str(path)}).returncode
        found = read_json(path)
    if found is None or code != 0:
        if step.name not in run.failures():
            run.record_failure(step.name, f"its process exited with code {code}", " ".join(argv))
        report["failed"][cell.name] = f"{step.name}: {run.failures()[step.name]}"
        return
    for outcome in ("ran", "skipped", "blocked"):
        report[outcome][step.name] += found[outcome][step.name]


def run(cfg: DictConfig, overrides: list[str]) -> dict:
    """Run the selected steps (and cells) here, in graph order; a report of what ran, was skipped, blocked or failed.

    After fetch, the steps run offline. A failed once-step (fetch, svd) blocks every step after it."""
    if cfg.pipeline.step != "all" and cfg.pipeline.step not in STEPS:
        raise ValueError(f"pipeline.step={cfg.pipeline.step!r}; valid: all, {', '.join(STEPS)}")
    steps = GRAPH if cfg.pipeline.step == "all" else (STEPS[cfg.pipeline.step],)
    cells = grid(cfg, overrides)
    if any(s.resources == "gpu" for s in steps):
        check_gpu(cfg.model)  # before anything runs: a 7B model never trains in float32 on a CPU by accident
    chosen = list(cells) if cfg.pipeline.cell is None else [list(cells)[cfg.pipeline.cell]]
    report = {key: {s.name: [] for s in steps} for key in ("ran", "skipped", "blocked")} | {"failed": {}, "partial": []}
    dead: set[str] = set()  # once-steps that failed, and the steps they block
    for step in steps:
        if not step.always and dead.intersection(step.after):
            dead.add(step.name)
            report["blocked"][step.name] = [c.name for c in cells_of(step, cells) if c in chosen] if step.per_cell \
                else ["all"]
            continue
        run_step(step, cfg, overrides, cells, chosen, report)
        if step.name in report["failed"] and step.name not in report["partial"]:
            dead.add(step.name)
        if step.name == "fetch":
            set_offline(True)  # the later steps read only what fetch cached
    return report


def summary(report: dict) -> str:
    lines = [f"{step}: ran {len(report['ran'][step])}, skipped {len(report['skipped'][step])}"
             + (f", blocked {len(report['blocked'][step])}" if report["blocked"][step] else "")
             for step in report["ran"]]
    lines += [f"FAILED {where}: {why}" for where, why in report["failed"].items()]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    overrides = command_overrides()
    if cfg.launcher.name == "slurm":
        submit_pipeline(cfg, overrides, grid(cfg, overrides))
        return
    report = run(cfg, overrides)
    if main_rank():
        print(summary(report))
        if os.environ.get(REPORT_ENV):  # a parent pipeline runs this step in a process of its own
            atomic_write_text(Path(os.environ[REPORT_ENV]), json.dumps(report))
    if report["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
