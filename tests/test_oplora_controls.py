"""OPLoRA's width-matched k and its controls: the protected subspace is the top, the bottom or a random one, all
else equal; each update leaves exactly its own subspace untouched."""

import pytest
import torch

from helpers import adapt, settings, train
from oplora.diagnose import diagnose, model_deltas
from oplora.methods.base import ADAPTER, lora_layers
from oplora.methods.oplora import Options, random_basis


def protected(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k, V_k) an OPLoRA layer projects away."""
    return (layer.lora_B[ADAPTER].parametrizations.weight[0].basis,
            layer.lora_A[ADAPTER].parametrizations.weight[0].basis)


@pytest.mark.parametrize("subspace", ["top", "bottom", "random"])
def test_each_subspace_is_left_untouched_and_only_top_protects_the_dominant_one(tiny_dirs, svd, subspace):
    original, model = adapt(tiny_dirs["llama"], settings("oplora", k_fraction=0.125, subspace=subspace), svd)
    train(model, steps=10, lr=1e-3)
    deltas = model_deltas(model, original)
    for name, layer in lora_layers(model):
        W = original[name].double()
        U, V = (b.double() for b in protected(layer))
        k = round(0.125 * min(W.shape))  # width-matched: v_proj (32×64) keeps 4, the 64-wide matrices 8
        assert U.shape == (W.shape[0], k) and V.shape == (W.shape[1], k), name
        assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-6), name
        full_U, S, full_Vh = torch.linalg.svd(W, full_matrices=False)
        expected = {"top": (full_U[:, :k], full_Vh[:k].T),
                    "bottom": (full_U[:, len(S) - k:len(S)], full_Vh[len(S) - k:].T),
                    "random": (random_basis(W.shape[0], k, 0, name, "left").double(),
                               random_basis(W.shape[1], k, 0, name, "right").double())}[subspace]
        for found, wanted in zip((U, V), expected, strict=True):  # the same subspace (bases up to signs)
            assert torch.allclose((found.T @ wanted).abs(), torch.eye(k, dtype=torch.float64), atol=1e-5), name
        delta = deltas[name].double()
        assert delta.norm() > 0 and (delta @ V).norm() <= 1e-6 * delta.norm() and (U.T @ delta).norm() <= \
            1e-6 * delta.norm(), name  # Proposition 2's conditions, for the subspace it protects
    rho = diagnose(original, deltas, [4], svd)["aggregate"]["rho_max"]["4"]
    assert (rho <= 1e-10) == (subspace == "top")  # only top leaves the dominant directions alone


def test_the_random_subspace_is_seeded_per_matrix_and_side():
    basis = random_basis(48, 6, 0, "model.layers.0.self_attn.q_proj", "left")
    assert torch.equal(basis, random_basis(48, 6, 0, "model.layers.0.self_attn.q_proj", "left"))
    assert not torch.allclose(basis, random_basis(48, 6, 1, "model.layers.0.self_attn.q_proj", "left"))
    assert not torch.allclose(basis, random_basis(48, 6, 0, "model.layers.1.self_attn.q_proj", "left"))
    assert torch.allclose(basis.T @ basis, torch.eye(6), atol=1e-6)


def test_width_matched_k_and_bad_settings_are_refused_before_any_compute(tiny_dirs, svd):
    assert Options(k_fraction=0.03125).rank((4096, 4096)) == 128 and Options(k_fraction=0.03125).rank((576, 576)) == 18
    assert Options(k_fraction=0.00390625).rank((192, 576)) == 1  # at least one
    for bad, match in (({"k": 8, "k_fraction": 0.1}, "exactly one of k"), ({}, "exactly one of k"),
                       ({"k_fraction": 1.5}, "0 < k_fraction < 1"), ({"k": 4, "subspace": "left"}, "valid: top"),
                       ({"k_fraction": 0.99}, "must be below min")):
        with pytest.raises(ValueError, match=match):
            adapt(tiny_dirs["llama"], settings("oplora", **bad), svd)


def test_the_projection_stays_float32_under_bf16_mixed_precision(tiny_dirs, svd):
    """bf16 training (the paper's; torch.autocast on CPU and GPU) must not round the projection's products."""
    _, model = adapt(tiny_dirs["llama"], settings("oplora", k=8), svd)
    _, layer = next(iter(lora_layers(model)))
    module = layer.lora_B[ADAPTER]
    with torch.no_grad():
        module.parametrizations.weight.original.normal_(0, 1)
    plain = module.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.weight.detach().clone()
    U = protected(layer)[0]
    assert torch.equal(mixed, plain) and (U.T @ mixed).abs().max() < 1e-5
