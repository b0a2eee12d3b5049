"""What every result carries: the resolved config, its hash, package versions and the git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from oplora.config import trains
from oplora.data import content_key
from oplora.io import content_hash
from oplora.methods.base import PRESENTATION, method_of, shared_config

# Keys that decide where or how a run is reported, or what is done after training, not what it trains; besides
# them, how a method is shown (methods.base.PRESENTATION) and the top-level blocks that method configs read
# (Method.shared_config: they reach the hash through the method config)
NOT_HASHED = ("output_dir", "force", "cache_dir", "wandb", "hydra", "eval", "launcher", "pipeline")
PACKAGES = ("torch", "transformers", "peft", "datasets", "deepspeed", "lm_eval", "evalplus", "hydra-core", "oplora")


def as_dict(cfg: DictConfig) -> dict:
    """The config as plain Python data, every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def config_hash(cfg: DictConfig) -> str:
    """The hash of what training computes: every key but those in NOT_HASHED, and the content of a local
    training data file (a file changed in place retrains)."""
    if trains(cfg.method):
        method_of(cfg.method)  # a method from outside registers itself, and what it reads (Method.shared_config)
    content = as_dict(cfg)
    content["data_content"] = content_key(cfg.data.path)
    for key in (*NOT_HASHED, *shared_config(), *(f"method.{k}" for k in PRESENTATION)):
        *parents, last = key.split(".")
        node = content
        for parent in parents:
            node = node.get(parent, {})
        node.pop(last, None)
    return content_hash(content)


def cell_hash(cfg: DictConfig) -> str:
    """What a cell's evaluation depends on besides its own settings: the training config of a trained cell,
    the model alone for the untrained base row (a training setting never re-evaluates the base model)."""
    return config_hash(cfg) if trains(cfg.method) else content_hash({"model": as_dict(cfg.model)})


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
    return {"versions": versions(), "git_commit": git_commit(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
