"""lm_eval stage: log-likelihood and generation tasks through lm-evaluation-harness's own machinery.

Tasks are lm_eval task names, built-in or from YAML directories on `include_path` (local data works
offline). Each task runs on its own so that a killed stage resumes after its last finished task.
The reported number is the first metric of `metrics` the task has (acc_norm before acc by default,
the paper's published numbers match that choice); every metric lm_eval computed is kept as detail.
`add_bos_token` is passed to HFLM as set (false: lm_eval 0.4.9's behaviour, the paper's; null: the tokenizer's own
default, 0.4.13's) and the value the model used is recorded with each task.
Tasks that execute generated code (mbpp: HF code_eval) run it only in the sandbox (`evaluation/code_eval.py`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

from oplora.artifacts import ArtifactUnavailable
from oplora.device import batch_size, resolve_device
from oplora.evaluation.code_eval import sandboxed_code_eval
from oplora.evaluation.common import check_generations, check_loglikelihoods
from oplora.evaluation.stage import Stage, register
from oplora.evaluation.target import Target
from oplora.io import atomic_write_text
from oplora.resources import resolve

log = logging.getLogger(__name__)
SAMPLE_SKIP = ("doc", "arguments", "resps", "filtered_resps", "doc_id", "target", "filter")


@functools.cache
def _environment_report_once() -> None:
    """simple_evaluate records torch's environment report with every task; it runs about ten subprocesses (pip,
    nvidia-smi, …: 0.6 s a task) and cannot change within a process, so it is computed once."""
    import torch.utils.collect_env

    torch.utils.collect_env.get_pretty_env_info = functools.cache(torch.utils.collect_env.get_pretty_env_info)


@functools.cache
def _task_manager(include_path: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    _environment_report_once()
    return TaskManager(include_path=list(include_path) or None)


@functools.cache
def _include(name: str) -> tuple[str | None, str | None]:
    """(the directory, None) of an include path, or (None, why) when its data cannot be had."""
    try:
        return resolve(name), None
    except ArtifactUnavailable as err:
        return None, str(err)


def unavailable_includes(include_path: list[str]) -> dict[str, str]:
    """{include path: why} of the task directories whose data cannot be had (their tasks are unknown to lm_eval)."""
    return {str(p): why for p in include_path if (why := _include(str(p))[1])}


def task_manager(include_path: list[str]):
    """lm_eval's task index (about 15 s to build), built once per include path. A built-in task directory whose data
    cannot be had is left out, so the other tasks still run; its tasks are unknown, and `evaluate_task` says why."""
    return _task_manager(tuple(found for p in include_path if (found := _include(str(p))[0])))


def check_known(manager, task: str, include_path: list[str]) -> None:
    """lm_eval knows `task`; else an error saying why: a task directory whose data could not be had, or none given."""
    if manager.match_tasks([task]) == []:
        if missing := unavailable_includes(include_path):  # its directory's data, most likely: say why
            raise ArtifactUnavailable("\n".join(missing.values()))
        raise ValueError(f"lm_eval knows no task {task!r}; add its YAML directory to eval.lm_eval.include_path")


def load_lm(target: Target, settings: dict, merged: str | None):
    """An lm_eval HFLM on the merged model, or on the base with the exported adapter via `peft=`."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=merged or target.base, peft=None if merged else target.adapter,
                dtype=target.dtype, device=resolve_device().type, batch_size=batch_size(settings),
                trust_remote_code=target.trust_remote_code, add_bos_token=settings["add_bos_token"])


def pick(results: dict, preferred: list[str]) -> tuple[str, float, float | None]:
    """The first preferred metric a task reports (lm_eval keys look like "acc_norm,none")."""
    for metric in preferred:
        for key, value in results.items():
            if key.split(",")[0] == metric and isinstance(value, (int, float)):
                stderr = results.get(key.replace(metric, f"{metric}_stderr", 1))
                stderr = stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
                return metric, float(value), stderr
    found = sorted({k.split(",")[0] for k in results if "," in k})
    raise KeyError(f"none of the metrics {preferred} in the task's results; it reports {found}")


def write_samples(samples: dict, path: Path) -> None:
    """Per-document responses (log-likelihoods or generations) and scores of every (sub)task."""
    lines = [json.dumps({"task": task, "doc_id": s["doc_id"], "target": s["target"], "responses": s["filtered_resps"],
                         **{k: s[k] for k in s if k not in SAMPLE_SKIP}}, default=str) + "\n"
             for task, rows in samples.items() for s in rows]
    atomic_write_text(path, "".join(lines))


def evaluate_task(lm, task: str, settings: dict, limit: int | None, samples_path: Path, manager=None) -> dict:
    """Run one lm_eval task (or group) on `lm`; the stage result for it (samples go to `samples_path`)."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(settings["include_path"])
    check_known(manager, task, settings["include_path"])
    with sandboxed_code_eval(settings.get("sandbox", "bwrap"), manager):  # generated code runs only in the sandbox
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit,
                              num_fewshot=settings["num_fewshot"].get(task), log_samples=True,
                              confirm_run_unsafe_code=settings["allow_code_execution"])
    write_samples(out["samples"], samples_path)
    responses = [r for rows in out["samples"].values() for s in rows for r in s["filtered_resps"]]
    check_loglikelihoods([float(r[0]) for r in responses if isinstance(r, (list, tuple)) and len(r) == 2
                          and isinstance(r[0], (int, float))], f"lm_eval/{task}")
    check_generations([r for r in responses if isinstance(r, str)], f"lm_eval/{task}")
    results = out["results"][task]
    metric, value, stderr = pick(results, list(settings["metrics"]))
    n = out["n-samples"].get(task, {}).get("effective")
    return {"metrics": {task: {"metric": metric, "value": value, "stderr": stderr, "n": n}},
            "details": {task: {"results": results, "version": out["versions"].get(task),
                               "n_shot": out["n-shot"].get(task), "n_samples": out["n-samples"].get(task),
                               "add_bos_token": lm.add_bos_token,
                               "samples": str(samples_path)}}}


@register
class LmEval(Stage):
    """Loads the model once, on the first task that has not finished yet."""

    name = "lm_eval"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm = None
        self.manager = task_manager(self.settings["include_path"])

    def run(self, task: str) -> dict:
        if self.lm is None:
            self.lm = load_lm(self.target, self.settings, self.merged)
        return evaluate_task(self.lm, task, self.settings, self.limit, self.workdir / f"{task}.samples.jsonl",
                             self.manager)

    def close(self) -> None:
        self.lm = None
        super().close()
