"""The LoRA-Null calibration cache: a damaged file is named, never used, and recomputed."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from helpers import load, settings
from oplora.io import tensor_checksums
from oplora.methods import build
from oplora.methods.base import ADAPTER, lora_layers
from oplora.svd import SVDCache


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flipped(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors with the signs of a quarter of one tensor's values flipped, and the file's metadata."""
    tensors = load_file(path)
    flat = tensors[sorted(tensors)[0]].view(-1)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: flat.numel() // 4]] *= -1
    with safe_open(path, "pt") as f:
        return tensors, f.metadata()


def sign_flips(path):
    """Bit rot: the values change, the metadata stays."""
    tensors, metadata = flipped(path)
    save_file(tensors, path, metadata)


def forged(path):
    """The same flips in a file whose checksums match them."""
    tensors, metadata = flipped(path)
    save_file(tensors, path, metadata={**metadata, "checksums": json.dumps(tensor_checksums(tensors))})


@pytest.mark.parametrize("damage, problem", [(truncated, "cannot be read: SafetensorError"),
                                             (sign_flips, "checksum mismatch in model.layers.0.mlp.down_proj"),
                                             (forged, "U_null of model.layers.0.mlp.down_proj is not orthonormal")])
def test_a_damaged_calibration_cache_is_named_and_recomputed(damage, problem, tiny_dirs, calibration_file, tmp_path,
                                                             caplog):
    directory, svd = tiny_dirs["llama"], SVDCache(tmp_path)
    s = settings("lora_null", calibration_file)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    def initial_adapter() -> dict[str, torch.Tensor]:
        model = build(load(directory), s, svd, tokenizer)
        return {name: layer.lora_A[ADAPTER].weight.detach().clone() for name, layer in lora_layers(model)}

    first = initial_adapter()
    (path,) = (tmp_path / "calibration").glob("*.safetensors")
    damage(path)
    again = initial_adapter()
    assert f"LoRA-Null calibration cache {path} fails verification ({problem}" in caplog.text
    assert all(torch.equal(again[name], first[name]) for name in first)
    caplog.clear()
    assert all(torch.equal(a, first[name]) for name, a in initial_adapter().items()) and caplog.text == ""
