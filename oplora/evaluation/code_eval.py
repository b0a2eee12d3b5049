"""HF `code_eval` (the metric lm_eval's mbpp, mbpp_plus and humaneval tasks load) with every program run in the sandbox.

Within `sandboxed_code_eval(mode)`, `evaluate.load("code_eval")` returns `SandboxedCodeEval`: the same `compute`
interface (predictions: candidates per problem, references: the test code, `k`, `timeout`), but all programs
`candidate + "\n" + test` of one call are written to a scratch directory and run in one `oplora.sandbox` process, each
in its own `python -I` with the timeout; a program passes when it exits with status 0. HF's own code_eval would run
them in this process's forked workers, guarded only by its "reliability guard", which it says is not a security
sandbox. It also needs no hub download. Tasks lm_eval marks `unsafe_code` that never load code_eval run code some
other way: they are refused unless the sandbox is off.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from math import comb
from pathlib import Path

import evaluate

from oplora import sandbox

# Runs inside the sandbox: programs.json (a list of programs) → one JSON list of exit-status-0 verdicts on stdout.
RUNNER = """
import json, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
programs, timeout, workers = json.load(open("programs.json")), float(sys.argv[1]), int(sys.argv[2])
def passed(i):
    try:
        return subprocess.run([sys.executable, "-I", f"program_{i}.py"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False
for i, program in enumerate(programs):
    open(f"program_{i}.py", "w").write(program)
with ThreadPoolExecutor(workers) as pool:
    print(json.dumps(list(pool.map(passed, range(len(programs))))))
"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of HF code_eval (and Codex): 1 − C(n−c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


class SandboxedCodeEval:
    def __init__(self, mode: str):
        self.mode = mode

    def compute(self, predictions: list[list[str]], references: list[str], k: list[int] = (1, 10, 100),
                num_workers: int = 4, timeout: float = 3.0) -> tuple[dict, dict]:
        programs = [f"{candidate}\n{test}"
                    for candidates, test in zip(predictions, references, strict=True) for candidate in candidates]
        with tempfile.TemporaryDirectory(prefix="oplora-code-eval-") as scratch:
            (Path(scratch) / "programs.json").write_text(json.dumps(programs))
            done = sandbox.run([sys.executable, "-c", RUNNER, str(timeout), str(num_workers)], scratch, {}, self.mode,
                               capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"sandboxed code_eval failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        verdicts = iter(json.loads(done.stdout.strip().splitlines()[-1]))
        results = {i: [(j, {"task_id": i, "completion_id": j, "passed": (ok := next(verdicts)),
                            "result": "passed" if ok else "failed"}) for j in range(len(candidates))]
                   for i, candidates in enumerate(predictions)}
        counts = [(len(r), sum(v["passed"] for _, v in r)) for r in results.values()]
        scores = {f"pass@{kk}": sum(pass_at_k(n, c, kk) for n, c in counts) / len(counts)
                  for kk in k if all(n >= kk for n, _ in counts)}
        return scores, results


@contextlib.contextmanager
def sandboxed_code_eval(mode: str, task_manager=None):
    """`evaluate.load("code_eval")` gives `SandboxedCodeEval(mode)` inside the block; with `task_manager`, its loaded
    tasks marked `unsafe_code` must have loaded code_eval (else they would execute code outside the sandbox). The
    sandbox itself is required when a task loads code_eval (before generation): tasks that run no code need no bwrap."""
    sandbox.check_mode(mode)
    for name, module in list(sys.modules.items()):  # task code lm_eval's YAML loader imported (it marks it with
        if "__mtime__" in getattr(module, "__dict__", {}):  # __mtime__) is re-imported here, so that it loads
            del sys.modules[name]  # code_eval from this block, never a copy kept from elsewhere
    original_load, original_tasks = evaluate.load, task_manager.load if task_manager else None
    used = []

    def load(path, *args, **kwargs):
        if str(path).rstrip("/").rsplit("/", 1)[-1] == "code_eval":
            sandbox.require(mode)  # at task load: before any generation
            used.append(path)
            return SandboxedCodeEval(mode)
        return original_load(path, *args, **kwargs)

    def load_tasks(*args, **kwargs):
        loaded = original_tasks(*args, **kwargs)
        unsafe = [name for name, task in loaded["tasks"].items() if getattr(task, "UNSAFE_CODE", False)]
        if unsafe and not used and mode != "none":
            raise RuntimeError(f"lm_eval tasks {unsafe} execute code without HF code_eval, so not in the sandbox; "
                               f"refusing (eval.sandbox=none runs them unsandboxed)")
        return loaded

    evaluate.load = load
    if task_manager:
        task_manager.load = load_tasks
    try:
        yield
    finally:
        evaluate.load = original_load
        if task_manager:
            del task_manager.load  # back to the class's method
