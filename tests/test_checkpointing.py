"""Gradient checkpointing (`train.gradient_checkpointing=true`) changes memory only: every method gets the same
gradients from the HF Trainer's step with and without it."""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers import adapt, settings

METHODS = {"lora": {}, "pissa": {}, "milora": {}, "lora_null": {}, "oplora": {"k": 16}}


class KeepGradients(TrainerCallback):
    """The adapter's gradients of the step, read just before the optimizer uses them."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def step_gradients(model, checkpointing: bool, directory) -> dict[str, torch.Tensor]:
    """One Trainer step (dropout on, learning rate 0: the model does not change between the two calls)."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(directory), use_cpu=True, report_to=[], max_steps=1, learning_rate=0.0,
                             per_device_train_batch_size=2, save_strategy="no", remove_unused_columns=False,
                             gradient_checkpointing=checkpointing, seed=0)
    keep = KeepGradients()
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[keep]).train()
    return keep.grads


@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_gradients(method, arch, tiny_dirs, svd, calibration_file, tmp_path):
    method_settings = settings(method, calibration_file, dropout=0.05, **METHODS[method])
    _, model = adapt(tiny_dirs[arch], method_settings, svd)
    plain = step_gradients(model, False, tmp_path / "plain")
    checkpointed = step_gradients(model, True, tmp_path / "checkpointed")
    assert all(layer.gradient_checkpointing for layer in model.base_model.model.model.layers)  # really on
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 5 * 2  # A and B of 5 targets in 2 layers
    assert all(plain[name].abs().max() > 0 for name in plain if "lora_B" in name)  # a real step
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
