"""The run directory of one cell: the files through which the stages hand work to each other.

    <output_dir>/
      config.json           the resolved training config and its hash (written when training starts)
      checkpoints/          HF Trainer checkpoints (checkpoint-N/, the Trainer's layout): the resume points; a
                            last one whose weights broke is set aside as broken-checkpoint-N/ (oplora.train)
      initial_adapter/      the adapter at init (methods that change the base weight need it to export)
      adapter/              the exported plain PEFT LoRA adapter (PEFT's ADAPTER_WEIGHTS, ADAPTER_CONFIG): what
                            training produces
      run.json              the training record (config, hash, metrics, versions): written last
      diagnose.json         ρ_k and the other diagnostics of adapter/ against the original weights
      eval/<stage>.json     one evaluation stage's result (eval/<stage>.partial.json while it runs)
      eval/<stage>/         that stage's per-sample records and work files
      merged/               base + adapter merged for generation (removed after evaluation by default)
      failed/<step>.json    why a pipeline step failed for this cell (removed when the step succeeds)
      points/step<N>/       a sweep's checkpoint after N steps (train.points): a run directory of its own, with
                            adapter/, run.json (the cell's config hash, the step) and eval/ (oplora.train, oplora.sweep)
      .<step>.lock          held while a pipeline step works on the cell
      wandb/                the cell's offline W&B train and eval runs (W&B's own directory, oplora.tracking)
      hydra/                Hydra's record of a command run on this cell (configs/train.yaml: hydra.run.dir)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from oplora.io import CorruptFile, atomic_write_text, file_sha256, read_json, remove_stale_temporaries

# PEFT's file names in an adapter directory (adapter/, initial_adapter/, and each training checkpoint):
# peft.utils.SAFETENSORS_WEIGHTS_NAME and CONFIG_NAME (tests/test_export.py checks they still are)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    initial_adapter = property(lambda self: self.root / "initial_adapter")
    adapter = property(lambda self: self.root / "adapter")
    adapter_weights = property(lambda self: self.adapter / ADAPTER_WEIGHTS)
    record = property(lambda self: self.root / "run.json")
    diagnose = property(lambda self: self.root / "diagnose.json")
    merged = property(lambda self: self.root / "merged")
    eval_dir = property(lambda self: self.root / "eval")

    def point(self, step: int) -> RunDir:
        """The run directory of the cell's checkpoint after `step` optimizer steps (a sweep's evaluation point)."""
        return RunDir(self.root / "points" / f"step{step}")

    def eval_result(self, stage: str) -> Path:
        return self.eval_dir / f"{stage}.json"

    def eval_partial(self, stage: str) -> Path:
        return self.eval_dir / f"{stage}.partial.json"

    def eval_work(self, stage: str) -> Path:
        return self.eval_dir / stage

    def eval_results(self) -> list[Path]:
        return sorted(p for p in self.eval_dir.glob("*.json") if not p.name.endswith(".partial.json"))

    def failure(self, step: str) -> Path:
        return self.root / "failed" / f"{step}.json"

    def failures(self) -> dict[str, str]:
        """{step: error} of every step that failed for this cell and has not succeeded since. An unreadable record
        still counts as a failure of its step, named."""
        found = {}
        for path in sorted((self.root / "failed").glob("*.json")):
            try:
                found[path.stem] = str((read_json(path) or {})["error"])
            except (CorruptFile, KeyError, TypeError) as err:
                found[path.stem] = (f"its failure record {path} is unreadable ({type(err).__name__}: {err}); rerun the "
                                    "pipeline to retry the step (success removes the record)")
        return found

    def record_failure(self, step: str, error: str, trace: str, scope: dict[str, list[str]] | None = None) -> None:
        """Why `step` failed; `scope` ({stage: [task]}) when only those tasks failed (their columns show —)."""
        atomic_write_text(self.failure(step), json.dumps({"step": step, "error": error, "traceback": trace,
                                                          "scope": scope}, indent=2))

    def failure_scope(self, step: str) -> dict[str, list[str]] | None:
        """{stage: [task]} when only those tasks of a failed step failed; None when the whole step failed (or its
        record is unreadable)."""
        try:
            return (read_json(self.failure(step)) or {}).get("scope")
        except CorruptFile:
            return None

    def clear_failure(self, step: str) -> None:
        self.failure(step).unlink(missing_ok=True)

    def lock(self, step: str) -> FileLock:
        """Held while a pipeline step works on this cell: a second pipeline on the same directory waits."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f".{step}.lock"))

    def remove_stale_temporaries(self) -> list[Path]:
        """What killed writers left behind here (`.adapter.tmpPID`, `.merged.tmpPID`, `.run.json.tmpPID`, …)."""
        return [p for d in (self.root, self.eval_dir) if d.is_dir() for p in remove_stale_temporaries(d)]

    def check_adapter(self, record: dict) -> None:
        """adapter/ is the adapter training exported (its sha256 recorded in run.json): one copied or edited after
        training is refused."""
        found = file_sha256(self.adapter_weights) if self.adapter_weights.exists() else "missing"
        if found != record.get("adapter_sha256"):
            raise ValueError(f"{self.adapter_weights} is not the adapter {self.record} recorded at training (sha256 "
                             f"{found[:12]} != {str(record.get('adapter_sha256'))[:12]}): retrain the cell "
                             "(force=true)")

    def trained_record(self, expected: str | None = None) -> dict | None:
        """run.json when training finished here, else None. With `expected` (the reader's `oplora.record.cell_hash`),
        only a record of that config: the run of another cell or config is never read as the reader's."""
        record = read_json(self.record)
        if record is not None and expected is not None and record.get("config_hash") != expected:
            return None
        return record
