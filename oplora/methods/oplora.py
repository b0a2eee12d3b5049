"""OPLoRA-k: ΔW = s·P_L B A P_R with P_L = I − U_k U_kᵀ, P_R = I − V_k V_kᵀ from the frozen W.

k is absolute (`k`, the paper's 16 or 128) or width-matched (`k_fraction` of each matrix's min(m, n): the paper's
k = 16 and 128 of 4096 are 0.39 % and 3.1 %, which on SmolLM2's 576 are k = 2 and 18). `subspace` chooses what is
protected, everything else equal: `top`, the k largest singular directions (the paper's); `bottom`, the k smallest;
`random`, a seeded random orthonormal basis of the same size. The last two are controls: they separate "protecting
the dominant directions helps" from "any k-dimensional constraint does the same".

The projections act on the two small factors (B' = B − U_k(U_kᵀB), A' = A − (A V_k)V_kᵀ) through
`torch.nn.utils.parametrize`, so PEFT's forward, dropout, scaling, merge and unmerge see B', A'
and work unchanged, autograd gives the gradients of the paper's formulation, and no d×d matrix is
formed. U_k, V_k stay float32 and the projection runs in float32 whatever the model dtype.
"""

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from oplora.methods.base import ADAPTER, PEFT_PREFIX, Method, lora_layers, register


class Orthogonalize(nn.Module):
    """Remove from a LoRA factor its component in the span of a frozen orthonormal basis Q."""

    def __init__(self, basis: torch.Tensor, side: str):
        super().__init__()
        self.side = side  # "left": B (m×r) → B − Q(QᵀB);  "right": A (r×n) → A − (A Q)Qᵀ
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` and DeepSpeed's bf16 cast must
        # not round it, and it stays out of checkpoints. It follows the factor's device lazily.
        self.basis = basis.float().contiguous()

    def project(self, X: torch.Tensor) -> torch.Tensor:
        if self.basis.device != X.device:
            self.basis = self.basis.to(X.device)
        X, Q = X.float(), self.basis
        with torch.autocast(X.device.type, enabled=False):  # bf16 mixed precision would run these products in bf16
            return X - Q @ (Q.T @ X) if self.side == "left" else X - (X @ Q) @ Q.T

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.project(X).to(X.dtype)


def is_projected(layer) -> bool:
    return parametrize.is_parametrized(layer.lora_A[ADAPTER], "weight")


def projected_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') in float32, computed from the trained raw factors."""
    factors = []
    for module in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
        raw = module.parametrizations.weight.original
        factors.append(module.parametrizations.weight[0].project(raw.detach()))
    return factors[0], factors[1]


def per_token_delta(x: torch.Tensor, A, B, U, V, scaling: float) -> torch.Tensor:
    """The paper's sequential form, x ← x − V(Vᵀx); x ← BAx; x ← x − U(Uᵀx), applied to every token.

    The reference that tests and benchmarks compare the factor form against.
    """
    x = x - (x @ V) @ V.T
    y = (x @ A.T) @ B.T
    return scaling * (y - (y @ U) @ U.T)


def project_once_per_call(layer: nn.Module) -> None:
    """Reuse each projected factor within one call of a LoRA layer (PEFT reads lora_A.weight twice: its dtype to cast
    the input, then the weight itself).

    `parametrize.cached()` is entered by a forward pre-hook of the layer and left by a forward hook that also runs when
    the forward raises, so a factor is never reused across calls (or optimizer steps). The cache lives exactly as
    long as one call of the layer: gradient checkpointing, which calls a decoder layer again during backward,
    recomputes every factor as the first forward computed it (a cache over the whole model's forward would be
    closed by then, and the recomputation would save other tensors than the forward did).
    """
    open_cache = []

    def enter(module, args):
        open_cache.append(parametrize.cached())
        open_cache[-1].__enter__()

    def leave(module, args, output):
        if open_cache:
            open_cache.pop().__exit__(None, None, None)

    layer.register_forward_pre_hook(enter)
    layer.register_forward_hook(leave, always_call=True)


SUBSPACES = ("top", "bottom", "random")


@dataclass(frozen=True)
class Options:
    k: int | None = None  # number of preserved singular triples (the paper: 16 or 128)
    k_fraction: float | None = None  # or k as this fraction of each matrix's min(m, n), rounded, at least 1
    subspace: str = "top"  # top (the paper's) | bottom | random: which k-dimensional subspace is protected
    seed: int = 0  # the random subspace's seed (each matrix draws its own basis from it and its name)

    def rank(self, shape: tuple[int, int]) -> int:
        """k for an m×n matrix."""
        return self.k if self.k is not None else max(1, round(self.k_fraction * min(shape)))


def random_basis(size: int, k: int, seed: int, name: str, side: str) -> torch.Tensor:
    """A size×k orthonormal basis, uniformly random (QR of a Gaussian), reproducible from (seed, name, side)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}:{side}".encode()))
    Q, R = torch.linalg.qr(torch.randn(size, k, generator=generator, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).float()  # signs fixed: the Haar distribution


@register
class OPLoRA(Method):
    name = "oplora"
    Options = Options

    def check(self, settings, shapes):
        options = self.options(settings)
        if (options.k is None) == (options.k_fraction is None):
            raise ValueError("oplora needs exactly one of k (the projection rank, the paper uses 16 or 128) and "
                             f"k_fraction (k as a fraction of min(m, n)); got k={options.k}, "
                             f"k_fraction={options.k_fraction}")
        if options.k is not None and options.k < 1 or options.k_fraction is not None and not 0 < options.k_fraction < 1:
            raise ValueError(f"oplora needs k >= 1 or 0 < k_fraction < 1, got k={options.k}, "
                             f"k_fraction={options.k_fraction}")
        if options.subspace not in SUBSPACES:
            raise ValueError(f"oplora subspace={options.subspace!r}; valid: {', '.join(SUBSPACES)}")
        for name, (m, n) in shapes.items():
            if options.rank((m, n)) >= min(m, n):
                raise ValueError(f"projection rank k={options.rank((m, n))} must be below min(m, n)={min(m, n)} "
                                 f"of {name} ({m}×{n})")

    def svd_needs(self, settings, shape):
        options = self.options(settings)
        k = options.rank(shape)
        return {"top": (k, 0), "bottom": (0, k), "random": (0, 0)}[options.subspace]

    def basis(self, options: Options, W: torch.Tensor, name: str, svd) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k, V_k): the protected left and right bases of W."""
        k = options.rank(tuple(W.shape))
        if options.subspace == "random":
            return (random_basis(W.shape[0], k, options.seed, name, "left"),
                    random_basis(W.shape[1], k, options.seed, name, "right"))
        part = svd.top(W, k, name) if options.subspace == "top" else svd.bottom(W, k, name)
        return part.U, part.V

    def initialize(self, model, settings, svd, tokenizer=None):
        options = self.options(settings)
        k = options.k if options.k is not None else f"{options.k_fraction:g}·min(m,n)"
        for name, layer in tqdm(list(lora_layers(model)), desc=f"oplora-{k} {options.subspace} init", unit="matrix"):
            U, V = self.basis(options, layer.base_layer.weight, name, svd)
            for module, basis, side in ((layer.lora_A[ADAPTER], V, "right"), (layer.lora_B[ADAPTER], U, "left")):
                projection = Orthogonalize(basis.to(module.weight.device), side)
                parametrize.register_parametrization(module, "weight", projection)
            project_once_per_call(layer)

    def export(self, model, directory, initial):
        """Rank r with the projected factors B' = P_L B, A' = A P_R in float32: plain LoRA, no project code."""
        state = {}
        for name, layer in lora_layers(model):
            A, B = projected_factors(layer)
            state[f"{PEFT_PREFIX}{name}.lora_A.{ADAPTER}.weight"] = A.cpu()
            state[f"{PEFT_PREFIX}{name}.lora_B.{ADAPTER}.weight"] = B.cpu()
        model.save_pretrained(directory, state_dict=state)
