"""The fetch step: everything an experiment downloads, into the Hugging Face caches, before any other step.

    make fetch experiment=table2 [model=qwen2.5-7b]        # on a node with internet (a cluster's login node)

Compute nodes often have no internet: after fetch, the later steps (and every SLURM job) run with
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on, from the caches. `needs` lists what one experiment's grid uses: the
base model (its safetensors, config and tokenizer files: never the duplicate .bin weights), the training data,
the data of every lm_eval task of the columns (through lm_eval's own task loading), the math stage's hub data
sets, MBPP+ (evalplus's release file) and, when LoRA-Null is in the grid, its calibration corpus. Each item is
looked up offline first, so a second fetch downloads nothing; offline, the missing items are named with their
hub ids. A gated model without a token fails at once, naming the login.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from oplora.config import trains
from oplora.record import as_dict
from oplora.resources import OFFLINE_ENV, hub_offline, is_hub_id

log = logging.getLogger(__name__)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # config, weights, tokenizer, template


@dataclass(frozen=True)
class Item:
    what: str  # e.g. "base model", "lm_eval task boolq"
    hub_id: str
    load: Callable[[], object]  # reads the item through the code a real run uses (downloads when online)


def set_offline(offline: bool) -> None:
    """huggingface_hub and datasets offline (or online) in this process and its children; both libraries read the
    environment once, at import, so their constants are set too."""
    import datasets.config
    import huggingface_hub.constants

    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1" if offline else "0"))
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = offline
    huggingface_hub.constants.HF_HUB_OFFLINE = offline


@contextlib.contextmanager
def hub_mode(offline: bool):
    """`set_offline(offline)` for the block, then back to how it was."""
    import huggingface_hub.constants

    saved, was = {k: os.environ.get(k) for k in OFFLINE_ENV}, huggingface_hub.constants.HF_HUB_OFFLINE
    set_offline(offline)
    try:
        yield
    finally:
        set_offline(was)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def model_item(path: str) -> Item:
    def load():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError

        try:
            return snapshot_download(path, allow_patterns=MODEL_FILES)
        except GatedRepoError as err:
            raise PermissionError(
                f"{path} is a gated model: accept its license on https://huggingface.co/{path}, then log in on this "
                "machine with `huggingface-cli login` (or `hf auth login`), or export HF_TOKEN=<a read token>") from err

    return Item("base model", path, load)


def lm_eval_items(tasks: list[str], include_path: list[str], sandbox: str) -> list[Item]:
    """Each lm_eval task's data, loaded by lm_eval itself (its YAML's dataset_path, dataset_name, splits).

    Fetch runs no model, so no generated code: the code tasks' metric (HF code_eval, which lm_eval's mbpp loads and
    self-tests with a fixed program when the task loads) is loaded without the sandbox here. The sandbox is required
    where generated code runs, in the eval stage (`sandbox`, eval.lm_eval.sandbox, is only checked to be a valid mode),
    so a login node without bubblewrap or unprivileged user namespaces can fetch.
    """
    from oplora import sandbox as sandboxes
    from oplora.evaluation.code_eval import sandboxed_code_eval
    from oplora.evaluation.harness import task_manager

    sandboxes.check_mode(sandbox)

    def item(task: str) -> Item:
        def load():
            from lm_eval.tasks import get_task_dict

            manager = task_manager(include_path)
            quiet = logging.getLogger(sandboxes.__name__)  # its warning speaks of generated code: none runs here
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with sandboxed_code_eval("none", manager):  # tasks that score by running code load code_eval here
                    return get_task_dict([task], manager)
            finally:
                quiet.setLevel(level)

        return Item(f"lm_eval task {task}", task, load)

    return [item(t) for t in tasks]


def mbpp_plus_item() -> Item:
    def load():
        from oplora.evaluation.code import mbpp_plus_file

        return mbpp_plus_file(download=True)  # refused when offline

    return Item("MBPP+ (evalplus release file)", "evalplus/mbppplus_release", load)


def needs(cfg: DictConfig, cells: dict) -> list[Item]:
    """Everything the experiment's grid downloads, each read by the function its stage reads it with."""
    from oplora import calibration, data
    from oplora.evaluation import math_eval

    items = [model_item(cfg.model.path)] if is_hub_id(cfg.model.path) else []
    if is_hub_id(cfg.data.path):
        items.append(Item("training data", cfg.data.path, lambda: data.load_records(cfg.data.path, cfg.data.split)))
    columns = [as_dict(c) for c in cfg.eval.columns]
    lm_tasks = list(dict.fromkeys(c["task"] for c in columns if c["stage"] == "lm_eval"))
    if lm_tasks:
        items += lm_eval_items(lm_tasks, list(cfg.eval.lm_eval.include_path), cfg.eval.lm_eval.sandbox)
    for task in dict.fromkeys(c["task"] for c in columns if c["stage"] == "math"):
        spec = as_dict(cfg.eval.math.tasks[task])
        if is_hub_id(spec["path"]):
            items.append(Item(f"math task {task}", spec["path"], lambda spec=spec: math_eval.load_rows(spec, None)))
    if any(c["stage"] == "evalplus" and c["task"] == "mbpp" for c in columns) and not cfg.eval.evalplus.dataset_file:
        items.append(mbpp_plus_item())
    corpus = calibration.CalibrationSettings(**as_dict(cfg.calibration))
    if corpus.source and is_hub_id(corpus.source) and any(
            trains(c.method) and c.method.name == "lora_null" for c in cells.values()):
        items.append(Item("LoRA-Null calibration corpus", corpus.source, lambda: calibration.read_documents(corpus)))
    return items


def fetch(cfg: DictConfig, cells: dict) -> bool:
    """Fetch what is not cached yet; True when something was downloaded. Offline (HF_HUB_OFFLINE set), a missing
    item is an error that names every missing hub id."""
    items, downloaded, missing = needs(cfg, cells), [], []
    offline = hub_offline()
    for item in items:
        try:
            with hub_mode(offline=True):
                item.load()
            log.info("fetch: %s %s is cached", item.what, item.hub_id)
            continue
        except Exception as err:  # not cached (each library raises its own error types)
            if offline:
                missing.append(f"{item.what}: {item.hub_id} ({type(err).__name__}: {str(err)[:200]})")
                continue
        log.info("fetch: downloading %s %s", item.what, item.hub_id)
        with hub_mode(offline=False):
            item.load()
        downloaded.append(item.hub_id)
    if missing:
        raise FileNotFoundError("not in the Hugging Face cache, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid "
                                "downloading; run `make fetch experiment=…` on a node with internet:\n  "
                                + "\n  ".join(missing))
    log.info("fetch: %d items, %d downloaded%s", len(items), len(downloaded),
             f" ({', '.join(downloaded)})" if downloaded else "")
    return bool(downloaded)
