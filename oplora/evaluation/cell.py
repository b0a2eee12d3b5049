"""Evaluate one trained cell (or the base model) with every stage its domain's table columns need.

    python -m oplora.evaluation experiment=table2 method=oplora16 seed=1 [eval.limit=100] [eval.only=[lm_eval]]
    python -m oplora.evaluation experiment=table2 method=base          # the untrained reference row

Uses the same config as training, so it finds the run in `output_dir` and checks that `run.json`
was trained with this config. Writes `eval/<stage>.json` in the run directory: metrics per task, details,
the evaluated model's identity (base, adapter and its sha256), the training config hash, the stage's
own hash, package versions. A stage whose result carries the same hash is skipped unless
`eval.force=true`; an interrupted stage resumes after its last finished task (`<stage>.partial.json`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path

from omegaconf import DictConfig

from oplora.artifacts import ArtifactUnavailable
from oplora.config import trains
from oplora.device import check_gpu, eval_dtype
from oplora.evaluation.stage import STAGES
from oplora.evaluation.target import Target, merged_dir
from oplora.io import CorruptFile, atomic_write_text, content_digest, content_hash, read_json
from oplora.record import as_dict, cell_hash, provenance
from oplora.resources import PREFIX, resolve
from oplora.rundir import RunDir

log = logging.getLogger("oplora.evaluation")
DATA_FILES = (".json", ".jsonl", ".gz", ".yaml")


def stage_tasks(columns) -> dict[str, list[str]]:
    """Each stage's tasks in column order, each once."""
    tasks: dict[str, list[str]] = {}
    for column in columns:
        if column.stage not in STAGES.classes:
            raise ValueError(f"column {column.label!r} names stage {column.stage!r}; valid: "
                             f"{', '.join(STAGES.names())}")
        if column.task not in tasks.setdefault(column.stage, []):
            tasks[column.stage].append(column.task)
    return tasks


def target_for(cfg: DictConfig) -> tuple[Target, str]:
    """The model to evaluate and the hash of what produced it (`cell_hash`).

    A trained cell's adapter is the one in its run directory, whose sha256 must be the one training
    recorded: an adapter copied or edited after training is refused.
    """
    dtype, trust = eval_dtype(cfg.model, cfg.eval.cpu_dtype), cfg.model.trust_remote_code
    chash = cell_hash(cfg)
    base = resolve(cfg.model.path)
    if not trains(cfg.method):
        return Target(base, None, dtype, trust), chash
    run = RunDir(cfg.output_dir)
    record = run.trained_record()
    if record is None:
        raise FileNotFoundError(f"{run.record} does not exist: train this cell first "
                                "(python -m oplora.train with the same overrides)")
    if record["config_hash"] != chash:
        raise ValueError(f"{run.record} was trained with another config (hash {record['config_hash'][:12]}, "
                         f"this config {chash[:12]}); retrain it or evaluate with its own overrides")
    run.check_adapter(record)
    return Target(base, str(run.adapter), dtype, trust), chash


def check_metrics(name: str, task: str, result: dict) -> None:
    """No non-finite number leaves a stage: a NaN/inf metric means a broken model or scorer."""
    for metric, value in result["metrics"].items():
        if not isinstance(value["value"], (int, float)) or not math.isfinite(value["value"]):
            raise FloatingPointError(f"{name}/{task}: {metric} = {value['value']}: the model or its scoring is "
                                     "broken (non-finite); nothing is written for this task")


def read_previous(path: Path) -> dict:
    """A stage's earlier result or partial file; a corrupt one is named, set aside and recomputed."""
    try:
        return read_json(path) or {}
    except CorruptFile as err:
        log.warning("%s", err)
        path.unlink()
        return {}


class TasksFailed(RuntimeError):
    """Some tasks of the cell's stages failed (each named with its error); the others' results were written."""

    def __init__(self, failed: dict[str, dict[str, str]]):
        self.scope = {stage: sorted(tasks) for stage, tasks in failed.items()}
        causes: dict[str, list[str]] = {}  # one line per cause: a missing artifact several tasks need is named once
        for stage, tasks in failed.items():
            for task, why in tasks.items():
                causes.setdefault(why, []).append(f"{stage}/{task}")
        super().__init__("; ".join(f"{', '.join(where)}: {why}" for why, where in causes.items()))


def stage_key(cfg: DictConfig, name: str, tasks: list[str], target: Target, chash: str) -> str:
    """What a stage's result depends on: the stage's evaluator (its `version`), its tasks, settings, limit, the
    evaluated model, the content of its local data and the training config. A result carrying another key is stale."""
    settings = as_dict(cfg.eval[name])
    return content_hash({"stage": name, "version": STAGES.get(name).version, "tasks": tasks, "settings": settings,
                         "limit": stage_limit(cfg, name), "target": target.identity(), "data": local_data(settings),
                         "train_config_hash": chash})


def stage_limit(cfg: DictConfig, name: str) -> int | None:
    return cfg.eval[name].get("limit") or cfg.eval.limit


def current_result(cfg: DictConfig, stage: str) -> dict | None:
    """The cell's result of one stage when it is readable and was computed for the cell's current config and eval
    settings; None (with a warning naming the file) otherwise. Every reader of results goes through here."""
    run = RunDir(cfg.output_dir)
    path, failures = run.eval_result(stage), run.failures()
    if "train" in failures or ("eval" in failures and run.failure_scope("eval") is None):
        return None  # the cell's training or whole evaluation failed since: whatever is here is not its result
    try:
        result = read_json(path)
    except CorruptFile as err:
        warnings.warn(f"{err}: its columns are shown as —", stacklevel=2)
        return None
    if result is None:
        return None
    try:
        target, chash = target_for(cfg)
        expected = stage_key(cfg, stage, stage_tasks(cfg.eval.columns)[stage], target, chash)
    except (OSError, ValueError) as err:  # not trained (any more), another config, an edited adapter
        warnings.warn(f"{path} is stale, it does not belong to the cell as configured now ({err}): its columns are "
                      "shown as —", stacklevel=2)
        return None
    if result.get("stage_hash") != expected:
        warnings.warn(f"{path} was computed for another config, other eval settings or another version of the stage "
                      "(stale): its columns are shown as — until the cell is evaluated again", stacklevel=2)
        return None
    return result


def run_stage(cfg: DictConfig, name: str, tasks: list[str], target: Target, chash: str, merged) -> tuple[Path, bool]:
    """Run (or skip, when finished with the same hash) one stage; (its result file, whether it ran).

    A task that fails is recorded in the result's `failed` (its columns show —) and the stage goes on with the next;
    the finished tasks stay in the partial file, so a rerun does only the failed ones. TasksFailed is raised at the
    end of `evaluate`."""
    run = RunDir(cfg.output_dir)
    out = run.eval_result(name)
    settings, limit = as_dict(cfg.eval[name]), stage_limit(cfg, name)
    identity = target.identity()
    key = stage_key(cfg, name, tasks, target, chash)
    previous = read_previous(out)
    if previous.get("stage_hash") == key and not previous.get("failed") and not cfg.eval.force:
        log.info("%s: finished with these settings (hash %s); eval.force=true redoes it", out, key[:12])
        return out, False
    partial_path = run.eval_partial(name)
    partial = read_previous(partial_path)
    if partial.get("stage_hash") != key or cfg.eval.force:
        partial = {"stage_hash": key, "tasks": {}}
    cls, stage, failed = STAGES.get(name), None, {}
    try:
        for task in tasks:
            if task in partial["tasks"]:
                log.info("%s/%s: already evaluated, resuming after it", name, task)
                continue
            log.info("%s/%s: evaluating %s", name, task, target.adapter or target.base)
            if stage is None:
                use_merged = cls.generates or cfg.eval.merge
                stage = cls(target, settings, limit, run.eval_work(name), merged() if use_merged else None)
            try:
                result = stage.run(task)
                check_metrics(name, task, result)
            except FloatingPointError:  # a broken model: every task would be meaningless
                raise
            except Exception as err:  # one task's failure (its data, its loader) must not hide the others' results
                log.error("%s/%s failed: %s", name, task, err)
                failed[task] = f"{type(err).__name__}: {err}"
                continue
            partial["tasks"][task] = result
            atomic_write_text(partial_path, json.dumps(partial, indent=2))
    finally:  # the next stage of this process gets the GPU memory this one held
        if stage is not None:
            stage.close()
    results = partial["tasks"].values()
    record = {"stage": name, "stage_hash": key, "run": str(run.root), "target": identity,
              "train_config_hash": chash, "settings": settings, "limit": limit, "tasks": tasks,
              "metrics": {k: v for r in results for k, v in r["metrics"].items()},
              "details": {k: v for r in results for k, v in r["details"].items()}, "failed": failed, **provenance()}
    atomic_write_text(out, json.dumps(record, indent=2))
    if not failed:
        partial_path.unlink(missing_ok=True)
    log.info("%s: %s", out, {k: round(v["value"], 4) for k, v in record["metrics"].items()})
    return out, True


def local_data(settings, found: dict | None = None) -> dict[str, str]:
    """{path: content digest} of every local file or directory a stage's settings name (task YAMLs and their
    data, local problem files): evaluation data changed in place changes the stage's hash."""
    found = {} if found is None else found
    values = settings.values() if isinstance(settings, dict) else settings if isinstance(settings, list) else [settings]
    for value in values:
        if isinstance(value, (dict, list)):
            local_data(value, found)
        elif isinstance(value, str) and (value.startswith(PREFIX) or "/" in value or value.endswith(DATA_FILES)):
            try:
                path = Path(resolve(value))
            except ArtifactUnavailable:  # its tasks fail on their own; the stage's other tasks run
                found[value] = "unavailable"
                continue
            if path.exists():
                found[value] = content_digest(path)
    return found


def evaluate(cfg: DictConfig) -> dict[str, tuple[Path, bool]]:
    """Every stage the columns need (or `eval.only`): {stage: (result file, whether it ran)}."""
    check_gpu(cfg.model)
    RunDir(cfg.output_dir).remove_stale_temporaries()
    target, chash = target_for(cfg)
    wanted = stage_tasks(cfg.eval.columns)
    only = list(cfg.eval.only or wanted)
    unknown = [s for s in only if s not in wanted]
    if unknown:
        raise ValueError(f"eval.only names {unknown}; this domain's columns use the stages {', '.join(wanted)}")
    merge_to = RunDir(cfg.output_dir).merged
    cache: list[str] = []

    def merged() -> str:
        if not cache:
            log.info("merging %s into %s", target.adapter, merge_to)
            cache.append(merged_dir(target, merge_to))
        return cache[0]

    try:
        outputs = {name: run_stage(cfg, name, wanted[name], target, chash, merged) for name in only}
    finally:  # also when a stage failed: a 7B merge in float32 is 27 GB
        if not cfg.eval.keep_merged and target.adapter and merge_to.exists():
            shutil.rmtree(merge_to)
    failed = {name: found for name, (path, _) in outputs.items() if (found := read_json(path).get("failed"))}
    if failed:
        raise TasksFailed(failed)
    return outputs

