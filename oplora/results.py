"""The results directory of one experiment (`pipeline.results_dir`): what collect writes, and one owner for its names.

    <results_dir>/
      table.md, table.tex, table.csv    the paper's layout: fine-tuning, forgetting, drift columns and Avg
      paper.md                          the paper's table and ours − paper, when one of tables 2–7 matches
      figure2.png, figure2.pdf          (a) ρ_k against k, (b) forgetting against ρ_16
      long.csv                          one row per cell × column
      collect.json                      rows, stats over seeds, ρ_k, failures, the inputs' hash, provenance
      paired.md, paired.json            paired differences to pipeline.compare_to
      dashboard.png, dashboard.json     the W&B dashboard's panels drawn locally, and its definition
      frontier.png, frontier.pdf        a sweep's learning–forgetting frontier (oplora.sweep, oplora.frontier)
      frontier.md, frontier.json        its forgetting at matched learning, paired per seed; the points
      points.csv                        one row per run × checkpoint: learning and the forgetting measures
      failed.json                       what failed in the last run (once-steps and cells); absent when nothing did
      partial/                          an incomplete table (same files), when a complete one is here already
      wandb/                            the collect step's offline W&B run (W&B's own directory)
    <results_dir>/../slurm/             launcher=slurm: the job script and logs of each step (oplora.launch)

A complete table is never replaced by an incomplete one: a run with a failure or a missing value writes into
`partial/` when the directory holds a complete table, and a failed once-step (fetch, svd) or a run without a single
result writes no table at all, only `failed.json`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from oplora.io import CorruptFile, atomic_write_text, read_json

ARTIFACTS = ("table.md", "table.tex", "table.csv", "paper.md", "figure2.png", "figure2.pdf", "long.csv",
             "collect.json", "paired.md", "paired.json", "dashboard.png", "dashboard.json", "frontier.png",
             "frontier.pdf", "frontier.md", "frontier.json", "points.csv")


@dataclass(frozen=True)
class ResultsDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    table = property(lambda self: self.root / "table")  # .md, .tex, .csv
    paper = property(lambda self: self.root / "paper.md")
    figure2 = property(lambda self: self.root / "figure2")  # .png, .pdf
    long = property(lambda self: self.root / "long.csv")
    collected = property(lambda self: self.root / "collect.json")
    paired = property(lambda self: self.root / "paired")  # .md, .json
    dashboard = property(lambda self: self.root / "dashboard")  # .png (drawn), .json (the W&B definition)
    frontier = property(lambda self: self.root / "frontier")  # .png, .pdf, .md, .json
    points = property(lambda self: self.root / "points.csv")
    failed = property(lambda self: self.root / "failed.json")
    wandb = property(lambda self: self.root / "wandb")
    slurm = property(lambda self: self.root.parent / "slurm")  # beside it: the SLURM job scripts and logs (launch.py)

    @property
    def partial(self) -> ResultsDir:
        return ResultsDir(self.root / "partial")

    def artifacts(self) -> list[Path]:
        """The files collect wrote here (what the W&B collect run uploads)."""
        return [self.root / name for name in ARTIFACTS if (self.root / name).exists()]

    def collect_record(self) -> dict | None:
        """collect.json, or None when missing or unreadable (then it is rewritten)."""
        try:
            return read_json(self.collected)
        except CorruptFile:
            return None

    def holds_complete_table(self) -> bool:
        found = self.collect_record()
        return bool(found) and found.get("complete", False) and self.table.with_suffix(".md").exists()

    def failures(self) -> dict:
        """{"steps": {step: error}, "cells": {cell: error}} of the last run (empty when nothing failed)."""
        try:
            return read_json(self.failed) or {"steps": {}, "cells": {}}
        except CorruptFile:
            return {"steps": {}, "cells": {}}

    def step_failures(self) -> dict[str, str]:
        return self.failures().get("steps", {})

    def write_failures(self, steps: dict[str, str], cells: dict[str, str]) -> None:
        """failed.json, or none when nothing failed."""
        if steps or cells:
            atomic_write_text(self.failed, json.dumps({"steps": steps, "cells": cells}, indent=2))
        else:
            self.failed.unlink(missing_ok=True)

    def record_step_failure(self, step: str, error: str) -> None:
        """A once-step (fetch, svd) failed: collect then writes no table (read by a separate collect job too)."""
        found = self.failures()
        self.write_failures({**found.get("steps", {}), step: error}, found.get("cells", {}))

    def clear_step_failure(self, step: str) -> None:
        found = self.failures()
        if step in found.get("steps", {}):
            self.write_failures({k: v for k, v in found["steps"].items() if k != step}, found.get("cells", {}))

    def remove_partial(self) -> None:
        shutil.rmtree(self.partial.root, ignore_errors=True)
