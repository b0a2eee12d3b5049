"""The fetch step: everything an experiment downloads, into the Hugging Face caches, before any other step.

    make fetch experiment=table2 [model=qwen2.5-7b]        # on a node with internet (a cluster's login node)

Compute nodes often have no internet: after fetch, the later steps (and every SLURM job) run with
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on, from the caches. `needs` lists what one experiment's grid uses: the
base model (its safetensors, config and tokenizer files: never the duplicate .bin weights), the training data,
the data of every lm_eval task of the columns (through lm_eval's own task loading), the math stage's hub data
sets, MBPP+ (evalplus's release file) and what the grid's methods read from the hub (`Method.downloads`: LoRA-Null's
calibration corpus). Each item is looked up offline first, so a second fetch downloads nothing; offline, the missing
items are named with their hub ids. A gated model without a token fails at once, naming the login.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from oplora.artifacts import ArtifactUnavailable
from oplora.cache import Cache
from oplora.config import trains
from oplora.methods import adapter_settings, get_method
from oplora.record import as_dict
from oplora.resources import OFFLINE_ENV, PREFIX, hub_offline, is_hub_id, resolve

log = logging.getLogger(__name__)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # config, weights, tokenizer, template


@dataclass(frozen=True)
class Item:
    what: str  # e.g. "base model", "lm_eval task boolq"
    hub_id: str  # a hub id, or an `oplora:` resource built from a registry artifact (oplora.artifacts)
    load: Callable[[], object]  # reads the item through the code a real run uses (downloads when online)
    columns: tuple[str, ...] = ()  # the table columns that need it; () = the whole experiment (model, training data)


class ColumnsUnavailable(FileNotFoundError):
    """Only evaluation data is missing: the columns that need it fail, training and the other columns go on."""

    def __init__(self, message: str, columns: list[str]):
        super().__init__(message)
        self.columns = columns


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


def lm_eval_items(tasks: dict[str, tuple[str, ...]], include_path: list[str], sandbox: str) -> list[Item]:
    """Each lm_eval task's data ({task: its columns}), loaded by lm_eval itself (its YAML's dataset_path,
    dataset_name, splits).

    Fetch runs no model, so no generated code: the code tasks' metric (HF code_eval, which lm_eval's mbpp loads and
    self-tests with a fixed program when the task loads) is loaded without the sandbox here. The sandbox is required
    where generated code runs, in the eval stage (`sandbox`, eval.lm_eval.sandbox, is only checked to be a valid mode),
    so a login node without bubblewrap or unprivileged user namespaces can fetch.
    """
    from oplora import sandbox as sandboxes
    from oplora.evaluation.code_eval import sandboxed_code_eval
    from oplora.evaluation.harness import check_known, task_manager

    sandboxes.check_mode(sandbox)

    def item(task: str) -> Item:
        def load():
            from lm_eval.tasks import get_task_dict

            manager = task_manager(include_path)
            check_known(manager, task, include_path)
            quiet = logging.getLogger(sandboxes.__name__)  # its warning speaks of generated code: none runs here
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with sandboxed_code_eval("none", manager):  # tasks that score by running code load code_eval here
                    return get_task_dict([task], manager)
            finally:
                quiet.setLevel(level)

        return Item(f"lm_eval task {task}", task, load, tasks[task])

    return [item(t) for t in tasks]


def mbpp_plus_item(columns: tuple[str, ...]) -> Item:
    def load():
        from oplora.evaluation.code import mbpp_plus_file

        return mbpp_plus_file(download=True)  # refused when offline

    return Item("MBPP+ (evalplus release file)", "evalplus/mbppplus_release", load, columns)


def needs(cfg: DictConfig, cells: dict) -> list[Item]:
    """Everything the experiment's grid downloads, each read by the function its stage reads it with."""
    from oplora import data
    from oplora.evaluation import math_eval

    items = [model_item(cfg.model.path)] if is_hub_id(cfg.model.path) else []
    if is_hub_id(cfg.data.path):
        items.append(Item("training data", cfg.data.path,
                          lambda: data.load_records(cfg.data.path, Cache.of(cfg), cfg.data.split)))
    columns = [as_dict(c) for c in cfg.eval.columns]
    labels = lambda stage, task: tuple(c["label"] for c in columns if (c["stage"], c["task"]) == (stage, task))  # noqa: E731
    lm_tasks = {c["task"]: labels("lm_eval", c["task"]) for c in columns if c["stage"] == "lm_eval"}
    if lm_tasks:
        items += lm_eval_items(lm_tasks, list(cfg.eval.lm_eval.include_path), cfg.eval.lm_eval.sandbox)
    for task in dict.fromkeys(c["task"] for c in columns if c["stage"] == "math"):
        spec = as_dict(cfg.eval.math.tasks[task])
        if is_hub_id(spec["path"]):
            items.append(Item(f"math task {task}", spec["path"], lambda spec=spec: math_eval.load_rows(spec, None),
                              labels("math", task)))
    for task in dict.fromkeys(c["task"] for c in columns if c["stage"] == "kl"):
        path = cfg.eval.kl.tasks[task].path
        if str(path).startswith(PREFIX):
            items.append(Item(f"KL prompts {task}", path, lambda path=path: resolve(path), labels("kl", task)))
    if any(c["stage"] == "evalplus" and c["task"] == "mbpp" for c in columns) and not cfg.eval.evalplus.dataset_file:
        items.append(mbpp_plus_item(labels("evalplus", "mbpp")))
    downloads = {(d.what, d.hub_id): d for c in cells.values() if trains(c.method)
                 for s in [adapter_settings(c)] for d in get_method(s.method).downloads(s)}  # one per item, not cell
    return items + [Item(d.what, d.hub_id, d.load) for d in downloads.values()]


def fetch(cfg: DictConfig, cells: dict) -> bool:
    """Fetch what is not cached yet; True when something was downloaded. What cannot be had is named, with why: an
    item the whole experiment needs (the model, the training data) stops everything (FileNotFoundError); an item
    only some columns need stops only those (ColumnsUnavailable, raised after everything else was fetched). Online,
    a whole-experiment item that fails to download (a gated model without a token, say) stops fetch at once.
    Offline (HF_HUB_OFFLINE set), a hub item missing from the cache is named with `make fetch`."""
    items, downloaded, missing = needs(cfg, cells), [], []
    offline = hub_offline()
    for item in items:
        try:
            with hub_mode(offline=True):
                item.load()
            log.info("fetch: %s %s is cached", item.what, item.hub_id)
            continue
        except Exception as err:  # not cached (each library raises its own error types), or not to be had
            if offline or isinstance(err, ArtifactUnavailable):  # a registry artifact tried every place already
                missing.append((item, err))
                continue
        log.info("fetch: downloading %s %s", item.what, item.hub_id)
        try:
            with hub_mode(offline=False):
                item.load()
        except Exception as err:
            if not item.columns:  # the model or the training data: nothing can run, stop at once (gated, gone, …)
                raise
            missing.append((item, err))
            continue
        downloaded.append(item.hub_id)
    log.info("fetch: %d items, %d downloaded%s", len(items), len(downloaded),
             f" ({', '.join(downloaded)})" if downloaded else "")
    if missing:
        causes: dict[str, list[Item]] = {}  # one entry per cause: an artifact several tasks need is named once
        for item, err in missing:
            causes.setdefault(why(err, is_hub_id(item.hub_id) and offline), []).append(item)
        message = "\n".join(f"{', '.join(f'{i.what} ({i.hub_id})' for i in items)}, needed by "
                            f"{needed_by(items)}: {cause}" for cause, items in causes.items())
        if any(not item.columns for item, _ in missing):
            raise FileNotFoundError(message)
        raise ColumnsUnavailable(message, sorted({c for item, _ in missing for c in item.columns}))
    return bool(downloaded)


def needed_by(items: list[Item]) -> str:
    columns = list(dict.fromkeys(c for item in items for c in item.columns))
    return "the whole experiment" if any(not item.columns for item in items) else f"columns {', '.join(columns)}"


def why(err: Exception, hub_offline_item: bool) -> str:
    """Why an item cannot be had: a hub item offline names the hub and `make fetch`; a registry artifact names every
    place tried (oplora.artifacts)."""
    if hub_offline_item and not isinstance(err, ArtifactUnavailable):
        return ("not in the Hugging Face cache, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid downloading; run "
                f"`make fetch experiment=…` on a node with internet ({type(err).__name__}: {str(err)[:200]})")
    return f"{type(err).__name__}: {err}"
