"""Hydra composition: every experiment × model × method resolves; bad choices and values are refused."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from helpers import compose
from oplora.config import CONFIG_DIR
from oplora.grid import grid
from oplora.methods import adapter_settings
from oplora.record import config_hash
from oplora.report import reference_row
from oplora.rundir import RunDir
from oplora.train import check_config, training_arguments

CONFIGS = Path(CONFIG_DIR)
REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml") if p.stem != "base")  # base: not trained
PAPER = {"table2": ("llama2-7b", "commonsense170k", 32, 2e-4), "table3": ("qwen2.5-7b", "commonsense170k", 32, 2e-4),
         "table4": ("llama2-7b", "metamath100k", 64, 3e-4), "table5": ("qwen2.5-7b", "metamath100k", 64, 3e-4),
         "table6": ("llama2-7b", "codefeedback", 32, 2e-4), "table7": ("qwen2.5-7b", "codefeedback", 32, 2e-4)}

COLUMNS = {  # the paper's table headers: fine-tuning columns, forgetting columns
    "commonsense170k": (["BoolQ", "PIQA", "SIQA", "HSwag", "WinoG", "ARC-e", "ARC-c", "OBQA"],
                        ["MathQA", "MBPP", "RACE"]),
    "metamath100k": (["MATH", "GSM8K"], ["ARC-e", "ARC-c", "SIQA"]),
    "codefeedback": (["MBPP", "MBPP+"], ["HSwag", "OBQA", "SIQA"]),
}


def test_the_paper_grid_is_configured():
    assert set(PAPER) <= set(EXPERIMENTS)
    assert list(compose().pipeline.methods) == ["lora", "pissa", "milora", "lora_null", "oplora16", "oplora128"]
    assert set(compose().pipeline.methods) <= set(METHODS)  # every method config resolves below, these and any other
    assert {"llama2-7b", "qwen2.5-7b", "smollm2-135m", "tiny-llama", "tiny-qwen2"} <= set(MODELS)


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_experiments_match_table_8(experiment):
    cfg = compose(f"experiment={experiment}")
    model, data, r, lr = PAPER[experiment]
    t = cfg.train
    assert (cfg.model.name, cfg.data.name, t.lora_r, t.lora_alpha, t.lr) == (model, data, r, r, lr)
    assert (t.batch_size, t.epochs, t.lora_dropout, t.warmup_ratio, t.weight_decay) == (32, 1, 0.05, 0.03, 0.0)
    assert cfg.train.scheduler == "cosine" and cfg.deepspeed.config.zero_optimization.stage == 2
    assert cfg.model.target_modules == ["q_proj", "v_proj", "up_proj", "down_proj", "o_proj"]
    assert cfg.data.limit == (100000 if data == "metamath100k" else None)
    finetune, forget = COLUMNS[data]
    assert [c.label for c in cfg.eval.columns] == finetune + forget
    assert [c.role for c in cfg.eval.columns] == ["finetune"] * len(finetune) + ["forget"] * len(forget)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("model", MODELS)
def test_every_experiment_model_method_resolves(experiment, model, tmp_path):
    hashes = set()
    for method in METHODS:
        extra = [f"calibration.source={tmp_path / 'nq.txt'}"] if method == "lora_null" else []
        cfg = compose(f"experiment={experiment}", f"model={model}", f"method={method}", *extra)
        check_config(cfg)
        settings = adapter_settings(cfg)
        assert settings.r == cfg.train.lora_r and settings.target_modules == tuple(cfg.model.target_modules)
        assert settings.options.get("k") == {"oplora16": 16, "oplora128": 128}.get(method)
        lr = f"/lr{cfg.train.lr}" if cfg.pipeline.get("lrs") else ""  # a sweep's cells differ by lr too
        assert str(cfg.output_dir).endswith(f"{model}/{cfg.data.name}/{cfg.method.label}{lr}/seed42")
        hashes.add(config_hash(cfg))
    assert len(hashes) == len(METHODS)


def test_effective_batch_is_derived(tmp_path):
    cfg = compose("model=tiny-llama", "train.micro_batch_size=4", "deepspeed=none", f"output_dir={tmp_path}")
    args = training_arguments(cfg, RunDir(tmp_path), [])
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
    assert args.warmup_steps == 0.03 and args.lr_scheduler_type.value == "cosine" and not args.bf16
    with pytest.raises(ValueError, match="batch_size=32 is not a multiple of micro_batch_size × world_size = 5 × 1"):
        training_arguments(compose("train.micro_batch_size=5"), RunDir(tmp_path), [])


def test_hash_ignores_where_a_run_is_written_not_what_it_computes():
    base = config_hash(compose())
    assert config_hash(compose("output_dir=/elsewhere", "force=true", "wandb=disabled")) == base
    assert config_hash(compose("method.display=Plain-LoRA", "method.color=black")) == base  # how it is shown
    assert config_hash(compose("train.lr=1e-4")) != base
    assert config_hash(compose("seed=1")) != base


def test_unknown_group_choice_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException, match=r"(?s)method/dora.*Available options.*oplora16"):
        compose("method=dora")
    with pytest.raises(ConfigCompositionException, match=r"(?s)model/gpt2.*Available options.*llama2-7b"):
        compose("model=gpt2")


@pytest.mark.parametrize("override,message", [
    ("svd_mode=lanczos", "svd_mode='lanczos' is not valid; choose one of exact, randomized"),
    ("train.scheduler=step", "train.scheduler='step' is not valid; choose one of linear, cosine"),
    ("model.dtype=int8", "model.dtype='int8' is not valid; choose one of float32, bfloat16, float16"),
    ("train.lr=-1", r"train.lr=-1 must be a positive number"),
    ("train.lr=fast", r"train.lr='fast' must be a positive number"),
    ("train.lora_dropout=1.5", r"lora_dropout and train.warmup_ratio must lie in \[0, 1\)"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(compose(override))


NQ_OPEN = "google-research-datasets/nq_open"


def test_unknown_method_name_and_missing_calibration():
    with pytest.raises(ValueError, match="unknown method 'dora'; valid methods"):
        adapter_settings(compose("method.name=dora"))
    assert adapter_settings(compose("method=lora_null")).options["calibration"]["source"] == NQ_OPEN  # official
    with_source = adapter_settings(compose("method=lora_null", "calibration.source=nq.txt"))
    assert with_source.options["calibration"]["source"] == "nq.txt"


def test_a_normal_install_carries_the_configs_and_the_paper_numbers(tmp_path):
    """A wheel (not the editable source tree) composes the configs and reads the paper's tables from itself."""
    source = tmp_path / "source"
    for part in ("oplora", "configs", "results/paper", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy
        (source / part).parent.mkdir(parents=True, exist_ok=True)
        copy(REPO / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("oplora-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("from oplora.config import CONFIG_DIR, PAPER_DIR, compose; from oplora.tables import paper_table; "
             "cfg = compose(['experiment=table4']); "
             "print(CONFIG_DIR, paper_table(cfg.pipeline.paper_table, cfg.eval.columns)[2]['LoRA'])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    config_dir, lora_avg = out.stdout.split()
    assert config_dir == str(tmp_path / "site" / "oplora" / "configs") and float(lora_avg) == 39.88


def test_compare_to_is_a_method_configs_label():
    """pipeline.compare_to matches a method config's label (oplora16), not the method's name (oplora, shared by
    OPLoRA-16 and -128); a value that names no cell of the grid is refused, listing the labels."""
    overrides = ["pipeline.methods=[lora,oplora16]"]
    cells = grid(compose(*overrides, "pipeline.compare_to=oplora16"), overrides)
    methods = {c.method.display: c.method for c in cells.values()}
    assert reference_row("oplora16", methods) == "OPLoRA-16" and reference_row(None, methods) is None
    with pytest.raises(ValueError, match=r"pipeline.compare_to='oplora' is no method of this grid .*valid: lora, "
                                         r"oplora16, base, or null"):
        grid(compose(*overrides, "pipeline.compare_to=oplora"), overrides)
    grid(compose(*overrides, "pipeline.compare_to=null"), overrides)
