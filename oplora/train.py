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
import socket
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import SchedulerType

from oplora import data, models, tracking
from oplora.export import export_adapter, save_initial
from oplora.io import atomic_write_text
from oplora.methods import AdapterSettings, CalibrationSettings, build, get_method
from oplora.record import config_hash, provenance, resolved
from oplora.svd import MODES, SVDCache, cache_root

log = logging.getLogger("oplora.train")


def adapter_settings(cfg: DictConfig) -> AdapterSettings:
    method = resolved(cfg.method)
    get_method(method["name"])  # unknown names fail here, before anything loads
    return AdapterSettings(
        method=method["name"], r=cfg.train.lora_r, alpha=cfg.train.lora_alpha, dropout=cfg.train.lora_dropout,
        target_modules=tuple(cfg.model.target_modules), k=method.get("k"),
        null_version=method.get("null_version", "v1"),
        calibration=CalibrationSettings(**method.get("calibration", {})),
    )


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
    if cfg.method.name == "base":
        raise ValueError("method=base is the untrained model: there is nothing to train; "
                         "evaluate it with python -m oplora.evaluate method=base")
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


def training_arguments(cfg: DictConfig, out: Path, report_to: list[str]) -> TrainingArguments:
    t = cfg.train
    if cfg.deepspeed.config:
        single_process_env()
    per_step = t.micro_batch_size * world_size()
    if t.batch_size % per_step:
        raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size × world_size = "
                         f"{t.micro_batch_size} × {world_size()}")
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // per_step,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        bf16=gpu if t.bf16 == "auto" else bool(t.bf16),
        use_cpu=not gpu,
        deepspeed=resolved(cfg.deepspeed.config) if cfg.deepspeed.config else None,
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
    """The newest checkpoint whose trainer_state.json (the Trainer writes it last) is complete."""
    steps = sorted(Path(directory).glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)
    for path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", path)
    return None


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop at the first NaN/inf loss, before the Trainer saves a checkpoint of that step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            last = last_checkpoint(args.output_dir)
            raise FloatingPointError(f"training loss became {loss} at step {state.global_step}; stopped. "
                                     f"Last good checkpoint: {last or 'none'}")


def start_wandb(cfg: DictConfig) -> list[str]:
    """Open the rank-0 W&B train run (oplora.tracking); the Trainer's callback logs into it."""
    if tracking.resolve_mode(cfg.wandb.mode) == "disabled":
        return []
    if is_main_process():
        tracking.start(cfg, "train", cfg.output_dir)
    return ["wandb"]


def finished(cfg: DictConfig) -> bool:
    """Whether this exact training config already finished in its output_dir (and force is off)."""
    record = Path(cfg.output_dir) / "run.json"
    return record.exists() and json.loads(record.read_text())["config_hash"] == config_hash(cfg) and not cfg.force


def prepare_output(out: Path, cfg: DictConfig, chash: str) -> bool:
    """True when this exact config already finished here. Checkpoints of another config are removed."""
    record = out / "run.json"
    if finished(cfg):
        return True
    if is_main_process():
        previous = out / "config.json"
        stale = previous.exists() and json.loads(previous.read_text())["config_hash"] != chash
        if (stale or cfg.force) and (out / "checkpoints").exists():
            log.warning("removing checkpoints of %s (config changed or force=true)", out)
            shutil.rmtree(out / "checkpoints")
        record.unlink(missing_ok=True)
        atomic_write_text(previous, json.dumps({"config": resolved(cfg), "config_hash": chash}, indent=2))
    return False


def train(cfg: DictConfig) -> Path:
    out = Path(cfg.output_dir)
    check_config(cfg)
    chash = config_hash(cfg)
    settings = adapter_settings(cfg)
    if prepare_output(out, cfg, chash):
        log.info("%s already finished with this config (hash %s); force=true reruns it", out, chash[:12])
        return out
    args = training_arguments(cfg, out, start_wandb(cfg))
    cache = Path(cfg.cache_dir or cache_root())
    set_seed(cfg.seed)

    model_dir = models.resolve(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    train_set = data.tokenized(cfg.data, tokenizer, cache)
    dtype = getattr(torch, cfg.model.dtype) if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    model = build(model, settings, SVDCache(cache, mode=cfg.svd_mode), tokenizer)
    initial = None
    if get_method(settings.method).mutates_base:
        initial = out / "initial_adapter"
        if is_main_process():
            save_initial(model, initial)
    model.print_trainable_parameters()

    trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=[StopOnNonFiniteLoss()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE))
    checkpoint = last_checkpoint(args.output_dir)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)

    if trainer.is_world_process_zero():
        export_adapter(model, out / "adapter", initial)
        record = {"config": resolved(cfg), "config_hash": chash, "base_model": model_dir,
                  "adapter": str(out / "adapter"), "initial_adapter": str(initial) if initial else None,
                  "train_examples": len(train_set), "metrics": result.metrics,
                  "log_history": trainer.state.log_history, **provenance()}
        atomic_write_text(out / "run.json", json.dumps(record, indent=2))
        log.info("adapter written to %s", out / "adapter")
    if "wandb" in args.report_to and trainer.is_world_process_zero():
        tracking.finish_train(cfg, out / "adapter")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    # launchers (deepspeed, torch.distributed) pass --local_rank; LOCAL_RANK in the environment carries it
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    main()
