"""The six methods on tiny random Llama and Qwen2 models: init, SVD subspaces, null space, OPLoRA guarantees."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn.utils import parametrize

from helpers import adapt, load, logits, method_configs, rel, settings, train
from oplora.diagnose import diagnose, model_deltas
from oplora.methods import get_method, methods
from oplora.methods.base import ADAPTER, lora_layers
from oplora.methods.oplora import per_token_delta

CASES = {**method_configs(), "lora_null_v2": ("lora_null", {"null_version": "v2"})}  # every method config, and v2
ALL, IDS = list(CASES.values()), list(CASES)


def test_every_method_has_a_config_and_every_config_a_method():
    built_in = sorted(m for m in methods() if type(get_method(m)).__module__.startswith("oplora.methods."))
    assert built_in == sorted({name for name, _ in method_configs().values()})  # (tests may register more)
    assert {"lora", "lora_null", "milora", "oplora", "pissa"} <= set(built_in)
    with pytest.raises(ValueError, match=f"valid methods: {', '.join(methods())}"):
        get_method("dora")


@pytest.mark.parametrize("method,extra", ALL, ids=IDS)
def test_init_logits_equal_base(tiny_dirs, arch, svd, calibration_file, method, extra):
    reference = logits(load(tiny_dirs[arch]))
    _, model = adapt(tiny_dirs[arch], settings(method, calibration_file, **extra), svd)
    assert rel(logits(model), reference) <= 1e-5


def projector(M: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(M.double())
    return Q @ Q.T


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_svd_methods_split_w_exactly_and_span_their_subspace(tiny_dirs, arch, svd, method):
    original, model = adapt(tiny_dirs[arch], settings(method), svd)
    for name, layer in lora_layers(model):
        W, s = original[name].double(), layer.scaling[ADAPTER]
        A, B = layer.lora_A[ADAPTER].weight.double(), layer.lora_B[ADAPTER].weight.double()
        W_res = layer.base_layer.weight.double()
        assert torch.allclose(W_res + s * B @ A, W, atol=1e-6 * W.abs().max())
        U, S, Vh = torch.linalg.svd(W)
        r = A.shape[0]
        sel = slice(0, r) if method == "pissa" else slice(min(W.shape) - r, min(W.shape))
        assert torch.allclose(projector(B), projector(U[:, sel]), atol=1e-5), name
        assert torch.allclose(projector(A.T), projector(Vh[sel].T), atol=1e-5), name
        assert torch.allclose(s * B @ A, U[:, sel] @ torch.diag(S[sel]) @ Vh[sel], atol=1e-5)


def test_pissa_matches_peft_builtin(tiny_dirs, svd):
    """Our cached-SVD PiSSA and PEFT's own init_lora_weights='pissa' give the same W_res and s·B A."""
    _, ours = adapt(tiny_dirs["llama"], settings("pissa"), svd)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "o_proj"],
                     init_lora_weights="pissa")
    theirs = dict(lora_layers(get_peft_model(load(tiny_dirs["llama"]), cfg)))
    for name, layer in lora_layers(ours):
        other = theirs[name]
        assert torch.allclose(layer.base_layer.weight, other.base_layer.weight, atol=1e-5)
        assert torch.allclose(layer.get_delta_weight(ADAPTER), other.get_delta_weight(ADAPTER), atol=1e-5)


def test_lora_null_rows_of_a_lie_in_the_activation_null_space(tiny_dirs, arch, svd, calibration_file):
    from transformers import AutoTokenizer

    from oplora import calibration

    s = settings("lora_null", calibration_file)
    _, model = adapt(tiny_dirs[arch], s, svd)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    text = calibration.corpus(calibration.CalibrationSettings(**s.options["calibration"]))
    batches = calibration.windows(tokenizer, text, 6, 48, 233)
    layers = dict(lora_layers(model))
    # adapters stay on: W_res + s·B A = W, so each layer sees the original model's activations
    covs = calibration.covariances(model, {n: layer.base_layer for n, layer in layers.items()}, batches)
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        A = layer.lora_A[ADAPTER].weight.double()
        A_random = torch.randn(A.shape, generator=g, dtype=torch.float64)
        A_random *= A.norm() / A_random.norm()
        C = covs[name].double()
        # trace(M C Mᵀ) = ‖M Xᵀ‖² summed over every (normalised) calibration token
        assert torch.trace(A @ C @ A.T) < 1e-3 * torch.trace(A_random @ C @ A_random.T), name


def test_lora_null_v2_freezes_a(tiny_dirs, svd, calibration_file):
    _, model = adapt(tiny_dirs["llama"], settings("lora_null", calibration_file, null_version="v2"), svd)
    for _, layer in lora_layers(model):
        assert not layer.lora_A[ADAPTER].weight.requires_grad
        assert layer.lora_B[ADAPTER].weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_oplora_preserves_top_k_after_training(tiny_dirs, arch, svd, dtype):
    k = 8
    original, model = adapt(tiny_dirs[arch], settings("oplora", k=k), svd, dtype=dtype)
    train(model, steps=20, lr=1e-3)
    report = diagnose(original, model_deltas(model, original), [k], svd)
    for name, m in report["modules"].items():
        assert m["delta_norm"] > 0, name  # it did learn something
        assert m["rho"][str(k)] <= 1e-10, name
        assert m["preservation_error"][str(k)] <= 1e-6, name
        if dtype == torch.float32:  # a bf16 model adds bf16-rounded B'A' to W; the fp32 export is checked elsewhere
            assert m["triple_error"][str(k)] <= 1e-6, name


def test_oplora_gradients_match_per_token_formulation(tiny_dirs, svd):
    """Autograd through the factor projections = gradients of the paper's per-token sequential form."""
    _, model = adapt(tiny_dirs["qwen2"], settings("oplora", k=8), svd)
    name, layer = next(iter(lora_layers(model)))
    lora_A, lora_B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    with torch.no_grad():  # non-zero B so that both gradients are informative
        lora_B.parametrizations.weight.original.normal_(0, 0.1)
    U = lora_B.parametrizations.weight[0].basis
    V = lora_A.parametrizations.weight[0].basis
    x = torch.randn(3, 5, lora_A.in_features, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 5, lora_B.out_features, generator=torch.Generator().manual_seed(1))

    ours = ((lora_B(lora_A(x)) * layer.scaling[ADAPTER] - target) ** 2).sum()
    ours.backward()
    A_raw, B_raw = lora_A.parametrizations.weight.original, lora_B.parametrizations.weight.original
    grads = A_raw.grad.clone(), B_raw.grad.clone()

    A, B = A_raw.detach().clone().requires_grad_(), B_raw.detach().clone().requires_grad_()
    paper = ((per_token_delta(x, A, B, U, V, layer.scaling[ADAPTER]) - target) ** 2).sum()
    paper.backward()
    assert torch.allclose(ours, paper, rtol=1e-5)
    assert rel(grads[0], A.grad) <= 1e-5 and rel(grads[1], B.grad) <= 1e-5  # float32 rounding only


def test_oplora_keeps_base_weights_and_forms_no_square_matrix(tiny_dirs, svd):
    original, model = adapt(tiny_dirs["llama"], settings("oplora", k=8), svd)
    train(model, steps=3)
    for name, layer in lora_layers(model):
        assert torch.equal(layer.base_layer.weight, original[name])
        for module in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            assert parametrize.is_parametrized(module, "weight")
            basis = module.parametrizations.weight[0].basis
            assert basis.dtype == torch.float32 and basis.shape[1] == 8


def test_oplora_bases_survive_a_bf16_cast(tiny_dirs, svd):
    """model.to(bfloat16), as DeepSpeed's bf16 engine does, must not round U_k, V_k."""
    _, model = adapt(tiny_dirs["llama"], settings("oplora", k=8), svd)
    _, layer = next(iter(lora_layers(model)))
    before = layer.lora_A[ADAPTER].parametrizations.weight[0].basis.clone()
    model.to(torch.bfloat16)
    after = layer.lora_A[ADAPTER].parametrizations.weight[0].basis
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A[ADAPTER].weight.dtype == torch.bfloat16
    assert after.dtype == torch.float32 and torch.equal(after, before)


def test_oplora_projects_each_factor_once_per_forward(tiny_dirs, svd):
    """Two projections per adapted layer and forward (A and B), recomputed at every forward and step."""
    _, model = adapt(tiny_dirs["llama"], settings("oplora", k=8), svd)
    calls = []
    for _, layer in lora_layers(model):
        for module in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            module.parametrizations.weight[0].register_forward_hook(lambda *_: calls.append(1))
    n_layers = len(list(lora_layers(model)))
    train(model, steps=2)
    assert len(calls) == 2 * 2 * n_layers
    with pytest.raises(IndexError):
        model(input_ids=torch.tensor([[10**9]]))  # an out-of-range id fails inside the forward …
    calls.clear()
    logits(model)  # … and the next forward still projects afresh
    assert len(calls) == 2 * n_layers



def test_lora_null_shares_covariances_and_reuses_cached_null_spaces(tiny_dirs, calibration_file, tmp_path):
    from transformers import AutoTokenizer

    from oplora import calibration
    from oplora.methods import build
    from oplora.svd import SVDCache

    directory, svd = tiny_dirs["llama"], SVDCache(tmp_path / "cache")
    s = settings("lora_null", calibration_file,
                 target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj", "o_proj"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    forwards = []

    def adapted():
        model = load(directory)
        model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        return build(model, s, svd, tokenizer)

    first = adapted()
    assert len(forwards) == 6  # one forward per calibration window
    covs = calibration.covariances(first, {n: layer.base_layer for n, layer in lora_layers(first)},
                                   torch.randint(0, 1000, (2, 16)))
    for layer in ("model.layers.0.", "model.layers.1."):
        assert len({id(covs[layer + f"self_attn.{p}_proj"]) for p in "qkv"}) == 1
        assert covs[layer + "mlp.up_proj"] is covs[layer + "mlp.gate_proj"]
        assert covs[layer + "self_attn.o_proj"] is not covs[layer + "self_attn.q_proj"]
    assert len({id(c) for c in covs.values()}) == 2 * 3  # per layer: attention input, MLP input, o_proj input
    forwards.clear()
    second = adapted()  # same weights, corpus and settings: the null spaces are read from disk
    assert not forwards
    for (name, a), (_, b) in zip(lora_layers(first), lora_layers(second), strict=True):
        assert torch.equal(a.lora_A[ADAPTER].weight, b.lora_A[ADAPTER].weight), name
    assert len(list((tmp_path / "cache" / "calibration").glob("*.safetensors"))) == 1
