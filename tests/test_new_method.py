"""A seventh method is one module and one config: registered here, in a test file, it trains, exports, is
diagnosed and evaluated by the pipeline without a change anywhere else in the project; added inside oplora/methods/
(in a copy of the project), the method tests pick it up without an edit."""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from helpers import compose, eval_overrides, load, logits, rel
from oplora.methods import Method, register
from oplora.methods.base import ADAPTER, lora_layers
from oplora.pipeline import run, summary


@dataclass(frozen=True)
class Options:
    init_scale: float = 0.01


@register
class ReversedLoRA(Method):
    """LoRA with the roles of the factors swapped at init: A = 0, B small random (ΔW = 0 at step 0)."""

    name = "reversed_lora"
    Options = Options

    def initialize(self, model, settings, svd, tokenizer=None):
        scale = self.options(settings).init_scale
        generator = torch.Generator().manual_seed(0)
        for _, layer in lora_layers(model):
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            with torch.no_grad():
                A.zero_()
                B.copy_(scale * torch.randn(B.shape, generator=generator))


def test_the_registry_refuses_empty_and_duplicate_names():
    with pytest.raises(ValueError, match="already registered by ReversedLoRA"):
        register(type("Again", (Method,), {"name": "reversed_lora"}))
    with pytest.raises(ValueError, match="needs a name"):
        register(type("Nameless", (Method,), {}))


def test_a_method_from_outside_runs_through_the_pipeline(data_files, tasks, tmp_path):
    configs = tmp_path / "configs" / "method"
    configs.mkdir(parents=True)
    (configs / "reversed.yaml").write_text("name: reversed_lora\nlabel: reversed\ndisplay: Reversed LoRA\n"
                                           "module: test_new_method\ninit_scale: 0.02\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "model=tiny-llama", "data=metamath100k",
                 f"data.path={data_files['metamath100k']}", "train=math", "train.max_steps=2", "train.batch_size=4",
                 "train.micro_batch_size=4", "train.lora_r=8", "train.lora_alpha=16", "train.lr=1e-2",
                 "experiment_name=seventh", f"output_dir={tmp_path}/runs/${{method.label}}/seed${{seed}}",
                 f"pipeline.results_dir={tmp_path}/tables", "pipeline.methods=[reversed]", "pipeline.rho_ks=[8]",
                 "pipeline.compare_to=reversed", "wandb=disabled", f"cache_dir={tmp_path}/cache",
                 *eval_overrides(tasks, "eval.limit=4")]
    report = run(compose(*overrides), overrides)
    assert report["failed"] == {}, summary(report)
    assert report["ran"]["train"] == report["ran"]["diagnose"] == ["reversed/seed42"]

    cell = tmp_path / "runs" / "reversed" / "seed42"
    record = json.loads((cell / "run.json").read_text())
    assert record["config"]["method"]["init_scale"] == 0.02  # the method's own setting reached training
    base = load(record["base_model"])
    reference = logits(base)
    vanilla = PeftModel.from_pretrained(base, str(cell / "adapter")).eval()
    assert rel(logits(vanilla), reference) > 1e-6  # exported by the default export, it loads in vanilla PEFT
    collected = json.loads((tmp_path / "tables" / "collect.json").read_text())
    assert list(collected["rows"]) == ["Base", "Reversed LoRA"]
    assert None not in collected["rows"]["Reversed LoRA"].values()
    assert 0 < collected["rho"]["Reversed LoRA"]["8"] <= 1


REPO = Path(__file__).resolve().parents[1]
IN_TREE_MODULE = "\n".join([  # ReversedLoRA above, as a module of oplora/methods/ under a name of its own
    "from dataclasses import dataclass", "", "import torch", "",
    "from oplora.methods.base import ADAPTER, Method, lora_layers, register", "", "",
    inspect.getsource(Options), "", inspect.getsource(ReversedLoRA).replace('"reversed_lora"', '"in_tree_lora"')])


def test_a_method_added_in_tree_is_tested_by_the_suite_unedited(tmp_path):
    """In a copy of the project, one module in oplora/methods/ and one config in configs/method/, nothing else: the
    package scan registers it, and the unedited method tests collect and pass it (init, vanilla-PEFT export,
    training; DeepSpeed collected only, for time)."""
    tree = tmp_path / "tree"
    for part in ("oplora", "configs", "tests", "results/paper", "pyproject.toml"):
        source, copy = REPO / part, tree / part
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy)
    (tree / "oplora" / "methods" / "in_tree_lora.py").write_text(IN_TREE_MODULE)
    (tree / "configs" / "method" / "in_tree_lora.yaml").write_text(
        "name: in_tree_lora\nlabel: in_tree_lora\ndisplay: In-tree LoRA\ncolor: \"#17becf\"\ninit_scale: 0.02\n")
    tests = ["tests/test_methods.py", "tests/test_export.py", "tests/test_train.py", "tests/test_config.py"]
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *tests]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    collected = subprocess.run([*pytest, "--collect-only"], cwd=tree, env=env, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert {line for line in collected.stdout.splitlines() if "in_tree_lora" in line} == {
        "tests/test_methods.py::test_init_logits_equal_base[llama-in_tree_lora]",
        "tests/test_methods.py::test_init_logits_equal_base[qwen2-in_tree_lora]",
        "tests/test_export.py::test_vanilla_peft_reproduces_trained_model[llama-in_tree_lora]",
        "tests/test_export.py::test_vanilla_peft_reproduces_trained_model[qwen2-in_tree_lora]",
        "tests/test_train.py::test_every_method_trains_and_exports[in_tree_lora]",
        "tests/test_train.py::test_deepspeed_zero2[in_tree_lora-2]"}
    wanted = "(in_tree_lora and not deepspeed) or every_method_has"
    ran = subprocess.run([*pytest, "-rA", "-k", wanted], cwd=tree, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    passed = set(re.findall(r"^PASSED (\S+)", ran.stdout, flags=re.M))
    assert {"tests/test_train.py::test_every_method_trains_and_exports[in_tree_lora]",
            "tests/test_methods.py::test_every_method_has_a_config_and_every_config_a_method"} <= passed
    assert len([p for p in passed if "in_tree_lora" in p]) == 5, passed
