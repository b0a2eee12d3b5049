"""HF `code_eval` (the metric lm_eval's mbpp, mbpp_plus and humaneval tasks load) with every program run in the sandbox.

Within `sandboxed_code_eval(mode)`, `evaluate.load("code_eval")` returns `SandboxedCodeEval`: the same `compute`
interface (predictions: candidates per problem, references: the test code, `k`, `num_workers`, `timeout`), but each
program `candidate + "\n" + test` runs alone in its own `oplora.sandbox` run (`num_workers` at a time): its own
private scratch, nothing of the other programs visible, the sandbox's memory and process limits, and the sandbox's
deadline of `timeout` + 1 s (code_eval's own slack) enforced from outside. A program passes when it exits with status
0; a failed one's `result` says why (its last stderr line, or the deadline). HF's own code_eval would run them in this
process's forked workers, guarded only by its "reliability guard", which it says is not a security sandbox. It also
needs no hub download. Tasks lm_eval marks `unsafe_code` that never load code_eval run code some other way: they are
refused unless the sandbox is off.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from math import comb

import evaluate

from oplora import sandbox

log = logging.getLogger(__name__)
PROGRAM = "program.py"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of HF code_eval (and Codex): 1 − C(n−c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def verdict(outcome: sandbox.Outcome) -> tuple[bool, str]:
    """A program's (passed, result) in code_eval's words: "passed", "timed out: …" or "failed: …"."""
    if outcome.deadline_s is not None:
        return False, f"timed out: {outcome.failure()}"
    return (True, "passed") if outcome.returncode == 0 else (False, f"failed: {outcome.failure()}")


class SandboxedCodeEval:
    def __init__(self, mode: str):
        self.mode = mode

    def run_program(self, program: str, limits: sandbox.Limits) -> tuple[bool, str]:
        argv = [sys.executable, "-I", f"{sandbox.INPUT}/{PROGRAM}"]
        return verdict(sandbox.run(argv, {}, self.mode, limits, inputs={PROGRAM: program}))

    def compute(self, predictions: list[list[str]], references: list[str], k: list[int] = (1, 10, 100),
                num_workers: int = 4, timeout: float = 3.0) -> tuple[dict, dict]:
        sandbox.require(self.mode)
        programs = [f"{candidate}\n{test}"
                    for candidates, test in zip(predictions, references, strict=True) for candidate in candidates]
        limits = sandbox.Limits(deadline_s=timeout + 1)
        with ThreadPoolExecutor(num_workers) as pool:
            verdicts = iter(pool.map(lambda program: self.run_program(program, limits), programs))
        results = {i: [(j, {"task_id": i, "completion_id": j, "passed": (v := next(verdicts))[0], "result": v[1]})
                       for j in range(len(candidates))]
                   for i, candidates in enumerate(predictions)}
        if late := sorted({i for i, r in results.items() for _, v in r if v["result"].startswith("timed out")}):
            log.warning("code_eval: programs of problems %s ran past the sandbox deadline of %g s; counted as failed",
                        late, limits.deadline_s)
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
