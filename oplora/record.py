"""What every result carries: the resolved config, its hash, package versions and the git commit."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Keys that decide where or how a run is reported, or what is done after training, not what it trains
# (`calibration` reaches the hash through lora_null's method.calibration).
NOT_HASHED = ("output_dir", "force", "cache_dir", "wandb", "hydra", "eval", "launcher", "pipeline",
              "calibration", "method.display", "method.color")
PACKAGES = ("torch", "transformers", "peft", "datasets", "deepspeed", "lm_eval", "evalplus", "hydra-core", "oplora")


def as_dict(cfg: DictConfig) -> dict:
    """The config as plain Python data, every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def content_hash(content) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def config_hash(cfg: DictConfig) -> str:
    """The hash of what training computes: every key but those in NOT_HASHED."""
    content = as_dict(cfg)
    for key in NOT_HASHED:
        *parents, last = key.split(".")
        node = content
        for parent in parents:
            node = node.get(parent, {})
        node.pop(last, None)
    return content_hash(content)


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
