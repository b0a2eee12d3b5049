"""LoRA-Null: A, B from W projected onto the null space of calibration activations.

U_null holds the eigenvectors of the r smallest eigenvalues of C = Σ XᵀX (n×r; `calibration.null_spaces`,
run on the GPU when there is one and cached in the cache's calibration/, oplora.cache). The top-r SVD of
W_null = W U_null U_nullᵀ comes from the small m×r matrix W U_null = P Σ Qᵀ: W_null = P Σ (U_null Q)ᵀ.
A, B are set from it as PiSSA does from W and the base becomes W − s·B A. v1 trains A and B,
v2 freezes A.
"""

from dataclasses import dataclass, field

import torch

from oplora import calibration
from oplora.calibration import CalibrationSettings
from oplora.device import resolve_device
from oplora.methods.base import ADAPTER, Download, Method, absorb_svd_part, lora_layers, register
from oplora.resources import is_hub_id

VERSIONS = ("v1", "v2")


def null_space_part(W: torch.Tensor, null: torch.Tensor):
    """(U, S, V) of the top-r SVD of W U_null U_nullᵀ, in float64 (U_null: n×r, orthonormal)."""
    null = null.double().to(W.device)
    P, S, Qh = torch.linalg.svd(W.double() @ null, full_matrices=False)
    return P, S, null @ Qh.T


@dataclass(frozen=True)
class Options:
    null_version: str = "v1"  # v1 trains A and B, v2 freezes A
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self):
        if isinstance(self.calibration, dict):  # as the method config gives it
            object.__setattr__(self, "calibration", CalibrationSettings(**self.calibration))


@register
class LoRANull(Method):
    name = "lora_null"
    mutates_base = True
    Options = Options
    shared_config = ("calibration",)  # its config reads the top-level calibration block

    def downloads(self, settings):
        corpus = self.options(settings).calibration
        if not (corpus.source and is_hub_id(corpus.source)):
            return []
        return [Download("LoRA-Null calibration corpus", corpus.source, lambda: calibration.read_documents(corpus))]

    def check(self, settings, shapes):
        options = self.options(settings)
        if options.null_version not in VERSIONS:
            raise ValueError(f"unknown LoRA-Null version {options.null_version!r}; "
                             f"valid versions: {', '.join(VERSIONS)}")
        source = options.calibration.source
        if not source:
            raise ValueError("lora_null needs calibration data: set calibration.source to a hub dataset id "
                             "(default google-research-datasets/nq_open) or a local .txt/.json/.jsonl file")
        calibration.read_documents(options.calibration)  # before the model loads: names a missing file or hub id

    def initialize(self, model, settings, svd, tokenizer=None):
        if tokenizer is None:
            raise ValueError("lora_null needs the model's tokenizer to tokenize its calibration data")
        options = self.options(settings)
        layers = dict(lora_layers(model))
        home = next(model.parameters()).device
        model.to(resolve_device())  # the GPU when there is one: the training device
        try:
            nulls = calibration.null_spaces(model, {n: layer.base_layer for n, layer in layers.items()}, tokenizer,
                                            options.calibration, settings.r, svd.cache.calibration)
        finally:
            model.to(home)
        for name, layer in layers.items():
            U, S, V = null_space_part(layer.base_layer.weight, nulls[name])
            absorb_svd_part(layer, U, S, V)
            if options.null_version == "v2":
                layer.lora_A[ADAPTER].weight.requires_grad_(False)
