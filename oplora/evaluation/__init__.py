"""Evaluation stages, registered by the name the eval configs' columns use.

A stage is a class built with (target, settings, limit, workdir, merged) whose `run(task)` returns
`{"metrics": {name: {"metric", "value", "stderr", "n"}}, "details": {...}}`; `generates` says
whether it decodes text (those always run on a merged model).
"""

from oplora.evaluation import code, drift, harness, math_eval

STAGES = {"lm_eval": harness.Stage, "evalplus": code.Stage, "math": math_eval.Stage, "kl": drift.Stage}
