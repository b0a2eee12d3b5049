"""A seventh method is one module and one config: registered here, in a test file, it trains, exports, is
diagnosed and evaluated by the pipeline without a change anywhere else in the project."""

import json
from dataclasses import dataclass

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
