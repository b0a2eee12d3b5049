"""evalplus's own code, run as `python -c <this file's text> <step> <args>` (it never imports oplora).

Steps:
- `codegen <evalplus codegen options>`: evalplus's codegen CLI, with two adjustments through environment variables:
  CAP_ENV, the cap of evalplus's decoders (no option sets their max_new_tokens of 768), and TEMPLATE_ENV, a prompt
  template with `{query}` (the training prompt): every decoder then prompts with it instead of the raw problem or a
  chat template, and stops at the end of a code block, as with a chat template; evalplus's sanitizer extracts the code
  from the response.
- `groundtruth <dataset> <directory>` (in the sandbox, dataset code only): evalplus's problems (the override file)
  and expected outputs (`get_groundtruth`, running the canonical solutions), one pickle per task `<i>.pkl` and
  INDEX ({"hash", "tasks": task ids in order}) in `directory`.
- `check <dataset> <task pickle> <solution file>` (in a sandbox of its own, one candidate): evalplus's
  `untrusted_check` on the base and the plus inputs, as `evalplus.evaluate.check_correctness` calls it (that module is
  not imported: it imports `datasets`, 0.6 s and 1.4 GB of address space per candidate); prints the last line
  {"base": status, "plus": status}.
"""

import importlib
import json
import os
import pickle
import sys

CAP_ENV = "OPLORA_EVALPLUS_MAX_NEW_TOKENS"
TEMPLATE_ENV = "OPLORA_EVALPLUS_TEMPLATE"
INDEX = "index.json"


def cap_new_tokens(cap: int) -> None:
    from evalplus.provider.base import DecoderBase

    init = DecoderBase.__init__
    DecoderBase.__init__ = lambda self, *a, **kw: init(self, *a, **{**kw, "max_new_tokens": cap})


def prompt_with(template: str) -> None:
    """Every decoder prompts with `template.format(query=<the problem's prompt>)` and decodes as a chat model."""
    for name in ("hf", "vllm"):
        try:
            provider = importlib.import_module(f"evalplus.provider.{name}")
        except ImportError:  # vllm is optional
            continue
        provider.make_raw_chat_prompt = lambda task_prompt, *_: template.format(query=task_prompt.strip())
        for decoder in vars(provider).values():
            if isinstance(decoder, type) and hasattr(decoder, "is_direct_completion"):
                decoder.is_direct_completion = lambda self: False


def codegen(args: list[str]) -> None:
    from evalplus.codegen import run_codegen
    from fire import Fire

    if cap := os.environ.get(CAP_ENV):
        cap_new_tokens(int(cap))
    if template := os.environ.get(TEMPLATE_ENV):
        prompt_with(template)
    Fire(run_codegen, command=args)


def ground_truth(dataset: str, directory: str) -> None:
    """The problems and expected outputs of evalplus's `evaluate` for `dataset`, one pickle per task."""
    from evalplus.data import get_human_eval_plus, get_human_eval_plus_hash, get_mbpp_plus, get_mbpp_plus_hash
    from evalplus.evaluate import MBPP_OUTPUT_NOT_NONE_TASKS, get_groundtruth

    if dataset == "humaneval":
        problems, digest, not_none = get_human_eval_plus(), get_human_eval_plus_hash(), []
    else:
        problems, digest, not_none = get_mbpp_plus(), get_mbpp_plus_hash(), MBPP_OUTPUT_NOT_NONE_TASKS
    expected = get_groundtruth(problems, digest, not_none)
    os.makedirs(directory)
    for i, (task_id, problem) in enumerate(problems.items()):
        with open(os.path.join(directory, f"{i}.pkl"), "wb") as f:
            pickle.dump({"problem": problem, "expected": expected[task_id]}, f)
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"hash": digest, "tasks": list(problems)}, f)


def check(dataset: str, task_file: str, solution_file: str) -> None:
    """evalplus's verdicts on one solution (`check_correctness` with base_only=False and fast_check=True)."""
    from evalplus.eval import untrusted_check

    with open(task_file, "rb") as f:
        task = pickle.load(f)
    with open(solution_file) as f:
        solution = f.read()
    problem, expected = task["problem"], task["expected"]
    statuses = {part: untrusted_check(dataset, solution, problem[f"{part}_input"], problem["entry_point"],
                                      expected=expected[part], atol=problem["atol"], ref_time=expected[f"{part}_time"],
                                      fast_check=True)[0]
                for part in ("base", "plus")}
    print("\n" + json.dumps(statuses), flush=True)


def main(step: str, args: list[str]) -> None:
    if step == "codegen":
        codegen(args)
    else:
        {"groundtruth": ground_truth, "check": check}[step](*args)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
