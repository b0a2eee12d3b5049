"""evalplus's own CLI, run as `python -c <this file's text> <codegen|evaluate> <args>` (it never imports oplora).

Three adjustments, the first two through environment variables:
- CAP_ENV: the cap of evalplus's decoders (no option sets their max_new_tokens of 768);
- TEMPLATE_ENV: a prompt template with `{query}` (the training prompt): every decoder then prompts with
  it instead of the raw problem or a chat template, and stops at the end of a code block, as with a chat template;
  evalplus's sanitizer extracts the code from the response;
- evaluate's watchdog thread becomes a daemon: as a plain thread it holds the finished process for up to 20 s.
"""

import functools
import importlib
import os
import sys
import threading
import types

CAP_ENV = "OPLORA_EVALPLUS_MAX_NEW_TOKENS"
TEMPLATE_ENV = "OPLORA_EVALPLUS_TEMPLATE"


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


def main(step: str, args: list[str]) -> None:
    from fire import Fire

    if cap := os.environ.get(CAP_ENV):
        cap_new_tokens(int(cap))
    if template := os.environ.get(TEMPLATE_ENV):
        prompt_with(template)
    cli = importlib.import_module("evalplus." + step)
    cli.threading = types.SimpleNamespace(Thread=functools.partial(threading.Thread, daemon=True))
    Fire(cli.run_codegen if step == "codegen" else cli.evaluate, command=args)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
