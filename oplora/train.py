"""Fine-tune one (model, data, method, seed) cell and export a plain PEFT adapter.

    python -m oplora.train experiment=table2 method=oplora16 seed=1 output_dir=runs/t2-op16
    deepspeed --num_gpus 8 -m oplora.train experiment=table4 method=pissa

Writes into `output_dir`: `config.json` (resolved config and its hash) at the start, checkpoints
under `checkpoints/`, and on success `adapter/` (plain PEFT LoRA on the original base),
`initial_adapter/` for base-mutating methods, and `run.json` (config, hash, package versions, git
commit, training metrics). Re-running the same command resumes from the last checkpoint, or skips a
finished run unless `force=true`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import SchedulerType

from oplora import data, tracking
from oplora.cache import Cache
from oplora.config import CONFIG_DIR, trains
from oplora.device import check_gpu, compute_dtype, gpu_present
from oplora.export import export_adapter, save_initial
from oplora.io import atomic_write_text, file_sha256, read_json
from oplora.methods import AdapterSettings, adapter_settings, build, get_method
from oplora.methods.base import check_rank, target_shapes
from oplora.models import weight_files, weights_digest
from oplora.record import as_dict, config_hash, provenance
from oplora.resources import resolve
from oplora.rundir import ADAPTER_WEIGHTS, RunDir
from oplora.svd import MODES, SVDCache

log = logging.getLogger("oplora.train")


CHOICES = {
    "svd_mode": MODES,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "train.bf16": ("auto", True, False),
    "train.scheduler": tuple(s.value for s in SchedulerType),
}
POSITIVE = ("train.lr", "train.batch_size", "train.micro_batch_size", "train.epochs", "train.lora_r",
            "train.lora_alpha", "train.save_steps", "train.logging_steps", "data.max_length")


def check_config(cfg: DictConfig) -> None:
    """Refuse values the run cannot use, naming the valid ones, before anything loads."""
    if not trains(cfg.method):
        raise ValueError(f"method={cfg.method.label} is the untrained model: there is nothing to train; "
                         f"evaluate it with python -m oplora.evaluation method={cfg.method.label}")
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{key}={value!r} must be a positive number")
    if not 0 <= cfg.train.lora_dropout < 1 or not 0 <= cfg.train.warmup_ratio < 1:
        raise ValueError("train.lora_dropout and train.warmup_ratio must lie in [0, 1)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed={cfg.seed!r} must be an integer")
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed} must lie in 0..{2**32 - 1} (the seeds numpy and torch accept)")
    steps = cfg.train.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == -1 or steps > 0):
        raise ValueError(f"train.max_steps={steps!r} must be -1 (train all epochs) or a positive integer")
    data.check_limit(cfg.data.limit)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def single_process_env() -> None:
    """DeepSpeed outside a launcher (a local or SLURM pipeline run on one device): a world of one process."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def batch_split(t: DictConfig) -> int:
    """Gradient accumulation steps: the effective batch is micro_batch_size × accumulation × world_size."""
    per_step = t.micro_batch_size * world_size()
    if t.batch_size % per_step:
        raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size × world_size = "
                         f"{t.micro_batch_size} × {world_size()}")
    return t.batch_size // per_step


def training_arguments(cfg: DictConfig, run: RunDir, report_to: list[str]) -> TrainingArguments:
    t = cfg.train
    if cfg.deepspeed.config:
        single_process_env()
    gpu = gpu_present()
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=batch_split(t),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        bf16=gpu if t.bf16 == "auto" else bool(t.bf16),
        use_cpu=not gpu,
        deepspeed=as_dict(cfg.deepspeed.config) if cfg.deepspeed.config else None,
        gradient_checkpointing=t.gradient_checkpointing,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must surface, not be averaged away
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=report_to,
        run_name=tracking.run_name(cfg, "train"),
        remove_unused_columns=False,
    )


def last_checkpoint(directory: str | Path) -> str | None:
    """The newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete and whose
    weights are all finite."""
    steps = sorted(Path(directory).glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)
    for path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text())
            if finite(load_file(path / ADAPTER_WEIGHTS).values()):
                return str(path)
            log.warning("skipping checkpoint %s: its weights are not finite", path)
        except (OSError, ValueError, SafetensorError):
            log.warning("skipping incomplete checkpoint %s", path)
    return None


def final_state(checkpoint: str | Path) -> dict | None:
    """The trainer state of a checkpoint saved at the run's last step, else None."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state if 0 < state["max_steps"] <= state["global_step"] else None


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class StopOnNonFinite(TrainerCallback):
    """Stop at the first NaN/inf loss or trainable weight, before the Trainer saves a checkpoint of that step.

    The weights are checked after every optimizer step (the logged loss was computed before it), so no
    checkpoint, and no exported adapter, ever holds non-finite weights.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.stop(args, f"training loss became {loss} at step {state.global_step}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and not finite(p.detach() for p in model.parameters() if p.requires_grad):
            self.stop(args, f"the adapter's weights became non-finite at step {state.global_step}")

    @staticmethod
    def stop(args, what: str):
        last = last_checkpoint(args.output_dir)
        raise FloatingPointError(f"{what}; stopped. Last good checkpoint: {last or 'none'} "
                                 "(lower train.lr, or check the data)")


class Preempted(RuntimeError):
    """Training stopped on SIGUSR1 (SLURM's warning before the time limit) after saving a checkpoint."""


class CheckpointOnSignal(TrainerCallback):
    """On SIGUSR1 (`launcher.signal_seconds` before a SLURM job's time limit), save a checkpoint at the end of the
    current step and stop: the requeued job resumes from it instead of losing up to `save_steps` of work."""

    def __init__(self):
        self.received = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self.handle)

    def handle(self, signum, frame):
        log.warning("SIGUSR1: saving a checkpoint at the end of this step, then stopping (the job requeues)")
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = control.should_training_stop = True


def point_steps(fractions, max_steps: int) -> list[int]:
    """The optimizer steps at which a sweep's run is also evaluated (`train.points`: fractions of its steps): each
    fraction of `max_steps` rounded up, before the last step (the final adapter is the cell's own)."""
    return sorted({min(max(1, math.ceil(float(f) * max_steps)), max_steps) for f in fractions or ()} - {max_steps})


class ExportPoints(TrainerCallback):
    """A sweep's evaluation points: after each of `point_steps` the adapter is exported as at the end, into the
    point's own run directory (RunDir.point) with its record, so that it is evaluated from there without retraining."""

    def __init__(self, fractions, run: RunDir, method: str, initial: Path | None, record: dict):
        self.fractions, self.run, self.method, self.initial, self.record = fractions, run, method, initial, record
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = point_steps(self.fractions, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and state.is_world_process_zero:
            point = self.run.point(state.global_step)
            export_adapter(model, self.method, point.adapter, self.initial)
            atomic_write_text(point.record, json.dumps({**self.record, "step": state.global_step,
                                                        "adapter": str(point.adapter),
                                                        "adapter_sha256": file_sha256(point.adapter_weights)},
                                                       indent=2))


def check_final_weights(trainer: Trainer, step: int) -> None:
    """The logged losses were computed before each step's update: check the weights after the last one (finite,
    and a finite loss on one training batch) before anything is exported."""
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = model(**batch).loss if finite(p for p in model.parameters() if p.requires_grad) else None
    if loss is None or not torch.isfinite(loss):
        for broken in Path(trainer.args.output_dir).glob(f"checkpoint-{step}"):  # never resumed from, never exported
            aside = broken.with_name(f"broken-{broken.name}")
            shutil.rmtree(aside, ignore_errors=True)
            broken.rename(aside)
        last = last_checkpoint(trainer.args.output_dir)
        raise FloatingPointError(f"after the last step ({step}) the model is broken (loss "
                                 f"{loss if loss is None else float(loss)}): not exported. Last good checkpoint: "
                                 f"{last or 'none'} (lower train.lr, or check the data)")


def start_wandb(cfg: DictConfig) -> list[str]:
    """Open the rank-0 W&B train run (oplora.tracking); the Trainer's callback logs into it."""
    if tracking.effective_mode(cfg.wandb.mode) == "disabled":
        return []
    if is_main_process() and tracking.start(cfg, "train", cfg.output_dir) is None:
        return []  # W&B could not start (tracking warned); the Trainer's own callback would retry online
    return ["wandb"]


def finished(cfg: DictConfig) -> bool:
    """Whether this exact training config already finished in its output_dir (and force is off)."""
    return RunDir(cfg.output_dir).trained_record(config_hash(cfg)) is not None and not cfg.force


def prepare_output(run: RunDir, cfg: DictConfig, chash: str) -> None:
    """Make the run directory this config's: checkpoints of another config (or all, with force) and the previous
    run.json are removed. Called only once every check has passed and the model is built."""
    if is_main_process():
        previous = read_json(run.config)
        stale = previous is not None and previous["config_hash"] != chash
        if (stale or cfg.force) and run.checkpoints.exists():
            log.warning("removing checkpoints of %s (config changed or force=true)", run.root)
            shutil.rmtree(run.checkpoints)
        run.record.unlink(missing_ok=True)
        atomic_write_text(run.config, json.dumps({"config": as_dict(cfg), "config_hash": chash}, indent=2))


def validate(cfg: DictConfig) -> AdapterSettings:
    """Everything checkable before the run directory is touched (a bad override never costs a finished run):
    the values, the method and its settings, the batch split, the data file and its fields, and the ranks
    against the model's shapes (built on the meta device from its config: no weights are loaded)."""
    check_config(cfg)
    check_gpu(cfg.model)
    settings = adapter_settings(cfg)
    batch_split(cfg.train)
    if data.local_file(cfg.data.path):
        records = data.load_records(cfg.data.path, Cache.of(cfg), cfg.data.split, cfg.data.limit)
        data.check_fields(records, cfg.data.path, cfg.data.query, cfg.data.response)
    model_dir = resolve(cfg.model.path)
    if Path(model_dir).is_dir():
        weight_files(model_dir)  # a local directory without (readable) weights is named here
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        shapes = target_shapes(AutoModelForCausalLM.from_config(config), settings.target_modules)
    check_rank(settings, shapes)
    get_method(settings.method).check(settings, shapes)
    return settings


def train(cfg: DictConfig) -> Path:
    """Train one cell. Nothing in its run directory changes until every check has passed: the settings
    (`validate`), the tokenized data and the adapter's initialisation (SVD, calibration)."""
    run = RunDir(cfg.output_dir)
    settings = validate(cfg)
    chash = config_hash(cfg)
    if finished(cfg):
        log.info("%s already finished with this config (hash %s); force=true reruns it", run.root, chash[:12])
        return run.root
    if is_main_process():
        run.remove_stale_temporaries()
    args = training_arguments(cfg, run, ["wandb"] if tracking.effective_mode(cfg.wandb.mode) != "disabled" else [])
    cache = Cache.of(cfg)
    set_seed(cfg.seed)

    model_dir = resolve(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    train_set = data.tokenized(cfg.data, tokenizer, cache)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, compute_dtype(cfg.model)),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    with args.main_process_first(desc="the adapter's SVD and calibration caches and the run directory"):
        model = build(model, settings, SVDCache(cache.root, mode=cfg.svd_mode), tokenizer)  # the other ranks read them
        prepare_output(run, cfg, chash)
    args.report_to = start_wandb(cfg)  # [] when W&B could not start: the Trainer's callback would retry online
    initial = None
    if get_method(settings.method).mutates_base:
        initial = run.initial_adapter
        if is_main_process():
            save_initial(model, initial)
    model.print_trainable_parameters()

    on_signal = CheckpointOnSignal()
    identity = {"config_hash": chash, "base_model": model_dir, "base_digest": weights_digest(model_dir),
                "initial_adapter": str(initial) if initial else None}
    points = ExportPoints(cfg.train.get("points"), run, settings.method, initial, identity)
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      callbacks=[StopOnNonFinite(), points, on_signal],  # a broken step stops before its export
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE))
    checkpoint = last_checkpoint(args.output_dir)
    final = checkpoint and final_state(checkpoint)
    if final:  # killed after the last step, before the export: resuming would run one step more
        log.info("%s holds the last step: exporting it without training further", checkpoint)
        set_peft_model_state_dict(model, load_file(Path(checkpoint) / ADAPTER_WEIGHTS))
        metrics, history = final["log_history"][-1], final["log_history"]
        points.steps = point_steps(cfg.train.get("points"), final["max_steps"])  # exported before the kill
    else:
        log.info("resuming from %s", checkpoint) if checkpoint else None
        result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics, history = result.metrics, trainer.state.log_history
        if on_signal.received:
            raise Preempted(f"stopped on SIGUSR1 at step {trainer.state.global_step}: checkpoint saved in "
                            f"{run.checkpoints}; rerun (or the requeued job) resumes from it")
    check_final_weights(trainer, history[-1]["step"] if history else 0)

    if trainer.is_world_process_zero():
        export_adapter(model, settings.method, run.adapter, initial)
        record = {"config": as_dict(cfg), **identity, "adapter": str(run.adapter),
                  "adapter_sha256": file_sha256(run.adapter_weights), "train_examples": len(train_set),
                  "world_size": world_size(), "steps": history[-1]["step"] if history else 0,
                  "points": points.steps, "metrics": metrics, "log_history": history, **provenance()}
        atomic_write_text(run.record, json.dumps(record, indent=2))
        log.info("adapter written to %s", run.adapter)
    if "wandb" in args.report_to and trainer.is_world_process_zero():
        tracking.finish_train(cfg, run.adapter)
    return run.root


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    # launchers (deepspeed, torch.distributed) pass --local_rank; LOCAL_RANK in the environment carries it
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main()
