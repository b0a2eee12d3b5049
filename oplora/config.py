"""Where the configs and the paper's published numbers live, and composing a config from overrides.

Both ship inside the package when it is installed (`oplora/configs/`, `oplora/paper/`: package data
mapped from the source tree's `configs/` and `results/paper/`); an editable install reads the source tree.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

_PACKAGE = Path(__file__).resolve().parent


def _data(installed: str, source: str) -> Path:
    path = _PACKAGE / installed
    return path if path.is_dir() else _PACKAGE.parent / source


CONFIG_DIR = str(_data("configs", "configs"))
PAPER_DIR = _data("paper", "results/paper")


def compose(overrides: list[str]) -> DictConfig:
    """The config `python -m oplora.train OVERRIDES…` would run with (inside or outside a Hydra app)."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name="train", overrides=list(overrides))
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra.compose(config_name="train", overrides=list(overrides))


def trains(method_cfg: DictConfig) -> bool:
    """Whether a method config trains an adapter (`trained: false`: the untrained base model's reference row)."""
    return bool(method_cfg.get("trained", True))
