"""The oplora cache: what is computed once and reused across runs, under one root, with one owner for its names.

    <root>/           $OPLORA_CACHE, else ~/.cache/oplora (a run's `cache_dir` moves the part the run computes)
      svd/            singular triples of base weights (oplora.svd.SVDCache)
      calibration/    LoRA-Null's null spaces and a record of their corpus (oplora.calibration.null_spaces)
      data/           tokenized training sets (oplora.data.tokenized)
      datasets/       the HF datasets cache of local json/jsonl training files, keyed by content (oplora.data)
      models/         the offline base models as safetensors directories (oplora.models)
      demo/           the demo's training data, tasks and calibration text (oplora.demo_data)
      wordnet/        WordNet 3.0 tasks and held-out text (oplora.wordnet)
      bigbench/       BIG-bench tasks converted from the release archive (oplora.bigbench)
      artifacts/      files fetched from a package registry (oplora.artifacts)

What a run computes from its config (svd, calibration, data, datasets) follows `cache_dir` (`Cache.of(cfg)`) and is
handed down explicitly. The built-in resources (`oplora:NAME`: models, demo, wordnet, bigbench, artifacts) are shared
by every run under the default root (`Cache.default()`, read by oplora.resources): their paths are part of what a
result was computed from (the evaluated base model's identity), so no per-run setting moves them.
Outside it: the Hugging Face caches (HF_HOME) and evalplus's MBPP+ release (XDG_CACHE_HOME).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV = "OPLORA_CACHE"


@dataclass(frozen=True)
class Cache:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    svd = property(lambda self: self.root / "svd")
    calibration = property(lambda self: self.root / "calibration")
    data = property(lambda self: self.root / "data")
    datasets = property(lambda self: self.root / "datasets")
    models = property(lambda self: self.root / "models")
    demo = property(lambda self: self.root / "demo")
    wordnet = property(lambda self: self.root / "wordnet")
    bigbench = property(lambda self: self.root / "bigbench")
    artifacts = property(lambda self: self.root / "artifacts")

    @classmethod
    def default(cls) -> Cache:
        """$OPLORA_CACHE, else ~/.cache/oplora."""
        return cls(os.environ.get(ENV) or Path.home() / ".cache" / "oplora")

    @classmethod
    def of(cls, cfg) -> Cache:
        """A run's cache: its `cache_dir`, else the default."""
        return cls(cfg.cache_dir) if cfg.cache_dir else cls.default()
